"""Benchmark the fast path's column gather ``x[:, index]`` of a feature-major (f, n) activation.

    python eval/bench_gather.py                          # f=2048, n=16384 (d_inner 2048, batch 8 x 2048), bf16
    python eval/bench_gather.py --shape 4096x16384 --runs 64,256,128

Rows, each with its time, bandwidth and ratio to the row gather (the speed a permutation can reach):
  row gather          ``y.index_select(0, index)`` on the (n, f) transpose-sized matrix: PyTorch's vectorised gather
  index_select dim 1  PyTorch's column gather
  mom.gather          the Triton kernel the fast path uses (`mom.gather.gather_cols`)
  scatter form        a candidate: the same result written as ``out[:, inverse[j]] = x[:, j]``, so that loads are
                      contiguous and aligned and only the stores follow the permutation
The index is a routing permutation (`mom.routing.Routing` of interleaved modality runs). Every result is checked
against ``index_select``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import interleaved_modalities, measure  # noqa: E402

from mom.gather import gather_cols  # noqa: E402
from mom.routing import Routing  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _scatter_cols_kernel(x, inverse, out, F, N, stride_x, stride_out, BF: tl.constexpr, BN: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        rows = tl.program_id(1) * BF + tl.arange(0, BF)
        col_ok, row_ok = cols < N, rows < F
        dst = tl.load(inverse + cols, mask=col_ok, other=0)
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        values = tl.load(x + rows64 * stride_x + cols[None, :], mask=ok)
        tl.store(out + rows64 * stride_out + dst[None, :], values, mask=ok)


def scatter_cols(x: torch.Tensor, inverse: torch.Tensor, block_f: int = 16, block_n: int = 256) -> torch.Tensor:
    """``x[:, index]`` computed as a scatter through ``inverse`` (the inverse permutation of ``index``)."""
    f, n = x.shape
    out = torch.empty_like(x)
    grid = (-(-n // block_n), -(-f // block_f))
    _scatter_cols_kernel[grid](x, inverse, out, f, n, x.stride(0), out.stride(0), BF=block_f, BN=block_n)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2048x16384", help="FEATURESxTOKENS")
    parser.add_argument("--runs", default="64,256,128", help="modality run lengths")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        print("bench_gather: needs a CUDA device and Triton", file=sys.stderr)
        return 2
    f, n = (int(v) for v in args.shape.split("x"))
    runs = tuple(int(v) for v in args.runs.split(","))
    routing = Routing.build(interleaved_modalities(1, n, runs, "cuda"), len(runs))
    index, inverse = routing.perm, routing.inv_perm
    x = torch.randn(f, n, device="cuda", dtype=torch.bfloat16)
    rows = x.t().contiguous()  # (n, f): the same bytes, permuted by rows
    expected = x.index_select(1, index)
    candidates = {
        "row gather": lambda: rows.index_select(0, index),
        "index_select dim 1": lambda: x.index_select(1, index),
        "mom.gather": lambda: gather_cols(x, index),
        "scatter form": lambda: scatter_cols(x, inverse),
    }
    assert torch.equal(gather_cols(x, index), expected) and torch.equal(scatter_cols(x, inverse), expected)
    print(f"device: {torch.cuda.get_device_name()}  shape ({f}, {n}) bf16  runs {runs}")
    gigabytes = 2 * x.numel() * x.element_size() / 1e9  # read + write
    base = None
    for name, fn in candidates.items():
        ms, _, _ = measure(fn, iters=args.iters)
        base = base or ms
        rate = gigabytes / (ms / 1e3)
        print(f"  {name:<20} {ms * 1e3:8.1f} us  {rate:7.0f} GB/s  ({ms / base:5.2f}x the row gather)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
