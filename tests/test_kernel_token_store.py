"""kernels.token_store (tokens' K/V into run-layout buffers, also pinned host memory) equals its torch
statement bit for bit on buffers full of random values (an unwritten or misplaced store shows).
CPU: the kernel under TRITON_INTERPRET=1; GPU (marked): CUDA tokens into pinned host runs."""

from __future__ import annotations

import pytest
import torch

from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels.pinned import alloc_pinned
from nosa_sglang.kernels.token_store import store_tokens, store_tokens_torch


def case(gen, n, H, d, bs, dtype, in_dtype):
    R = n * H * 2 + 3
    runs_k, runs_v = (torch.randn(R, bs * d, generator=gen).to(dtype) for _ in range(2))
    runs = torch.randperm(R, generator=gen)[: n * H].view(n, H)  # distinct targets
    offsets = torch.randint(0, bs, (n,), generator=gen)
    k, v = (torch.randn(n, H, d, generator=gen).to(in_dtype) for _ in range(2))
    return runs_k, runs_v, runs, offsets, k, v


@pytest.mark.parametrize("dtype, in_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16)])
@pytest.mark.parametrize("n, H, d", [(5, 2, 16), (1, 1, 64), (7, 8, 24)])
def test_kernel_equals_torch_statement(gen, dtype, in_dtype, n, H, d):
    from nosa_sglang.kernels._dispatch import interpret_mode

    if not interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    rk, rv, runs, off, k, v = case(gen, n, H, d, 8, dtype, in_dtype)
    want = (rk.clone(), rv.clone())
    store_tokens_torch(*want, runs, off, k, v)
    got = (rk.clone(), rv.clone())
    store_tokens(*got, runs, off, k, v, impl="triton")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(want[0], rk), "the case must change something"
    back = want[0].view(rk.shape[0], -1, d)[runs, off.view(-1, 1)]
    assert torch.equal(back, k.to(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_cuda_tokens_reach_pinned_host_runs(gen):
    rk, rv, runs, off, k, v = case(gen, 300, 8, 128, 64, torch.bfloat16, torch.bfloat16)
    host = [alloc_pinned(rk.shape, rk.dtype) for _ in range(2)]
    for h, x in zip(host, (rk, rv)):
        h.copy_(x)
    store_tokens(*host, runs.cuda(), off.cuda(), k.cuda(), v.cuda())
    torch.cuda.synchronize()
    want = (rk.clone(), rv.clone())
    store_tokens_torch(*want, runs, off, k, v)
    assert torch.equal(host[0], want[0]) and torch.equal(host[1], want[1])


def test_bad_arguments_name_the_field(gen):
    rk, rv, runs, off, k, v = case(gen, 3, 2, 16, 8, torch.float32, torch.float32)
    with pytest.raises(KernelArgumentError, match=r"runs, offsets: expected \[3, 2\] and \[3\]"):
        store_tokens(rk, rv, runs[:2], off, k, v)
    with pytest.raises(KernelArgumentError, match="v_runs: expected"):
        store_tokens(rk, rv[:-1], runs, off, k, v)
    with pytest.raises(KernelArgumentError, match="k_runs: expected a contiguous"):
        store_tokens(rk[:, :-1], rv[:, :-1], runs, off, k, v)
    with pytest.raises(KernelArgumentError, match="impl: must be one of"):
        store_tokens(rk, rv, runs, off, k, v, impl="cuda")
