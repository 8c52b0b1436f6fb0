"""Benchmark a decode step's routed projections (`mom.ops.triton.routed_rows`) against the dense one-expert GEMM they
replace, each projection of a Mamba-1 layer at the step's shapes, device time only (CUDA-graph replays).

    python benchmarks/bench_routed_rows.py                      # d_model 768, batch 1 and 64, uniform and mixed rows
    python benchmarks/bench_routed_rows.py --sweep --only x_proj --batch 1   # block / warp / stage configurations

A decode step is a few hundred small launches; `bench_generate.py` times it whole. This separates its projections:
for in_proj (d -> 2 d_inner), x_proj (d_inner -> dt_rank + 2 d_state), dt_proj (dt_rank -> d_inner) and out_proj
(d_inner -> d), rows "uniform" (every row text: one expert's weights read) and "mixed" (rows cycling through the
three modalities: every expert's weights read), it prints
  mom       `routed_rows_linear` (the kernel, its default blocks), three experts
  dense     ``F.linear`` with one weight (cuBLAS: what a dense Mamba's step runs)
and their ratio, in microseconds per call, each measured as 20 calls captured in one CUDA graph (no launch gaps).
The calls cycle through copies of the weights and inputs (`copies`: together at least twice the GPU's L2 cache), so
that each call reads its weights from memory, as in a decode step, which reads every layer's weights once. (Until the
twenty-first session every call read one set, which stayed in the L2 cache: those figures in docs/performance.md
are of L2-resident weights, and a tiling chosen on them did not change the captured step's time.) Mixed rows must
read every expert's weights, three times the bytes of uniform rows; their line also prints
  bytes     ``F.linear`` with the three experts' weights as one (cuBLAS reading the same weight bytes)
and mom's time over it: how far the mixed rows' cost is the extra bytes rather than the kernel.
``--sweep`` times the kernel at each of `SWEEP`'s tilings (block of outputs, block of k) on uniform and on mixed rows
and prints, per block of outputs, the tiling with the lowest sum of the two; each configuration of each shape is a
Triton compilation (about a second), so sweep a few shapes at a time (``--only``, ``--batch``). Every kernel output
is checked against the PyTorch ops first.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mom.ops.triton import routed_rows

CALLS = 20  # calls captured per graph; a replay's time / CALLS is one call's device time
# --sweep's grid: block of outputs, block of k (`routed_rows.Blocks`; the library's default:
# `routed_rows.default_blocks`); --sweep-launch adds warps and software-pipelining stages (else Triton's defaults)
SWEEP = list(itertools.product((16, 32, 64, 128), (32, 64, 128, 256)))
SWEEP_LAUNCH = list(itertools.product((2, 4, 8), (2, 3, 4)))
EXPERTS = 3


def copies(set_bytes: int) -> int:
    """How many copies of a call's operands (``set_bytes`` each) together fill twice the GPU's L2 cache, so that a call
    cycling through them finds its own evicted by the others (at least 2)."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 * 2**20)
    return max(2, -(-2 * l2 // set_bytes))


def graph_us(fns: Sequence[Callable[[], object]], replays: int = 50) -> float:
    """Device microseconds per call: CALLS calls cycling through ``fns`` (the same call on different copies of its
    operands) captured in a CUDA graph, replayed ``replays`` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * CALLS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--batch", type=int, action="append", help="rows (repeatable; default 1 and 64)")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's configurations (SWEEP), uniform "
                        "and mixed rows")
    parser.add_argument("--sweep-launch", action="store_true", help="with --sweep: each configuration also at every "
                        "warps / stages of SWEEP_LAUNCH (many more compilations)")
    parser.add_argument("--only", action="append", choices=("in_proj", "x_proj", "dt_proj", "out_proj"),
                        help="these projections only (repeatable; default all four)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or routed_rows._kernel() is None:
        print("bench_routed_rows: needs a CUDA device and Triton", file=sys.stderr)
        return 2
    d = args.d_model
    d_inner, d_state, dt_rank = 2 * d, 16, -(-d // 16)  # Mamba's expand 2, d_state 16, dt_rank ceil(d / 16)
    shapes = {"in_proj": (d, 2 * d_inner, False), "x_proj": (d_inner, dt_rank + 2 * d_state, False),
              "dt_proj": (dt_rank, d_inner, True), "out_proj": (d_inner, d, False)}
    print(f"device: {torch.cuda.get_device_name()}  d_model {d}  bf16  {EXPERTS} experts  "
          f"device time per call (CUDA graph of {CALLS} calls)")
    shapes = {k: v for k, v in shapes.items() if not args.only or k in args.only}
    for batch, (name, (n_in, n_out, bias)) in itertools.product(args.batch or [1, 64], shapes.items()):
        torch.manual_seed(0)
        sets = [operands(batch, n_in, n_out, bias)
                for _ in range(copies(EXPERTS * (n_out * n_in + n_out + batch * n_in) * 2))]  # bf16
        x, weights, biases = sets[0]
        dense_us = graph_us([functools.partial(F.linear, x, w[0], None if b is None else b[0]) for x, w, b in sets])
        cat = [(x, torch.cat(w), None if b is None else torch.cat(b)) for x, w, b in sets]
        bytes_us = graph_us([functools.partial(F.linear, *args) for args in cat])
        del cat
        ids_of = {"uniform": torch.zeros(batch, dtype=torch.long, device="cuda"),
                  "mixed": torch.arange(batch, device="cuda") % EXPERTS}
        want = {rows: routed_rows.routed_rows_linear(x, weights, biases, ids, use_kernel=False)
                for rows, ids in ids_of.items()}
        for rows, ids in ids_of.items():
            got = routed_rows.routed_rows_linear(x, weights, biases, ids, use_kernel=True)
            torch.testing.assert_close(got, want[rows], rtol=2e-2, atol=2e-2)
            mom_us = graph_us([functools.partial(routed_rows.routed_rows_linear, x, w, b, ids, use_kernel=True)
                               for x, w, b in sets])
            same_bytes = (f"  bytes {bytes_us:7.2f} us  ratio {mom_us / bytes_us:5.2f}x" if rows == "mixed" else "")
            print(f"batch {batch:3d}  {name:<9} {n_in:5d} -> {n_out:5d}  {rows:<8}  mom {mom_us:7.2f} us  "
                  f"dense {dense_us:7.2f} us  ratio {mom_us / dense_us:5.2f}x" + same_bytes)
        if args.sweep:
            sweep(sets, ids_of, want, dense_us, args.sweep_launch)
    return 0


def operands(batch: int, n_in: int, n_out: int, bias: bool):
    """One copy of a call's operands: x (batch, n_in), the experts' weights (n_out, n_in) and biases or None, bf16."""
    weights = [torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in**0.5 for _ in range(EXPERTS)]
    biases = [torch.randn(n_out, device="cuda", dtype=torch.bfloat16) for _ in range(EXPERTS)] if bias else None
    return torch.randn(batch, n_in, device="cuda", dtype=torch.bfloat16), weights, biases


def sweep(sets, ids_of: dict, want: dict, dense_us: float, with_launch: bool) -> None:
    """Time each tiling of `SWEEP` (and `SWEEP_LAUNCH`) on uniform and on mixed rows; print, per block of outputs,
    the tiling with the lowest sum of the two, then the one the library picks (`default_blocks`)."""
    best: dict[int, tuple[float, dict, routed_rows.Blocks]] = {}  # block of outputs -> (sum, us per rows, tiling)
    for (block_out, block_k), (warps, stages) in itertools.product(SWEEP, SWEEP_LAUNCH if with_launch
                                                                    else [(None, None)]):
        blocks = routed_rows.Blocks(block_out, block_k, warps, stages)
        times = {}
        for rows, ids in ids_of.items():
            calls = [functools.partial(routed_rows.routed_rows_linear, x, w, b, ids, use_kernel=True, blocks=blocks)
                     for x, w, b in sets]
            try:
                y = calls[0]()
                torch.cuda.synchronize()
            except Exception:  # a configuration this GPU cannot run (shared memory): skipped
                break
            torch.testing.assert_close(y, want[rows], rtol=2e-2, atol=2e-2)
            times[rows] = graph_us(calls)
        if len(times) < len(ids_of):
            continue
        total = sum(times.values())
        if block_out not in best or total < best[block_out][0]:
            best[block_out] = (total, times, blocks)
    for block_out, (_, times, blocks) in sorted(best.items()):
        print(f"           out {block_out:3d} best: uniform {times['uniform']:7.2f} us  mixed {times['mixed']:7.2f} us"
              f"  (mixed / uniform {times['mixed'] / times['uniform']:5.2f}x, uniform / dense "
              f"{times['uniform'] / dense_us:5.2f}x)  {blocks}")
    x, weights, _ = sets[0]
    print(f"           library's pick: {routed_rows.default_blocks(x.shape[1], weights[0].shape[0], x.shape[0])}")


if __name__ == "__main__":
    raise SystemExit(main())
