"""Where a MoM mixer layer's GPU time goes: the top CUDA kernels of one fwd+bwd, next to mamba-ssm's fused layer.

    python benchmarks/profile_layer.py                       # 8x2048x1024, runs 64/256/128
    python benchmarks/profile_layer.py --shape 4x4096x2048 --rows 30

Complements benchmarks/bench_layer.py (which gives the totals): this attributes them to kernels (copies, gathers,
GEMMs, the scan, the conv), the input to deciding what a fused path must remove.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import DEFAULT_RUNS, interleaved_modalities, layer_inputs, mom_mixer, profiled  # noqa: E402

import mom  # noqa: E402
from mom.model.config import PROJECTIONS  # noqa: E402
from mom.model.routing import Routing  # noqa: E402


def profile_step(name: str, step, rows: int) -> None:
    prof = profiled(step, 5)
    print(f"\n=== {name}: CUDA time per kernel over 5 steps ===")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8x2048x1024", help="BATCHxLENGTHxD_MODEL")
    parser.add_argument("--runs", default=",".join(map(str, DEFAULT_RUNS)), help="modality run lengths")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_layer: needs a CUDA device", file=sys.stderr)
        return 2
    from mamba_ssm.modules.mamba_simple import Mamba

    b, l, d = (int(v) for v in args.shape.split("x"))
    runs = tuple(int(v) for v in args.runs.split(","))
    modality_ids = interleaved_modalities(b, l, runs, "cuda")
    dense = Mamba(d, d_state=16, d_conv=4, expand=2).cuda()
    routing = Routing.build(modality_ids, len(runs))
    x, grad = layer_inputs(b, l, d)

    def step(layer, *extra, **options):
        def run() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x, *extra, **options)
            y.backward(grad)
            layer.zero_grad(set_to_none=True)  # as a training step leaves them (as bench_layer.py does)
            x.grad = None

        return run

    print("device:", torch.cuda.get_device_name(), "backend:", mom.ops.backend.backend_name(x.device))
    profile_step("MoM mixer", step(mom_mixer(len(runs), d, PROJECTIONS), routing), args.rows)
    profile_step("MoM mixer, sorted stream (as the LM runs it)",
                 step(mom_mixer(len(runs), d, PROJECTIONS), routing, sorted_tokens=True), args.rows)
    profile_step("mom mixer, decouple=()", step(mom_mixer(len(runs), d, ()), routing), args.rows)
    profile_step("mamba-ssm fused Mamba", step(dense), args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
