"""Column gather ``out[:, j] = x[:, index[j]]`` for the fast path's feature-major ``(f, n)`` activations.

PyTorch's ``index_select(1, ...)`` on CUDA runs a generic scatter/gather kernel that moved a (2048, 16384) bf16
matrix at about half the speed of a row gather (measured on an H100: 104 us vs 47 us per 64 MiB; see
docs/performance.md). This Triton kernel copies tiles of ``BLOCK_F`` rows x ``BLOCK_N`` columns: each row of a tile
reads ``x[f, index[j0:j0+BLOCK_N]]``, which is contiguous wherever the index runs are (modalities come in runs, so a
routing permutation is mostly long runs), and writes a contiguous row segment. Elsewhere (CPU, no Triton) it is
``index_select``.
"""

from __future__ import annotations

from functools import cache

import torch

# Tile: 4 rows x 1024 columns per program (4 warps), a 2 KiB contiguous row segment. Chosen by
# `python eval/bench_gather.py --sweep` on an H200 for a (2048, 16384) bf16 matrix: 44 us (1.09x a row gather of the
# same bytes), against 57 us for 8 x 512, 86 us for 16 x 256 (the earlier choice) and 154-177 us for 32-128 rows.
BLOCK_F, BLOCK_N = 4, 1024


@cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def gather_cols_kernel(x, index, out, F, N, stride_x, stride_out, BF: tl.constexpr, BN: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        rows = tl.program_id(1) * BF + tl.arange(0, BF)
        col_ok, row_ok = cols < N, rows < F
        src = tl.load(index + cols, mask=col_ok, other=0)
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        values = tl.load(x + rows64 * stride_x + src[None, :], mask=ok)
        tl.store(out + rows64 * stride_out + cols[None, :], values, mask=ok)

    return gather_cols_kernel


def gather_cols(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (f, n) with unit column stride; index: (m,) int64 -> (f, m) contiguous, ``x[:, index]``."""
    kernel = _kernel() if x.is_cuda else None
    if kernel is None or x.stride(1) != 1:
        return x.index_select(1, index)
    f, m = x.shape[0], index.shape[0]
    out = x.new_empty(f, m)
    if out.numel():
        grid = (-(-m // BLOCK_N), -(-f // BLOCK_F))
        kernel[grid](x, index, out, f, m, x.stride(0), out.stride(0), BF=BLOCK_F, BN=BLOCK_N)
    return out
