"""Compare training runs per modality against training FLOPs: the paper's MoM vs dense evaluation.

    runs = [read_run("MoM", ["runs/tiny_mom"]), read_run("dense", ["runs/tiny_dense"])]
    print(report(runs, baseline=runs[1]))

Reads each run's ``metrics.jsonl`` (written by ``mom-train``), pairs every validation record with the cumulative
training FLOPs of its step, prints final losses per modality and, for every run against the baseline, the share of
the baseline's training FLOPs at which the run first reached the baseline's final loss (the paper reports 25-65%
for MoM against dense). With matplotlib installed, `plot` draws loss against FLOPs, one panel per modality. A record
without a token of some modality (``"loss/speech": null``, frequent in short training-log windows) is a gap in that
modality's curve. A `Run` may hold several seeds of one configuration: the baseline's final loss is then the mean
over its seeds, the shares are given per seed (median and range), and final losses that differ by less than the
seed-to-seed spread are reported as no difference. The command line is `mom.cli.compare` (``mom-compare``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mom.train.metrics import read_jsonl
from mom.utils.errors import MissingDependencyError


@dataclass
class Curve:
    """Validation loss against cumulative training FLOPs for one run: ``losses[key][i]`` at ``flops[i]``."""

    name: str
    flops: list[float]
    losses: dict[str, list[float]]  # "all", "text", "image", ... -> one value per point (NaN: no such token)

    def final(self, key: str) -> float:
        """The last loss of ``key`` that was measured (NaN if none was)."""
        return next((v for v in reversed(self.losses[key]) if not math.isnan(v)), math.nan)


def read_curve(name: str, run_dir: str | Path, split: str = "validation") -> Curve:
    """The validation (or train) curve of a ``mom-train`` run directory (or its ``metrics.jsonl``)."""
    path = Path(run_dir)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"run {name!r}: no metrics file at {path} (is it a mom-train out_dir?)")
    flops_at: dict[int, float] = {}
    rows = []
    for row in read_jsonl(path):
        if row.get("split") == "train" and "flops" in row:
            flops_at[row["step"]] = row["flops"]
        if row.get("split") == split:
            rows.append(row)
    points = [(flops_at[r["step"]], r) for r in rows if r["step"] in flops_at]
    if not points:
        raise ValueError(f"run {name!r}: {path} has no {split} records at logged training steps")
    keys = ["all"] + sorted({k.split("/", 1)[1] for _, r in points for k in r if k.startswith("loss/")})
    losses = {k: [_loss(r.get("loss" if k == "all" else f"loss/{k}")) for _, r in points] for k in keys}
    return Curve(name, [f for f, _ in points], losses)


def _loss(value: float | None) -> float:
    """A logged loss; a missing or null one (no token of that modality in the window) is NaN."""
    return math.nan if value is None else float(value)


def flops_to_reach(curve: Curve, key: str, target: float) -> float | None:
    """FLOPs at which ``curve``'s ``key`` loss first reaches ``target`` (linear between measured points), or None
    (also for a NaN target). Points without a measurement (NaN) are skipped."""
    prev_f, prev_l = 0.0, math.inf
    for f, loss in zip(curve.flops, curve.losses.get(key, [])):
        if loss <= target:  # False for NaN
            if math.isinf(prev_l):
                return f
            return prev_f + (f - prev_f) * (prev_l - target) / (prev_l - loss)
        if not math.isnan(loss):
            prev_f, prev_l = f, loss
    return None


@dataclass
class Run:
    """One configuration trained with one or more seeds: ``seeds[i]`` is the curve of seed ``i``."""

    name: str
    seeds: list[Curve]

    def final(self, key: str) -> list[float]:
        """The final ``key`` loss of every seed."""
        return [c.final(key) for c in self.seeds]

    def mean_final(self, key: str) -> float:
        return _mean(self.final(key))

    def spread(self, key: str) -> float:
        """Seed-to-seed spread of the final ``key`` loss: max - min over the seeds (0 for one seed)."""
        values = [v for v in self.final(key) if not math.isnan(v)]
        return max(values) - min(values) if values else math.nan

    @property
    def train_flops(self) -> float:
        """Mean training FLOPs of the seeds' whole runs."""
        return _mean([c.flops[-1] for c in self.seeds])

    @property
    def keys(self) -> list[str]:
        return [k for k in self.seeds[0].losses if all(k in c.losses for c in self.seeds)]


def read_run(name: str, run_dirs: Sequence[str | Path], split: str = "validation") -> Run:
    """A `Run` of the seeds' ``mom-train`` directories (or metrics files)."""
    if not run_dirs:
        raise ValueError(f"run {name!r}: no run directory given")
    return Run(name, [read_curve(name if len(run_dirs) == 1 else f"{name}[{i}]", d, split)
                      for i, d in enumerate(run_dirs)])


def _mean(values: Sequence[float]) -> float:
    measured = [v for v in values if not math.isnan(v)]
    return sum(measured) / len(measured) if measured else math.nan


