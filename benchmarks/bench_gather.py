"""Benchmark the fast path's layout gathers (`mom.ops.triton.gather`): a routing permutation plus a transpose.

    python benchmarks/bench_gather.py                          # (16384 tokens, 4096 features) bf16, runs 64/256/128
    python benchmarks/bench_gather.py --shape 16384x2048 --runs 64,256,128

Rows, each with its time, bandwidth and ratio to the row gather (what a permutation without a transpose costs):
  row gather             ``x.index_select(0, index)`` of a token-major (n, f) matrix: PyTorch's vectorised gather
  rows -> columns        `mom.ops.triton.gather.gather_rows_t` (a routed GEMM's output to the scan's layout)
  columns -> rows        `mom.ops.triton.gather.gather_cols_t` (the scan's output to a routed GEMM's input)
  PyTorch, rows -> cols  ``x.index_select(0, index).t().contiguous()``: the same result in two passes
The index is a routing permutation (`mom.model.routing.Routing` of interleaved modality runs). Every result is checked
against PyTorch's.

Where causal-conv1d is installed, three more rows time a prefill's conv input (sequences of --length tokens, width
4), each writing the cache's conv window (the last 4 inputs of each sequence) as a prefill does:
  gather + causal-conv1d  ``gather_rows_t``, ``causal_conv1d_fn(..., activation="silu")``, the window copied from x
  conv from rows          `mom.ops.triton.conv_rows.conv_rows_t` with the window: reads x's windows through the index
  ... without the window  the same kernel asked for no window (a training forward's conv needs none)
and the ratio of the second to the first.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import fastest, interleaved_modalities, measure, print_fastest  # noqa: E402

from mom.model.routing import Routing  # noqa: E402
from mom.ops.triton.gather import gather_cols_t, gather_rows_t  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="16384x4096", help="TOKENSxFEATURES")
    parser.add_argument("--runs", default="64,256,128", help="modality run lengths")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--length", type=int, default=2048, help="sequence length of the conv rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gather: needs a CUDA device", file=sys.stderr)
        return 2
    n, f = (int(v) for v in args.shape.split("x"))
    runs = tuple(int(v) for v in args.runs.split(","))
    routing = Routing.build(interleaved_modalities(1, n, runs, "cuda"), len(runs))
    index = routing.perm
    rows = torch.randn(n, f, device="cuda", dtype=torch.bfloat16)
    cols = rows.t().contiguous()  # the same values, feature-major
    expected = rows.index_select(0, index)  # (n, f)
    candidates = {
        "row gather": (lambda: rows.index_select(0, index), expected),
        "rows -> columns": (lambda: gather_rows_t(rows, index), expected.t()),
        "columns -> rows": (lambda: gather_cols_t(cols, index), expected),
        "PyTorch, rows -> cols": (lambda: rows.index_select(0, index).t().contiguous(), expected.t()),
    }
    print(f"device: {torch.cuda.get_device_name()}  ({n}, {f}) bf16  runs {runs}")
    gigabytes = 2 * rows.numel() * rows.element_size() / 1e9  # read + write
    base = None
    for name, (fn, want) in candidates.items():
        if not torch.equal(fn(), want):
            print(f"  {name:<22} WRONG RESULT")
            return 1
        ms, _, _ = measure(fn, iters=args.iters)
        base = base or ms
        rate = gigabytes / (ms / 1e3)
        print(f"  {name:<22} {ms * 1e3:8.1f} us  {rate:7.0f} GB/s  ({ms / base:5.2f}x the row gather)")
    return _conv(rows, routing.inv_perm, args)


def _conv(rows: torch.Tensor, inv: torch.Tensor, args) -> int:
    """The conv from sorted rows (one pass) against the gather and causal-conv1d (two), on the same inputs; ``inv``:
    each sequence-order token's sorted row (`Routing.inv_perm`)."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        print("  (causal-conv1d not installed: no conv rows)")
        return 0
    from mom.ops.triton.conv_rows import conv_rows_t, write_window

    n, f = rows.shape
    l = args.length
    if n % l:
        print(f"  (no conv rows: {n} tokens are not whole sequences of --length {l})")
        return 0
    b = n // l
    weight, bias = torch.randn(f, 4, device=rows.device, dtype=rows.dtype), torch.randn(f, device=rows.device,
                                                                                          dtype=rows.dtype)
    window, want_window = (torch.empty(b, f, 4, device=rows.device, dtype=rows.dtype) for _ in range(2))

    def two_passes():
        x = gather_rows_t(rows, inv).view(f, b, l).permute(1, 0, 2)  # (b, f, l)
        write_window(want_window, x)
        return causal_conv1d_fn(x, weight, bias, activation="silu")

    def one_pass():
        return conv_rows_t(rows, inv, l, weight, bias, window=window)

    def no_window():
        return conv_rows_t(rows, inv, l, weight, bias)

    got, want = one_pass().view(f, b, l).permute(1, 0, 2), two_passes()
    if (not torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2) or not torch.equal(window, want_window)
            or not torch.equal(no_window(), one_pass())):
        print("  conv from rows         WRONG RESULT")
        return 1
    times = fastest({"gather + causal-conv1d": two_passes, "conv from rows": one_pass,
                     "... without the window": no_window}, iters=args.iters)
    print_fastest(times, "conv from rows", "gather + causal-conv1d", f"  (sequences of {l})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
