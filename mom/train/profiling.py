"""Profile a few training steps with ``torch.profiler``: ``train.profile_steps: [first, last]``.

The steps ``first`` to ``last`` (inclusive) of the run are recorded on every rank (host ops and, on a GPU, the
kernels). At the end of step ``last`` each rank writes to ``out_dir/profile/``:

- ``trace-rank<R>.json``: the Chrome / Perfetto trace (open it in https://ui.perfetto.dev or chrome://tracing);
- ``summary-rank<R>.txt``: wall time per step; on a GPU the time per step the device was busy (the union of its
  kernels', copies' and sets' intervals; well under the wall time means the device waited for the host) and how
  many device activities a step launched; then the ops with the most self device time and the most self host time
  (a device-side annotation, e.g. an autograd Function's range, repeats the time of the kernels inside it).

The profiler adds host time of its own (a few microseconds per op), so the wall figures are a little slower than
an unprofiled run; compare profiles with profiles (``benchmarks/bench_trainer.py --profile`` profiles the raw step
the same way).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mom.utils.atomic import atomic_write_text

ROWS = 25  # ops listed per table


def covered_us(intervals: list[tuple[float, float]]) -> float:
    """Microseconds covered by the union of ``(start, end)`` intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def device_activity(prof: profile) -> list[tuple[float, float]]:
    """(start, end) microseconds of every kernel, copy and set on the device; not the annotations that span them
    (an autograd Function's or record_function's device range, which would count its kernels twice)."""
    return [(e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type != DeviceType.CPU and not e.is_user_annotation]


def summarize(prof: profile, steps: int, wall_s: float, title: str) -> str:
    """The text summary of a finished profile over ``steps`` steps that took ``wall_s`` seconds."""
    averages = prof.key_averages()
    activity = device_activity(prof)
    wall_ms = wall_s * 1e3 / steps
    lines = [f"{title}: {steps} steps, wall {wall_ms:.2f} ms/step"]
    if activity:
        busy_ms = covered_us(activity) / 1e3 / steps
        summed_ms = sum(stop - start for start, stop in activity) / 1e3 / steps
        lines.append(f"GPU busy {busy_ms:.2f} ms/step ({busy_ms / wall_ms:.1%} of the wall time; idle "
                     f"{wall_ms - busy_ms:.2f} ms/step), {len(activity) / steps:.0f} device activities/step "
                     f"summing to {summed_ms:.2f} ms/step")
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
