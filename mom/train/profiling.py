"""Profile a few training steps with ``torch.profiler``: ``train.profile_steps: [first, last]``.

The steps ``first`` to ``last`` (inclusive) of the run are recorded on every rank (host ops and, on a GPU, the
kernels). At the end of step ``last`` each rank writes to ``out_dir/profile/``:

- ``trace-rank<R>.json``: the Chrome / Perfetto trace (open it in https://ui.perfetto.dev or chrome://tracing);
- ``summary-rank<R>.txt``: wall time per step, GPU kernel time per step and their ratio (how busy the GPU was;
  well under 100% means the device waited for the host), then the ops with the most self device time and the most
  self host time.

The profiler adds host time of its own (a few microseconds per op), so the wall figures are a little slower than
an unprofiled run; compare profiles with profiles (``benchmarks/bench_trainer.py --profile`` profiles the raw step
the same way).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from mom.utils.atomic import atomic_write_text

ROWS = 25  # ops listed per table


def summarize(prof: profile, steps: int, wall_s: float, title: str) -> str:
    """The text summary of a finished profile over ``steps`` steps that took ``wall_s`` seconds."""
    averages = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in averages)  # every kernel's time, summed over streams
    wall_ms, device_ms = wall_s * 1e3 / steps, device_us / 1e3 / steps
    lines = [f"{title}: {steps} steps, wall {wall_ms:.2f} ms/step"]
    if device_us > 0:
        lines.append(f"GPU kernels {device_ms:.2f} ms/step: busy {device_ms / wall_ms:.1%} of the wall time")
        lines += ["", "by self device time:", averages.table(sort_by="self_device_time_total", row_limit=ROWS)]
    lines += ["", "by self host time:", averages.table(sort_by="self_cpu_time_total", row_limit=ROWS)]
    return "\n".join(lines) + "\n"


class StepProfiler:
    """Records the steps ``[first, last]`` of a run (``steps`` empty: does nothing); see the module docstring."""

    def __init__(self, steps: list[int], out_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.last = steps if steps else (0, -1)
        self.out_dir, self.rank, self.device = Path(out_dir), rank, device
        self._prof: profile | None = None
        self._start = 0.0

    def before(self, step: int) -> None:
        if step != self.first:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._start = time.perf_counter()

    def after(self, step: int) -> Path | None:
        """After each step; at the last profiled one, writes the files and returns the summary's path."""
        if self._prof is None or step != self.last:
            return None
        self._sync()
        wall = time.perf_counter() - self._start
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        folder = self.out_dir / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(folder / f"trace-rank{self.rank}.json"))
        summary = folder / f"summary-rank{self.rank}.txt"
        atomic_write_text(summary, summarize(prof, self.last - self.first + 1, wall,
                                             f"mom-train steps {self.first}-{self.last}, rank {self.rank}"))
        return summary

    def close(self) -> None:
        """Stop an unfinished recording (the run ended before ``last``) without writing."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None

    def _sync(self) -> Any:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