def shares(run: Run, baseline: Run, key: str) -> list[float | None]:
    """Per seed of ``run``: the FLOPs at which it first reached the baseline's final ``key`` loss (the mean over
    the baseline's seeds), as a share of the baseline's training FLOPs; None where it did not reach it."""
    target, total = baseline.mean_final(key), baseline.train_flops
    reached = [flops_to_reach(c, key, target) for c in run.seeds]
    return [None if f is None else f / total for f in reached]


def _share_cell(values: list[float | None]) -> str:
    """One seed: ``62.3%``; several: the median and the range over the seeds, ``62.3% (58.1-66.0%)``."""
    if len(values) == 1:
        return "not yet" if values[0] is None else f"{values[0]:.1%}"
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)  # "not yet" counts as the largest
    median = ordered[len(ordered) // 2] if len(ordered) % 2 else None
    if len(ordered) % 2 == 0:
        lo, hi = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
        median = None if lo is None or hi is None else (lo + hi) / 2

    def fmt(v: float | None) -> str:
        return "not yet" if v is None else f"{v:.1%}"

    return f"{fmt(median)} ({fmt(ordered[0])}-{fmt(ordered[-1])})"


def report(runs: Sequence[Run], baseline: Run | None) -> str:
    """Final losses per modality, FLOPs-to-match against the baseline and, where a run has several seeds, whether
    the final losses differ by more than the seed-to-seed spread."""
    keys = [k for k in runs[0].keys if all(k in r.keys for r in runs)]
    seeded = any(len(r.seeds) > 1 for r in runs)
    width = 18 if seeded else 10
    lines = [f"{'run':<16}{'train FLOPs':>14}" + "".join(f"{k:>{width}}" for k in keys)]
    for r in runs:
        name = r.name if len(r.seeds) == 1 else f"{r.name} ({len(r.seeds)} seeds)"
        cells = [f"{r.mean_final(k):.4f}" + (f" ±{r.spread(k) / 2:.4f}" if len(r.seeds) > 1 else "") for k in keys]
        lines.append(f"{name:<16}{r.train_flops:>14.3e}" + "".join(f"{c:>{width}}" for c in cells))
    if seeded:
        lines.append("(several seeds: the mean ± half the range over the seeds)")
    if baseline is None:
        return "\n".join(lines)
    of = f"{baseline.name}'s final loss" if len(baseline.seeds) == 1 else \
        f"the final loss of {baseline.name} (mean of its {len(baseline.seeds)} seeds)"
    lines.append(f"\nFLOPs to reach {of}, as a share of {baseline.name}'s training FLOPs"
                 + (" (median and range over the seeds):" if seeded else ":"))
    width = 26 if seeded else 10
    for r in runs:
        if r is baseline and len(r.seeds) == 1:
            continue
        lines.append(f"{r.name:<30}" + "".join(f"{_share_cell(shares(r, baseline, k)):>{width}}" for k in keys))
    if seeded:
        lines.append(f"\nFinal loss minus {baseline.name}'s (means over seeds), against the seed-to-seed spread (the "
                     "largest max - min of either run's seeds); a difference inside the spread is no difference:")
        for r in runs:
            if r is baseline:
                continue
            cells = []
            for k in keys:
                diff, spread = r.mean_final(k) - baseline.mean_final(k), max(r.spread(k), baseline.spread(k))
                verdict = "no diff." if abs(diff) <= spread else ("lower" if diff < 0 else "higher")
                cells.append(f"{diff:+.4f}/{spread:.4f} {verdict}")
            lines.append(f"{r.name:<30}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def plot(runs: Sequence[Run], out: str | Path) -> None:
    """Loss against training FLOPs, one panel per modality (needs matplotlib). A run of several seeds is drawn as
    the mean over its seeds with the range shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as err:
        raise MissingDependencyError("plotting needs matplotlib: pip install matplotlib") from err
    keys = [k for k in runs[0].keys if all(k in r.keys for r in runs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in runs:
            n = min(len(c.flops) for c in r.seeds)  # seeds evaluated at the same steps; a shorter one cuts the rest
            points = [(_mean([c.flops[i] for c in r.seeds]), [c.losses[key][i] for c in r.seeds]) for i in range(n)]
            points = [(f, v) for f, v in points if not any(math.isnan(x) for x in v)]
            line = ax.plot([f for f, _ in points], [_mean(v) for _, v in points], marker="o", markersize=3,
                           label=r.name if len(r.seeds) == 1 else f"{r.name} ({len(r.seeds)} seeds)")
            if len(r.seeds) > 1:
                ax.fill_between([f for f, _ in points], [min(v) for _, v in points], [max(v) for _, v in points],
                                color=line[0].get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the minor ticks' labels overlap
        ax.set_title(f"validation loss: {key}")
        ax.set_xlabel("training FLOPs")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss (nats)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
