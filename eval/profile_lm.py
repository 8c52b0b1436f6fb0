"""Where a MoM LM training step's GPU time goes, next to mamba-ssm's `MambaLMHeadModel`: the top CUDA kernels.

    python eval/profile_lm.py                        # 768 x 24, batch 8 x 2048
    python eval/profile_lm.py --model 1024x48 --rows 40

Complements eval/bench_lm.py (the totals) the way eval/profile_layer.py complements eval/bench_layer.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lm import VOCAB_SPLIT, build, make_batch, train_step_fn  # noqa: E402
from profile_layer import profile_step  # noqa: E402

import mom  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="768x24", help="D_MODELxN_LAYER")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_lm: needs a CUDA device", file=sys.stderr)
        return 2
    d, n = (int(v) for v in args.model.split("x"))
    config = mom.MoMConfig(vocab_sizes=VOCAB_SPLIT, d_model=d, n_layer=n)
    ids = make_batch(config, args.batch, args.length)
    print("device:", torch.cuda.get_device_name(), "model:", args.model, f"batch {args.batch}x{args.length}")
    for name in ("mom", "dense"):
        model, forward = build(name, d, n)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        profile_step(f"{name} LM training step", train_step_fn(model, ids, ids, optimizer, forward), args.rows)
        del model, optimizer
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
