"""The fused eviction head equals nosa_sglang.reference.eviction_bias (CPU: Triton interpreter; GPU: marked)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from nosa_sglang.kernels._checks import KernelArgumentError, triton_interpreting
from nosa_sglang.kernels.eviction_head import _eviction_bias_kernel, eviction_bias, launch_eviction_bias
from nosa_sglang.reference import eviction_bias as reference_eviction_bias

HAS_CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run through the device tool)")


@pytest.fixture
def device() -> str:
    if HAS_CUDA:
        return "cuda"
    if not triton_interpreting(_eviction_bias_kernel):
        pytest.fail("kernels were imported before TRITON_INTERPRET=1 was set; set it in tests/conftest.py")
    return "cpu"


@pytest.fixture
def gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def make_inputs(gen: torch.Generator, n: int, hkv: int, d: int, dtype: torch.dtype, bias: bool, device: str):
    v = torch.randn(n, hkv, d, generator=gen).to(dtype)
    A = torch.rand(hkv, generator=gen) + 0.5  # nonzero A: a zero A would hide a wrong softplus
    w = torch.randn(hkv, hkv * d, generator=gen) * (2.0 / (hkv * d) ** 0.5)
    b = torch.randn(hkv, generator=gen) if bias else None
    return [t.to(device) if t is not None else None for t in (v, A, w, b)]


def reference(v, A, w, b) -> torch.Tensor:
    up = [t.cpu().double() if t is not None else None for t in (v, A, w, b)]
    return reference_eviction_bias(*up)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in output (an unwritten element?)"
    return ((out.cpu().double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hkv", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(device, gen, dtype, hkv, d, bias):
    v, A, w, b = make_inputs(gen, 37, hkv, d, dtype, bias, device)
    out = torch.full((37, hkv), float("nan"), device=device)
    c = eviction_bias(v, A, w, b, out=out)
    assert c.data_ptr() == out.data_ptr() and c.dtype == torch.float32
    assert rel_err(c, reference(v, A, w, b)) <= TOL[dtype]


def test_fp16_and_bf16_weights(device, gen):
    v, A, w, b = make_inputs(gen, 19, 2, 64, torch.float16, True, device)
    A, w, b = A.bfloat16(), w.bfloat16(), b.bfloat16()
    assert rel_err(eviction_bias(v, A, w, b), reference(v, A, w, b)) <= 1e-2


def test_softplus_is_stable_at_extremes(device, gen):
    """Pre-activations from -60 to 50 straddle torch's threshold 20: every element within 1e-5 relative."""
    hkv, d = 8, 64
    v, A, w, _ = make_inputs(gen, 9, hkv, d, torch.float32, False, device)
    w = w * 1e-3
    b = torch.tensor([-60.0, -30.0, -5.0, -0.3, 0.7, 19.9, 20.1, 50.0], device=device)
    c = eviction_bias(v, A, w, b)
    ref = reference(v, A, w, b)
    assert torch.isfinite(c).all()
    assert ((c.cpu().double() - ref).abs() / ref.abs()).max().item() <= 1e-5


def test_token_stride_is_free(device, gen):
    """v sliced out of a fused qkv projection (token stride > Hkv*d) needs no copy."""
    hkv, d = 2, 64
    qkv = torch.randn(23, 6 * hkv * d, generator=gen).to(device)
    v = qkv[:, 4 * hkv * d : 5 * hkv * d].unflatten(1, (hkv, d))
    _, A, w, b = make_inputs(gen, 1, hkv, d, torch.float32, True, device)
    assert rel_err(eviction_bias(v, A, w, b), reference(v, A, w, b)) <= 1e-4


def test_out_slice_is_written_and_neighbours_kept(device, gen):
    v, A, w, b = make_inputs(gen, 11, 2, 64, torch.float32, True, device)
    buf = torch.full((20, 2), float("nan"), device=device)
    eviction_bias(v, A, w, b, out=buf[5:16])
    assert rel_err(buf[5:16], reference(v, A, w, b)) <= 1e-4
    assert buf[:5].isnan().all() and buf[16:].isnan().all()


@pytest.mark.parametrize("block_n, block_k, num_warps", [(4, 256, 4), (16, 64, 4), (32, 32, 8), (64, 16, 4)])
def test_every_tile_shape_the_benchmark_sweeps(device, gen, block_n, block_k, num_warps):
    v, A, w, b = make_inputs(gen, 70, 8, 64, torch.float32, True, device)
    out = torch.full((70, 8), float("nan"), device=device)
    launch_eviction_bias(v, A, w, b, out, block_n, block_k, num_warps)
    assert rel_err(out, reference(v, A, w, b)) <= 1e-4


def test_empty_batch(device, gen):
    v, A, w, b = make_inputs(gen, 0, 2, 64, torch.float32, True, device)
    assert eviction_bias(v, A, w, b).shape == (0, 2)


@pytest.mark.parametrize(
    "change, arg",
    [
        (lambda t: {**t, "v": t["v"].flatten(1)}, "v"),
        (lambda t: {**t, "v": t["v"].to(torch.int32)}, "v"),
        (lambda t: {**t, "v": t["v"].transpose(1, 2).contiguous().transpose(1, 2)}, "v"),
        (lambda t: {**t, "A": t["A"][:1]}, "A"),
        (lambda t: {**t, "delta_weight": t["delta_weight"][:, :-1]}, "delta_weight"),
        (lambda t: {**t, "delta_weight": t["delta_weight"].t().contiguous().t()}, "delta_weight"),
        (lambda t: {**t, "delta_bias": t["delta_bias"][:1]}, "delta_bias"),
        (lambda t: {**t, "out": torch.empty(7, 2, dtype=torch.float64)}, "out"),
        (lambda t: {**t, "out": torch.empty(7, 3)}, "out"),
        (lambda t: {**t, "A": t["A"].to("meta")}, "A"),
    ],
    ids=["v_2d", "v_int", "v_inner_strided", "A_shape", "W_shape", "W_noncontig", "bias_shape",
         "out_dtype", "out_shape", "A_device"],
)
def test_bad_argument_is_named(gen, change, arg):
    v, A, w, b = make_inputs(gen, 7, 2, 64, torch.float32, True, "cpu")
    kwargs = change({"v": v, "A": A, "delta_weight": w, "delta_bias": b, "out": None})
    with pytest.raises(KernelArgumentError, match=f"^{arg}:"):
        eviction_bias(**kwargs)


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [1, 128, 4096])
@pytest.mark.parametrize("hkv", [2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_real_sizes(gen, dtype, hkv, n):
    v, A, w, b = make_inputs(gen, n, hkv, 128, dtype, True, "cuda")
    out = torch.full((n, hkv), float("nan"), device="cuda")
    eviction_bias(v, A, w.to(dtype), b, out=out)
    torch.cuda.synchronize()
    assert rel_err(out, reference(v, A, w.to(dtype), b)) <= TOL[dtype]
