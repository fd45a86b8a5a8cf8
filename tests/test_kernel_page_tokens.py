"""kernels.page_tokens (a sequence read token-major from a run-layout pool's pages in one pass) equals the
gather of whole runs and the transpose, bit for bit, on pools full of random values (a token read from
the wrong page, offset or head shows); CPU through the interpreter, GPU through the compiled kernel."""

from __future__ import annotations

import pytest
import torch

from nosa_sglang.kernels._checks import KernelArgumentError
from nosa_sglang.kernels._dispatch import interpret_mode
from nosa_sglang.kernels.page_tokens import read_page_tokens, read_page_tokens_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pool(gen, pages, H, bs, d, dtype):
    runs = pages * H + 1
    k, v = (torch.randn(runs, bs * d, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    return k, v, torch.randn(runs, bs, generator=gen).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H, bs, d, n_tokens", [(2, 16, 16, 70), (8, 64, 64, 64 * 5), (1, 8, 24, 1), (3, 12, 16, 25)])
@pytest.mark.parametrize("with_v", [True, False])
def test_kernel_equals_gather_and_transpose(gen, dtype, H, bs, d, n_tokens, with_v):
    if DEVICE == "cpu" and not interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1 (set by the test command on machines without CUDA)")
    k_runs, v_runs, c_runs = pool(gen, 20, H, bs, d, dtype)
    nb = -(-n_tokens // bs)
    pages = torch.randperm(20, generator=gen)[: nb + 1].to(DEVICE)  # any pages, one more than needed
    got = read_page_tokens(k_runs, v_runs if with_v else None, c_runs, pages, n_tokens, H, impl="triton")
    want = read_page_tokens_torch(k_runs, v_runs if with_v else None, c_runs, pages, n_tokens, H)
    assert got[0].shape == (n_tokens, H, d) and got[2].shape == (n_tokens, H)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert (got[1] is None) == (not with_v) and (not with_v or torch.equal(got[1], want[1]))
    t, h = n_tokens - 1, H - 1  # the last token, by hand
    page = int(pages[t // bs])
    assert torch.equal(got[0][t, h], k_runs[page * H + h].view(bs, d)[t % bs])
    assert got[2][t, h] == c_runs[page * H + h, t % bs]


def test_argument_errors_name_the_argument():
    k = torch.zeros(9, 16 * 4)
    c = torch.zeros(9, 16)
    with pytest.raises(KernelArgumentError, match="pages: 1 pages hold fewer than n_tokens=20"):
        read_page_tokens(k, None, c, torch.zeros(1, dtype=torch.long), 20, 2)
    with pytest.raises(KernelArgumentError, match="c_runs"):
        read_page_tokens(k, None, torch.zeros(8, 16), torch.zeros(2, dtype=torch.long), 20, 2)
    with pytest.raises(KernelArgumentError, match="k_runs"):
        read_page_tokens(torch.zeros(9, 17), None, c, torch.zeros(2, dtype=torch.long), 20, 2)
