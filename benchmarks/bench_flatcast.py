"""Benchmark the fast path's weight cast (`mom.ops.triton.flatcast`) against PyTorch's cat + cast,
on one mixer's weights.

    python benchmarks/bench_flatcast.py                  # d_model 768 and 1024, three modalities, fp32 -> bf16

Prints, per d_model: cat + cast (what the fast path did before), the one-kernel flat cast, and the cast of an
already flat buffer (the floor: the same bytes read and written), GPU time per call and their ratios.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import measure, mom_mixer  # noqa: E402

from mom.model.config import PROJECTIONS  # noqa: E402
from mom.ops.triton.flatcast import flat_cast  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, action="append")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_flatcast: needs a CUDA device", file=sys.stderr)
        return 2
    print("device:", torch.cuda.get_device_name())
    for d in args.d_model or [768, 1024]:
        params = mom_mixer(3, d, PROJECTIONS).fast_path_weights().params  # what the fast path casts per forward
        flat = torch.cat([p.reshape(-1) for p in params])
        assert torch.equal(flat_cast(params, torch.bfloat16), flat.to(torch.bfloat16))
        variants = {
            "cat + cast": lambda ps=params: torch.cat([p.reshape(-1) for p in ps]).to(torch.bfloat16),
            "flat_cast": lambda ps=params: flat_cast(ps, torch.bfloat16),
            "cast of a flat buffer": lambda f=flat: f.to(torch.bfloat16),
        }
        print(f"d_model {d}: {len(params)} tensors, {flat.numel() / 1e6:.1f}M fp32 -> bf16")
        base = None
        for name, fn in variants.items():
            ms, _, _ = measure(fn, warmup=10, iters=args.iters)
            base = base or ms
            print(f"  {name:<24} {ms * 1e3:8.1f} us  ({ms / base:5.2f}x cat + cast)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
