"""kernels.token_write (one decode token into the slot buffers and the selection state) equals its torch
statement bit for bit, on buffers full of random values (so an unwritten or misplaced store shows).
CPU: the kernel under TRITON_INTERPRET=1; GPU: marked, at 8B-like sizes."""

from __future__ import annotations

import pytest
import torch

from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels.token_write import TokenBuffers, write_token

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(gen, B, H, d, bs, ks, dtype, in_dtype):
    S, R, T = B * H * 3 + 1, B + 2, 4 * bs
    rnd = lambda *shape, dt=torch.float32: torch.randn(*shape, generator=gen).to(dt).to(DEVICE)  # noqa: E731
    buf = TokenBuffers(rnd(2, S, bs * d, dt=dtype), rnd(S, bs), rnd(R, ks, H, d, dt=dtype), rnd(R, H, T))
    slots = torch.randperm(S, generator=gen)[: B * H].view(B, H).to(DEVICE)
    rows = torch.randperm(R, generator=gen)[:B].to(DEVICE)
    pos = torch.randint(0, T, (B,), generator=gen).to(DEVICE)
    offsets = pos % bs
    k, v = rnd(B, H, d, dt=in_dtype), rnd(B, H, d, dt=in_dtype)
    return buf, (slots, offsets, rows, pos, k, v, rnd(B, H))


def clone(buf: TokenBuffers) -> TokenBuffers:
    return TokenBuffers(*(t.clone() for t in buf))


@pytest.mark.parametrize("dtype, in_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("B, H, d", [(3, 2, 16), (1, 1, 64), (4, 8, 24)])
def test_kernel_equals_torch_statement(gen, dtype, in_dtype, B, H, d):
    buf, args = case(gen, B, H, d, bs=8, ks=4, dtype=dtype, in_dtype=in_dtype)
    want, got = clone(buf), clone(buf)
    write_token(want, *args, impl="torch")
    write_token(got, *args, impl="triton")
    for name, g, w, before in zip(TokenBuffers._fields, got, want, buf, strict=True):
        assert torch.equal(g, w), name
        assert not torch.equal(w, before), f"{name}: nothing was written"  # the check can fail


def test_strided_inputs(gen):
    """k / v with a non-unit last stride and strided index vectors store the same as contiguous ones."""
    buf, (slots, offsets, rows, pos, k, v, c) = case(gen, 3, 2, 16, bs=8, ks=4, dtype=torch.float32,
                                                     in_dtype=torch.float32)
    want, got = clone(buf), clone(buf)
    write_token(want, slots, offsets, rows, pos, k, v, c, impl="torch")
    strided = lambda t: torch.stack((t, torch.zeros_like(t)), -1)[..., 0]  # noqa: E731 - same values, stride 2
    write_token(got, slots, strided(offsets), strided(rows), strided(pos), strided(k), strided(v), c, impl="triton")
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_torch_statement_stores_where_the_runtime_reads(gen):
    """The token lands at (slot, offset) of the runs, at (row, pos % kernel_size) of the ring and at
    (row, head, pos) of the per-token biases; nothing else changes."""
    buf, (slots, offsets, rows, pos, k, v, c) = case(gen, 2, 2, 16, bs=8, ks=4, dtype=torch.float32,
                                                     in_dtype=torch.float32)
    out = clone(buf)
    write_token(out, slots, offsets, rows, pos, k, v, c, impl="torch")
    runs = out.kv.view(2, -1, 8, 16)
    for b in range(2):
        for h in range(2):
            s, o, r, p = int(slots[b, h]), int(offsets[b]), int(rows[b]), int(pos[b])
            assert torch.equal(runs[0, s, o], k[b, h]) and torch.equal(runs[1, s, o], v[b, h])
            assert out.c_slots[s, o] == c[b, h] and out.c_tokens[r, h, p] == c[b, h]
            assert torch.equal(out.ring[r, p % 4, h], k[b, h])
    changed = sum(int((x != y).sum()) for x, y in zip(out, buf))
    assert changed == 2 * 2 * (16 + 16 + 1 + 16 + 1)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(c=a["c"].double()), r"^c: dtype"),
    (lambda a: a.update(slots=a["slots"][:, :1]), r"^slots: expected shape"),
    (lambda a: a.update(pos=a["pos"].float()), r"^pos: dtype"),
    (lambda a: a.update(v=a["v"][:, :, :8]), r"^v, c:"),
])
def test_argument_errors_name_the_argument(gen, change, match):
    buf, (slots, offsets, rows, pos, k, v, c) = case(gen, 2, 2, 16, bs=8, ks=4, dtype=torch.float32,
                                                     in_dtype=torch.float32)
    args = dict(slots=slots, offsets=offsets, rows=rows, pos=pos, k=k, v=v, c=c)
    change(args)
    before = clone(buf)
    with pytest.raises(KernelArgumentError, match=match):
        write_token(buf, **args)
    assert all(torch.equal(x, y) for x, y in zip(buf, before))  # nothing written


def test_buffers_of_another_head_dim_are_refused(gen):
    buf, args = case(gen, 2, 2, 16, bs=8, ks=4, dtype=torch.float32, in_dtype=torch.float32)
    with pytest.raises(KernelArgumentError, match=r"^buf: expected kv"):
        write_token(buf._replace(kv=buf.kv[:, :, :64]), *args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_gpu_real_sizes(gen):
    """8B-like layer: Hkv 8, d 128, block 64, kernel_size 32, batch 64, bf16 buffers."""
    buf, args = case(gen, 64, 8, 128, bs=64, ks=32, dtype=torch.bfloat16, in_dtype=torch.bfloat16)
    want, got = clone(buf), clone(buf)
    write_token(want, *args, impl="torch")
    write_token(got, *args, impl="triton")
    torch.cuda.synchronize()
    for name, g, w in zip(TokenBuffers._fields, got, want, strict=True):
        assert torch.equal(g, w), name
