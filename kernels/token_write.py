"""Store one decode token per (request, KV head) of a layer: into the slot buffers and the selection state.

Why: the runtime's append stored k, v and c into the tail slots (`SlotBuffers`) and k and c into the
recent-key ring and the per-token biases (`SelectionState`) with four index_put ops, a stack and a
remainder: six tiny kernels a layer under CUDA graphs (~15 us at 1B-like shapes, profile of
2026-11-29), paid again by every micro-batch. One program per (request, KV head) does the five stores.
The torch statement (`write_token_torch`) is what the runtime did before; the kernel equals it bit for
bit (stores only: k and v are cast to the buffers' dtype by torch first, when they differ).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nosa_sglang.kernels import pdl
from nosa_sglang.kernels._checks import KernelArgumentError, check_tensor
from nosa_sglang.kernels._dispatch import FLOAT_DTYPES, check_devices, check_index, next_pow2, resolve_impl


class TokenBuffers(NamedTuple):
    """Where one layer's decode token goes (views of the runtime's buffers)."""

    kv: torch.Tensor  #: [2, S, block_size * d] K and V runs of every slot
    c_slots: torch.Tensor  #: [S, block_size] float32 biases of every slot
    ring: torch.Tensor  #: [R, kernel_size, Hkv, d] the last kernel_size keys of every request row
    c_tokens: torch.Tensor  #: [R, Hkv, max_tokens] float32 bias of every token of every row


def write_token(buf: TokenBuffers, slots: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor,
                pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, impl: str = "auto") -> None:
    """kv[:, slots[b, h]] at token offsets[b] = (k, v)[b, h]; c_slots likewise = c[b, h];
    ring[rows[b], pos[b] % kernel_size, h] = k[b, h]; c_tokens[rows[b], h, pos[b]] = c[b, h].

    Args:
        buf: the layer's TokenBuffers (last dims contiguous).
        slots: [B, Hkv] int64 tail slot of each (request, head); offsets [B] int64 token index in the block.
        rows: [B] int64 request rows; pos: [B] int64 token positions.
        k, v: [B, Hkv, d] (cast to the buffers' dtype, which kv and ring share); c: [B, Hkv] float32.
        impl: "auto" | "triton" | "torch".
    """
    check_tensor("k", k, 3, FLOAT_DTYPES)
    B, H, d = k.shape
    check_tensor("v", v, 3, FLOAT_DTYPES)
    check_tensor("c", c, 2, (torch.float32,))
    if tuple(v.shape) != (B, H, d) or tuple(c.shape) != (B, H):
        raise KernelArgumentError(f"v, c: expected [{B}, {H}, {d}] and [{B}, {H}] like k, got "
                                  f"{list(v.shape)} and {list(c.shape)}")
    for name, t, shape in (("slots", slots, (B, H)), ("offsets", offsets, (B,)), ("rows", rows, (B,)),
                           ("pos", pos, (B,))):
        check_index(name, t, len(shape))
        if tuple(t.shape) != shape:
            raise KernelArgumentError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    check_tensor("kv", buf.kv, 3, FLOAT_DTYPES)
    check_tensor("c_slots", buf.c_slots, 2, (torch.float32,))
    check_tensor("ring", buf.ring, 4, FLOAT_DTYPES)
    check_tensor("c_tokens", buf.c_tokens, 3, (torch.float32,))
    bs = buf.c_slots.shape[1]
    if buf.kv.shape[0] != 2 or buf.kv.shape[2] != bs * d or buf.ring.shape[2:] != (H, d) or buf.c_tokens.shape[1] != H:
        raise KernelArgumentError(
            f"buf: expected kv [2, S, {bs * d}], ring [R, kernel_size, {H}, {d}], c_tokens [R, {H}, T], got "
            f"{list(buf.kv.shape)}, {list(buf.ring.shape)}, {list(buf.c_tokens.shape)}")
    for name, t in zip(TokenBuffers._fields, buf):
        if t.stride(-1) != 1:
            raise KernelArgumentError(f"{name}: last dim must be contiguous, got strides {t.stride()}")
    device = check_devices(k=k, v=v, c=c, slots=slots, offsets=offsets, rows=rows, pos=pos, kv=buf.kv,
                           c_slots=buf.c_slots, ring=buf.ring, c_tokens=buf.c_tokens)
    if buf.ring.dtype != buf.kv.dtype:
        raise KernelArgumentError(f"ring: dtype must equal kv's {buf.kv.dtype}, got {buf.ring.dtype}")
    if resolve_impl(impl, device) == "torch":
        write_token_torch(buf, slots, offsets, rows, pos, k, v, c)
    elif B * H:
        # NOTE: torch rounds k and v to the buffers' dtype (the interpreter's own casts differ in the last
        # bit); the kernel reads k/v rows and the [B] index vectors with unit stride
        k, v = k.to(buf.kv.dtype).contiguous(), v.to(buf.kv.dtype).contiguous()
        offsets, rows, pos = offsets.contiguous(), rows.contiguous(), pos.contiguous()
        _write_token_kernel[(B * H,)](
            buf.kv, buf.c_slots, buf.ring, buf.c_tokens, slots, offsets, rows, pos, k, v, c,
            H, d, buf.ring.shape[1],
            buf.kv.stride(0), buf.kv.stride(1), buf.c_slots.stride(0), buf.ring.stride(0), buf.ring.stride(1),
            buf.ring.stride(2), buf.c_tokens.stride(0), buf.c_tokens.stride(1), slots.stride(0), slots.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), c.stride(0), c.stride(1),
            BLOCK_D=max(16, next_pow2(d)), num_warps=1, **pdl.options(k),
        )


def write_token_torch(buf: TokenBuffers, slots: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor,
                      pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> None:
    """The same stores as torch index ops (the statement the kernel is tested against)."""
    d, bs = k.shape[2], buf.c_slots.shape[1]
    off = offsets.view(-1, 1)
    buf.kv.view(2, -1, bs, d)[:, slots, off] = torch.stack((k, v)).to(buf.kv.dtype)
    buf.c_slots[slots, off] = c.to(torch.float32)
    buf.ring[rows, pos % buf.ring.shape[1]] = k.to(buf.ring.dtype)
    heads = torch.arange(k.shape[1], device=k.device)
    buf.c_tokens[rows[:, None], heads[None, :], pos[:, None]] = c.to(torch.float32)


@triton.jit
def _write_token_kernel(
    KV, CS, RING, CT, SLOTS, OFF, ROWS, POS, K, V, C,
    n_heads, d, ring_len,
    s_kv_t, s_kv_s, s_cs, s_r_r, s_r_k, s_r_h, s_ct_r, s_ct_h, s_sl_b, s_sl_h,
    s_k_b, s_k_h, s_v_b, s_v_h, s_c_b, s_c_h,
    BLOCK_D: tl.constexpr, WAIT: tl.constexpr,
):
    pdl.prologue(WAIT)
    pid = tl.program_id(0)
    b = pid // n_heads
    h = pid % n_heads
    slot = tl.load(SLOTS + b * s_sl_b + h * s_sl_h).to(tl.int64)
    off = tl.load(OFF + b).to(tl.int64)
    row = tl.load(ROWS + b).to(tl.int64)
    p = tl.load(POS + b).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < d
    k = tl.load(K + b * s_k_b + h * s_k_h + offs, mask=ok)
    v = tl.load(V + b * s_v_b + h * s_v_h + offs, mask=ok)
    c = tl.load(C + b * s_c_b + h * s_c_h)
    run = KV + slot * s_kv_s + off * d + offs
    tl.store(run, k, mask=ok)
    tl.store(run + s_kv_t, v, mask=ok)
    tl.store(CS + slot * s_cs + off, c)
    tl.store(RING + row * s_r_r + (p % ring_len) * s_r_k + h * s_r_h + offs, k, mask=ok)
    tl.store(CT + row * s_ct_r + h * s_ct_h + p, c)
