"""Benchmark the routed GEMMs (`mom.routed_mm`) against one dense cuBLAS GEMM of the same shape.

    python eval/bench_routed_mm.py                          # in_proj and out_proj of the two layer shapes
    python eval/bench_routed_mm.py --shape 8x2048x1024 --runs 64,256,128

A MoM projection does the FLOPs of a dense one; the routed kernels pick each token tile's expert by its modality.
For the six GEMMs of in_proj and out_proj in one fwd+bwd (forward, input gradient, weight gradient), prints the
dense GEMM's time (bf16, the layout mamba-ssm uses), the routed one's and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import interleaved_modalities, measure  # noqa: E402

from mom.routed_mm import _kernels, routed_mm, routed_wgrad, run_tiles  # noqa: E402


def bench_shape(batch: int, length: int, d_model: int, runs: tuple[int, ...], iters: int) -> None:
    M, n, di = len(runs), batch * length, 2 * d_model
    tiles = run_tiles(interleaved_modalities(batch, length, runs, "cuda"), M)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    h = torch.randn(n, d_model, **bf)  # token-major in_proj input / out_proj output
    xz, y = torch.randn(2 * di, n, **bf), torch.randn(di, n, **bf)  # feature-major
    w_in, w_out = torch.randn(M, 2 * di, d_model, **bf) / 32, torch.randn(M, d_model, di, **bf) / 45
    o = torch.empty(n, d_model, **bf)
    f32 = torch.float32
    cases = {  # name: (dense GEMM, routed GEMM)
        "in_proj fwd": (lambda: w_in[0] @ h.t(), lambda: routed_mm(w_in, h.t(), tiles)),
        "in_proj dgrad": (lambda: torch.mm(xz.t(), w_in[0], out=o),
                          lambda: routed_mm(w_in.transpose(1, 2), xz, tiles, out=o.t())),
        "in_proj wgrad": (lambda: (xz @ h).to(f32), lambda: routed_wgrad(xz, h.t(), tiles, f32)),
        "out_proj fwd": (lambda: torch.mm(y.t(), w_out[0].t(), out=o),
                         lambda: routed_mm(w_out, y, tiles, out=o.t())),
        "out_proj dgrad": (lambda: w_out[0].t() @ h.t(), lambda: routed_mm(w_out.transpose(1, 2), h.t(), tiles)),
        "out_proj wgrad": (lambda: (h.t() @ y.t()).to(f32), lambda: routed_wgrad(h.t(), y, tiles, f32)),
    }
    print(f"shape b={batch} l={length} d_model={d_model} runs={runs}: {tiles.num_tiles} tiles of {tiles.block}")
    total = [0.0, 0.0]
    for name, (dense, routed) in cases.items():
        t_dense, _, _ = measure(dense, iters=iters)
        t_routed, _, _ = measure(routed, iters=iters)
        total[0] += t_dense
        total[1] += t_routed
        kernel = _kernels()[1 if "wgrad" in name else 0]
        print(f"  {name:<16} dense {t_dense:7.3f} ms   routed {t_routed:7.3f} ms   ratio {t_routed / t_dense:5.2f}"
              f"   ({kernel.best_config})")
    print(f"  {'all six':<16} dense {total[0]:7.3f} ms   routed {total[1]:7.3f} ms   ratio {total[1] / total[0]:5.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="BATCHxLENGTHxD_MODEL (repeatable)")
    parser.add_argument("--runs", default="64,256,128", help="modality run lengths")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_routed_mm: needs a CUDA device", file=sys.stderr)
        return 2
    print("device:", torch.cuda.get_device_name())
    for s in args.shape or ["8x2048x1024", "4x4096x2048"]:
        b, l, d = (int(v) for v in s.split("x"))
        bench_shape(b, l, d, tuple(int(v) for v in args.runs.split(",")), args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
