"""The fused eviction head equals nosa_sglang.reference.eviction_bias (CPU: Triton interpreter; GPU: marked)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from nosa_sglang.kernels._checks import KernelArgumentError, triton_interpreting
from nosa_sglang.kernels.eviction_head import (
    EvictionLaunchConfig, _eviction_bias_kernel, eviction_bias, eviction_launch_config, launch_eviction_bias,
)
from nosa_sglang.reference import eviction_bias as reference_eviction_bias

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# Against the float64 reference on the same (rounded) inputs. Every dtype pair: products of 16-bit
# operands are exact in fp32 and a weight not in the dot's type is split hi + lo (~2^-17), so the kernel
# adds ~1e-5 at most; the old FMA-only tolerance of 1e-4 holds for 16-bit inputs too.
TOL = 1e-4
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run through the device tool)")


@pytest.fixture
def device() -> str:
    if HAS_CUDA:
        return "cuda"
    if not triton_interpreting(_eviction_bias_kernel):
        pytest.fail("kernels were imported before TRITON_INTERPRET=1 was set; set it in tests/conftest.py")
    return "cpu"


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
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_reference(device, gen, dtype, hkv, d, bias):
    v, A, w, b = make_inputs(gen, 37, hkv, d, dtype, bias, device)
    out = torch.full((37, hkv), float("nan"), device=device)
    c = eviction_bias(v, A, w.to(dtype), b, out=out)
    assert c.data_ptr() == out.data_ptr() and c.dtype == torch.float32
    assert rel_err(c, reference(v, A, w.to(dtype), b)) <= TOL


@pytest.mark.parametrize("w_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("v_dtype", DTYPES, ids=DTYPE_IDS)
def test_mixed_dtypes_lose_nothing(device, gen, v_dtype, w_dtype):
    """A weight (or fp16 v) not in the dot's 16-bit type is split hi + lo: an fp32 weight with bf16 v
    stays at fp32 accuracy, not bf16's 4e-3."""
    v, A, w, b = make_inputs(gen, 19, 8, 64, v_dtype, True, device)
    A, w, b = A.to(w_dtype), w.to(w_dtype), b.to(w_dtype)
    assert rel_err(eviction_bias(v, A, w, b), reference(v, A, w, b)) <= TOL


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
    assert rel_err(eviction_bias(v, A, w, b), reference(v, A, w, b)) <= TOL


def test_out_slice_is_written_and_neighbours_kept(device, gen):
    v, A, w, b = make_inputs(gen, 11, 2, 64, torch.float32, True, device)
    buf = torch.full((20, 2), float("nan"), device=device)
    eviction_bias(v, A, w, b, out=buf[5:16])
    assert rel_err(buf[5:16], reference(v, A, w, b)) <= TOL
    assert buf[:5].isnan().all() and buf[16:].isnan().all()


SWEPT = [
    EvictionLaunchConfig(True, 16, 64, 2, 3), EvictionLaunchConfig(True, 32, 256, 4, 4),
    EvictionLaunchConfig(True, 64, 128, 8, 2), EvictionLaunchConfig(True, 128, 32, 4, 3),
    EvictionLaunchConfig(False, 4, 256, 4, 1), EvictionLaunchConfig(False, 16, 64, 4, 1),
]


@pytest.mark.parametrize("config", SWEPT, ids=lambda c: "dot" * c.use_dot + "fma" * (not c.use_dot) +
                         f"_{c.block_n}x{c.block_k}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_tile_shape_the_benchmark_sweeps(device, gen, dtype, config):
    """Ragged everywhere: 70 tokens (a partial last program), Hkv 3 (padded head columns), Hkv*d = 120
    (a partial last K step for 64-256 wide steps)."""
    v, A, w, b = make_inputs(gen, 70, 3, 40, dtype, True, device)
    out = torch.full((70, 3), float("nan"), device=device)
    launch_eviction_bias(v, A, w.to(dtype), b, out, config)
    assert rel_err(out, reference(v, A, w.to(dtype), b)) <= TOL


def test_dot_path_rejects_tiles_below_16(device, gen):
    v, A, w, b = make_inputs(gen, 5, 2, 64, torch.bfloat16, True, device)
    with pytest.raises(KernelArgumentError, match="^config:"):
        launch_eviction_bias(v, A, w, b, torch.empty(5, 2, device=device), EvictionLaunchConfig(True, 8, 64, 4, 3))


@pytest.mark.parametrize("v_dtype", DTYPES, ids=DTYPE_IDS)
def test_launch_config_needs_no_tuning_and_few_compiles(v_dtype):
    """Decode batches (1..2048 tokens) share one compiled variant, every N at most three in all, and
    every config is a tensor-core-legal dot tile."""
    for hkv, d in ((1, 64), (2, 128), (8, 128), (32, 128)):
        configs = {eviction_launch_config(n, hkv, d, v_dtype, w) for n in range(1, 1 << 17, 97)
                   for w in (v_dtype, torch.float32)}
        decode = {eviction_launch_config(n, hkv, d, v_dtype, v_dtype) for n in range(1, 2049)}
        assert len(decode) == 1 and len(configs) <= 6
        assert all(c.use_dot and c.block_n >= 16 and 16 <= c.block_k <= max(16, hkv * d) for c in configs)


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
@pytest.mark.parametrize("n", [1, 128, 4096, 32768])
@pytest.mark.parametrize("hkv", [2, 8])
@pytest.mark.parametrize("w_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("v_dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_real_sizes(gen, v_dtype, w_dtype, hkv, n):
    """Every launch-config bucket (decode, 4096, 32768) with every dtype pair, on real tensor cores."""
    v, A, w, b = make_inputs(gen, n, hkv, 128, v_dtype, True, "cuda")
    out = torch.full((n, hkv), float("nan"), device="cuda")
    eviction_bias(v, A, w.to(w_dtype), b, out=out)
    torch.cuda.synchronize()
    assert rel_err(out, reference(v, A, w.to(w_dtype), b)) <= TOL


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [16, 65536])
def test_gpu_bf16_runs_on_tensor_cores(gen, n):
    """The compiled bf16 kernel uses mma (16-token tiles) or wgmma (64-token tiles), never tf32."""
    v, A, w, b = make_inputs(gen, n, 8, 128, torch.bfloat16, True, "cuda")
    out = torch.empty(n, 8, device="cuda")
    config = eviction_launch_config(n, 8, 128, torch.bfloat16, torch.bfloat16)
    ptx = launch_eviction_bias(v, A, w.bfloat16(), b, out, config).asm["ptx"]
    assert "mma" in ptx and ".bf16" in ptx and "tf32" not in ptx
