"""Where a MoM LM training step's GPU time goes, next to mamba-ssm's `MambaLMHeadModel`: the top CUDA kernels.

    python eval/profile_lm.py                        # 768 x 24, batch 8 x 2048
    python eval/profile_lm.py --model 1024x48 --rows 40

Complements eval/bench_lm.py (the totals) the way eval/profile_layer.py complements eval/bench_layer.py. Also prints
where a step synchronises with the host, and the step's wall time next to the time the host took to enqueue it:
when the two are close, the GPU waits on Python (launch-bound), whatever its kernels cost; and then where the host's
time goes (cProfile of one step, by function).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lm import VOCAB_SPLIT, build, host_counts, make_batch, train_step_fn  # noqa: E402
from profile_layer import profile_step  # noqa: E402

import mom  # noqa: E402


def host_view(step, iters: int = 5) -> None:
    """The host synchronisations of one step, each with the Python stack that caused it, then wall vs enqueue time
    per step."""
    step()
    torch.cuda.synchronize()
    sites: dict[str, int] = {}
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename][-8:]
        key = "\n      ".join(f"{os.path.relpath(f.filename)}:{f.lineno} {f.name}" for f in frames)
        sites[key] = sites.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = show
    torch.cuda.synchronize()
    print(f"host syncs in one step: {sum(sites.values())}")
    for key, count in sites.items():
        print(f"  x{count}, innermost last:\n      {key}")
    start = time.perf_counter()
    for _ in range(iters):
        step()
    enqueued = time.perf_counter() - start
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    print(f"per step: wall {wall / iters * 1e3:.1f} ms, host enqueue {enqueued / iters * 1e3:.1f} ms")


def host_profile(step, rows: int) -> None:
    """Where the host spends one step: Python functions and torch calls by own time (cProfile, one step)."""
    step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    step()
    torch.cuda.synchronize()
    prof.disable()
    print(f"host time by function, one step (top {rows} by own time):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="768x24", help="D_MODELxN_LAYER")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--host-only", action="store_true", help="skip the CUDA kernel table")
    parser.add_argument("--device-counts", action="store_true", help="as bench_lm.py: MoM reads its counts itself")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_lm: needs a CUDA device", file=sys.stderr)
        return 2
    d, n = (int(v) for v in args.model.split("x"))
    config = mom.MoMConfig(vocab_sizes=VOCAB_SPLIT, d_model=d, n_layer=n)
    ids = make_batch(config, args.batch, args.length)
    print("device:", torch.cuda.get_device_name(), "model:", args.model, f"batch {args.batch}x{args.length}")
    for name in ("mom", "dense"):
        model, forward = build(name, d, n, counts=None if args.device_counts else host_counts(config, ids))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        step = train_step_fn(model, ids, ids, optimizer, forward)
        if not args.host_only:
            profile_step(f"{name} LM training step", step, args.rows)
        host_view(step)
        host_profile(step, args.rows)
        del model, optimizer
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
