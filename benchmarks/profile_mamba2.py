"""Where the Mamba-2 MoM layer's GPU time goes: the top CUDA kernels of one fwd+bwd, beside mamba-ssm's `Mamba2`.

    python benchmarks/profile_mamba2.py                        # 8x2048x1024, runs 64/256/128, sorted stream
    python benchmarks/profile_mamba2.py --shape 4x4096x2048 --rows 30
    python benchmarks/profile_mamba2.py --host                 # host time per step against wall time

Complements benchmarks/bench_mamba2.py (the totals) as benchmarks/profile_layer.py does for Mamba-1. ``--host``
prints, as benchmarks/profile_lm.py does for a whole LM step, each side's host syncs, its wall time per step next to
the host's time to enqueue it (where the two are about equal the layer is bound by the host, and its kernels' time,
the default table's total, does not decide its speed), and where the host's time goes (cProfile of one step).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import DEFAULT_RUNS, interleaved_modalities, layer_inputs, profiled  # noqa: E402
from bench_mamba2 import dense_mamba2, mom_mamba2, train_step  # noqa: E402
from profile_lm import host_profile, host_view  # noqa: E402

from mom.model.routing import Routing  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8x2048x1024", help="BATCHxLENGTHxD_MODEL")
    parser.add_argument("--runs", default=",".join(map(str, DEFAULT_RUNS)), help="modality run lengths")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--host", action="store_true",
                        help="instead of the kernels: host syncs, wall vs enqueue time per step, cProfile of a step")
    parser.add_argument("--steps", type=int, default=5, help="steps timed for wall vs enqueue (--host)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_mamba2: needs a CUDA device", file=sys.stderr)
        return 2
    b, l, d = (int(v) for v in args.shape.split("x"))
    runs = tuple(int(v) for v in args.runs.split(","))
    routing = Routing.build(interleaved_modalities(b, l, runs, "cuda"), len(runs))
    routing.set_counts(tuple(routing.device_counts.tolist()))
    x, grad = layer_inputs(b, l, d)
    steps = {"mamba-ssm Mamba2 (dense)": train_step(dense_mamba2(d), None, x, grad),
             "MoM, fast, sorted stream": train_step(mom_mamba2(len(runs), d, ("in_proj", "out_proj")), routing, x,
                                                    grad, sorted_tokens=True)}
    for name, step in steps.items():
        if args.host:
            print(f"\n=== {name} ===")
            host_view(step, args.steps)
            host_profile(step, args.rows)
            continue
        prof = profiled(step, 5)
        print(f"\n=== {name}: CUDA time per kernel over 5 steps ===")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
