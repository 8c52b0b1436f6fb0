"""`mom.ops.grouped`: routed GEMMs over rows sorted by expert, grouped on the device's block ends or one per expert
on the host's blocks, forward and weight gradients, on CPU (the GPU tests: tests/ops/test_cuda.py)."""

import pytest
import torch

from mom.ops import grouped


def test_grouped_mm_applies_only_to_16_byte_aligned_operands():
    """Each of `grouped_mm_applies`' rules, on bf16 operands: every case after the first two breaks one."""
    if not grouped.grouped_mm_supported(torch.device("cpu"), torch.bfloat16, torch.bfloat16):
        pytest.skip("this torch has no CPU torch._grouped_mm")
    bf = torch.bfloat16
    rows, w = torch.randn(8, 32, dtype=bf), torch.randn(3, 16, 32, dtype=bf).transpose(1, 2)  # (n, i), (k, i, o)
    assert grouped.grouped_mm_applies(rows, w)
    assert grouped.grouped_mm_applies(torch.randn(8, 48, dtype=bf)[:, :32], w)  # row stride 96 bytes
    assert not grouped.grouped_mm_applies(torch.randn(8, 36, dtype=bf)[:, :32], w)  # row stride 72 bytes
    assert not grouped.grouped_mm_applies(torch.randn(8 * 32 + 1, dtype=bf)[1:].view(8, 32), w)  # base + 2 bytes
    assert not grouped.grouped_mm_applies(torch.randn(32, 8, dtype=bf).t(), w)  # rows not row-major
    assert not grouped.grouped_mm_applies(torch.randn(8, 36, dtype=bf), torch.randn(3, 36, 16, dtype=bf))  # inner 72 B
    assert not grouped.grouped_mm_applies(rows, torch.randn(3, 32, 12, dtype=bf))  # output size 24 bytes
    assert not grouped.grouped_mm_applies(rows, torch.randn(3, 32, 32, dtype=bf)[:, :, ::2])  # no unit stride
    assert not grouped.grouped_mm_applies(rows, torch.randn(3 * 32 * 16 + 1, dtype=bf)[1:].view(3, 32, 16))  # base
    assert not grouped.grouped_mm_applies(rows, w.float())  # dtypes that differ


@pytest.mark.parametrize("counts", [(7, 12, 5), (0, 9, 0)])
def test_grouped_gemm_matches_per_expert_gemms(counts):
    """`grouped_gemm`: ONE torch._grouped_mm for bf16 aligned row-major rows (what autocast gives on GPU; torch
    has a CPU version too), else a GEMM per expert (transposed rows, fp64, a bias); each block of rows gets its
    expert's weight and bias."""
    torch.manual_seed(0)
    n = sum(counts)
    ends = torch.tensor(counts).cumsum(0)
    blocks = tuple((int(e) - c, int(e)) for e, c in zip(ends, counts))
    offsets = ends.to(torch.int32)
    for dtype in (torch.bfloat16, torch.float64):
        tol = {"atol": 5e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}  # bf16 sums in another order
        w = torch.randn(3, 24, 16, dtype=dtype).transpose(1, 2)  # (k, i, o) views of (k, o, i) weights
        bias = torch.randn(3, 24, dtype=dtype)
        for rows in (torch.randn(n, 16, dtype=dtype), torch.randn(16, 64, dtype=dtype)[:, :n].t()):
            one_gemm = dtype == torch.bfloat16 and rows.stride(1) == 1 and hasattr(torch, "_grouped_mm")
            assert grouped.grouped_mm_applies(rows, w) == one_gemm
            want = torch.cat([rows[lo:hi] @ w[m] for m, (lo, hi) in enumerate(blocks)])
            torch.testing.assert_close(grouped.grouped_gemm(rows, w, None, blocks, offsets), want, **tol)
            with_bias = torch.cat([rows[lo:hi] @ w[m] + bias[m] for m, (lo, hi) in enumerate(blocks)])
            torch.testing.assert_close(grouped.grouped_gemm(rows, w, bias, blocks, offsets), with_bias, **tol)
            if one_gemm:  # blocks unknown on the host: grouped on the offsets alone, a bias and an fp32 output too
                torch.testing.assert_close(grouped.grouped_gemm(rows, w, bias, None, offsets), with_bias, **tol)
                fp32 = grouped.grouped_gemm(rows, w, None, None, offsets, out_dtype=torch.float32)
                assert fp32.dtype == torch.float32
                torch.testing.assert_close(fp32, want.float(), **tol)
            else:
                with pytest.raises(ValueError, match="blocks are unknown on the host"):
                    grouped.grouped_gemm(rows, w, None, None, offsets)


@pytest.mark.parametrize("counts", [(7, 12, 5), (0, 9, 0), (8, 0, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grads_grouped_along_the_tokens_match_per_expert_gemms(counts, dtype):
    """`weight_grads` without host blocks: ONE torch._grouped_mm grouped along the tokens (torch has a CPU
    version, fp32 too), cast to the parameters' dtype; the same per-expert dW and db as one GEMM per block, an empty
    block's exactly zero. Operands as the backward has them: d (o, n) a transposed view, x (n, i) rows."""
    torch.manual_seed(0)
    n = sum(counts)
    ends = torch.tensor(counts).cumsum(0)
    blocks = tuple((int(e) - c, int(e)) for e, c in zip(ends, counts))
    offsets = ends.to(torch.int32)
    d_rows, x_rows = torch.randn(n, 24, dtype=dtype), torch.randn(n, 16, dtype=dtype)
    assert grouped.grouped_mm_k_applies(d_rows.t(), x_rows)
    assert not grouped.grouped_mm_k_applies(d_rows.t().contiguous(), x_rows)  # the tokens not the strided dimension
    assert not grouped.grouped_mm_k_applies(d_rows.t().double(), x_rows.double())
    tol = {"atol": 5e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    want_w, want_b = grouped.weight_grads(d_rows.t(), x_rows.t(), blocks, True, torch.float32)
    g_w, g_b = grouped.weight_grads(d_rows.t(), x_rows.t(), None, True, torch.float32, offsets)
    assert g_w.dtype == g_b.dtype == torch.float32 and g_w.is_contiguous() and g_b.is_contiguous()
    torch.testing.assert_close(g_w, want_w, **tol)
    torch.testing.assert_close(g_b, want_b, **tol)
    for m, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(g_w[m]) == 0 and torch.count_nonzero(g_b[m]) == 0
