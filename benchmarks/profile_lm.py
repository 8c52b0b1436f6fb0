"""Where a MoM LM training step's GPU time goes, next to mamba-ssm's `MambaLMHeadModel`: the top CUDA kernels.

    python benchmarks/profile_lm.py                        # 768 x 24, batch 8 x 2048
    python benchmarks/profile_lm.py --model 1024x48 --rows 40
    python benchmarks/profile_lm.py --timeline             # only the GPU timeline: busy vs idle, launches per step

Complements bench_lm.py (the totals) the way profile_layer.py complements bench_layer.py. Also prints
where a step synchronises with the host (with the Python stack), and the step's wall time next to the time the host
took to enqueue it: when the two are close, the GPU waits on Python (launch-bound), whatever its kernels cost; where
the host's time goes (cProfile of one step, by function); and the GPU timeline of a few steps (a CUDA-only profiler
trace): how long the GPU ran kernels against the steps' span, its idle gaps with the kernels around them, and the
kernel launches per step by kind (each launch costs host time, the same for any kernel).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import re
import sys
import tempfile
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import profiled  # noqa: E402
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


def summarize_timeline(events: list[dict], steps: int, min_gap_us: float = 30.0, top: int = 10) -> dict:
    """Chrome-trace events of ``steps`` steps -> per step: ``span_ms`` (first kernel's start to last kernel's end),
    ``busy_ms`` (time some kernel, copy or memset ran), ``gaps_ms`` (idle stretches longer than ``min_gap_us``);
    ``gaps``: the ``top`` longest as (us, kernel before, kernel after); ``launches``: per step, by kind."""
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    if not device:
        raise ValueError("the trace holds no GPU activity")
    busy, gaps, end = 0.0, [], device[0]["ts"]
    for before, e in zip([None] + device[:-1], device):
        start = e["ts"]
        if start > end:  # idle from `end` to `start`
            if before is not None and start - end > min_gap_us:
                gaps.append((start - end, before["name"], e["name"]))
        busy += max(0.0, e["ts"] + e["dur"] - max(start, end))  # overlapping kernels counted once
        end = max(end, e["ts"] + e["dur"])
    kinds = collections.Counter(_kind(e["name"]) for e in device)
    return {
        "span_ms": (end - device[0]["ts"]) / 1e3 / steps,
        "busy_ms": busy / 1e3 / steps,
        "gaps_ms": sum(g for g, _, _ in gaps) / 1e3 / steps,
        "gaps": sorted(gaps, reverse=True)[:top],
        "launches": {k: v / steps for k, v in kinds.most_common()},
    }


def _kind(name: str) -> str:
    """A kernel's kind for counting launches: cuBLAS GEMMs together, PyTorch's kernels by the innermost name in
    ``at::native`` (the functor of an elementwise kernel, the op of a reduction), others by their name."""
    if name.startswith(("nvjet", "sm90_xmma", "cutlass")) or "gemm" in name.lower() or "cublas" in name:
        return "GEMM (cuBLAS)"
    native = re.findall(r"at::native::(?:\(anonymous namespace\)::)?(\w+)", name)
    if native:
        return "PyTorch " + native[-1]
    return name.split("(")[0].split("<")[0].strip()[:60]


def timeline(name: str, step, steps: int = 3, top: int = 10) -> None:
    """Profile ``steps`` steps (CUDA activity only, after warm-up) and print `summarize_timeline`."""
    prof = profiled(step, steps)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            summary = summarize_timeline(json.load(f)["traceEvents"], steps, top=top)
    print(f"\n=== {name}: GPU timeline over {steps} steps (profiled: the host is slower than unprofiled) ===")
    print(f"per step: span {summary['span_ms']:.1f} ms, kernels running {summary['busy_ms']:.1f} ms, "
          f"idle gaps > 30 us {summary['gaps_ms']:.1f} ms; launches {sum(summary['launches'].values()):.0f}")
    for gap, before, after in summary["gaps"]:
        print(f"  idle {gap:8.0f} us  after {before[:50]}  before {after[:50]}")
    print("launches per step by kind:")
    for kind, count in summary["launches"].items():
        print(f"  {count:8.1f}  {kind}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="768x24", help="D_MODELxN_LAYER")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--host-only", action="store_true", help="skip the CUDA kernel table and the timeline")
    parser.add_argument("--timeline", action="store_true", help="only the GPU timeline (busy, gaps, launches)")
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
        if not args.timeline:  # the host first: a profiler that ran before slows the host's launches
            host_view(step)
            host_profile(step, args.rows)
        if not (args.host_only or args.timeline):
            profile_step(f"{name} LM training step", step, args.rows)
        if not args.host_only:
            timeline(f"{name} LM training step", step)
        del model, optimizer
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
