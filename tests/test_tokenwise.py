"""`mom.tokenwise`: each token's column through its own expert, against the definition (a loop over tokens)."""

import pytest
import torch

from mom.tokenwise import tokenwise_linear


def _ids(n: int, runs=(64, 37, 100, 5), experts=(0, 1, 2, 1)) -> torch.Tensor:
    """Runs of modalities as the fast path sees them: long runs, short ones, tiles spanning two or three experts."""
    row = []
    while len(row) < n:
        for length, e in zip(runs, experts):
            row += [e] * length
    return torch.tensor(row[:n])


def _definition(w, x, ids, bias=None):
    cols = [w[e] @ x[:, t] + (0 if bias is None else bias[e]) for t, e in enumerate(ids.tolist())]
    return torch.stack(cols, 1)


def test_tokenwise_linear_on_cpu_matches_the_definition():
    w, x = torch.randn(3, 6, 5, dtype=torch.float64), torch.randn(5, 300, dtype=torch.float64)
    bias, ids = torch.randn(3, 6, dtype=torch.float64), _ids(300)
    torch.testing.assert_close(tokenwise_linear(w, x, ids), _definition(w, x, ids))
    torch.testing.assert_close(tokenwise_linear(w, x, ids, bias), _definition(w, x, ids, bias))
    out = torch.randn(6, 300, dtype=torch.float64)
    want = out + _definition(w, x, ids)
    assert tokenwise_linear(w, x, ids, out=out, accumulate=True) is out
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="do not fit"):
        tokenwise_linear(w, x[:4], ids)
    with pytest.raises(ValueError, match="accumulate needs out"):
        tokenwise_linear(w, x, ids, accumulate=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 96, 2048, 4096), (3, 2048, 64, 4096), (3, 160, 4096, 1000), (2, 300, 50, 7)])
def test_tokenwise_kernel_matches_the_reference(shape, dtype):
    """The Triton kernel vs one GEMM per expert (fp64 on the same operands), for the fast path's shapes (few
    outputs and a long K, many outputs and a short K), transposed weights, biases, accumulation, and layouts with
    an absent expert and with one expert only."""
    M, O, K, n = shape
    w = torch.randn(M, O, K, device="cuda", dtype=dtype) / K**0.5
    wt = torch.randn(M, K, O, device="cuda", dtype=dtype).transpose(1, 2) / K**0.5  # as the input gradients read
    x = torch.randn(K, 2 * n, device="cuda", dtype=dtype)[:, :n]  # a row stride larger than n
    bias = torch.randn(M, O, device="cuda", dtype=dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    for ids in (_ids(n).cuda() % M, torch.zeros(n, dtype=torch.long, device="cuda"),
                torch.where(_ids(n).cuda() == 1, 0, _ids(n).cuda()) % M):
        for weight in (w, wt):
            torch.testing.assert_close(tokenwise_linear(weight, x, ids).double(), _per_expert(weight, x, ids), **tol)
            torch.testing.assert_close(tokenwise_linear(weight, x, ids, bias).double(),
                                       _per_expert(weight, x, ids, bias), **tol)
            out = torch.randn(O, n, device="cuda", dtype=dtype)
            want = _per_expert(weight, x, ids) + out.double()
            tokenwise_linear(weight, x, ids, out=out, accumulate=True)
            torch.testing.assert_close(out.double(), want, **tol)


def _per_expert(w, x, ids, bias=None):
    """fp64, one GEMM per expert on its tokens' columns."""
    r = torch.zeros(w.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for m in range(w.shape[0]):
        cols = (ids == m).nonzero().squeeze(1)
        r[:, cols] = w[m].double() @ x[:, cols].double()
        if bias is not None:
            r[:, cols] += bias[m].double()[:, None]
    return r
