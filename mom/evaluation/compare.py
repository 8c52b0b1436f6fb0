"""Compare training runs per modality against training FLOPs: the paper's MoM vs dense evaluation.

    curves = [read_curve("MoM", "runs/tiny_mom"), read_curve("dense", "runs/tiny_dense")]
    print(report(curves, baseline=curves[1]))

Reads each run's ``metrics.jsonl`` (written by ``mom-train``), pairs every validation record with the cumulative
training FLOPs of its step, prints final losses per modality and, for every run against the baseline, the share of
the baseline's training FLOPs at which the run first reached the baseline's final loss (the paper reports 25-65%
for MoM against dense). With matplotlib installed, `plot` draws loss against FLOPs, one panel per modality. A record
without a token of some modality (``"loss/speech": null``, frequent in short training-log windows) is a gap in that
modality's curve. The command line is `mom.cli.compare` (``mom-compare``).
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


def report(curves: Sequence[Curve], baseline: Curve | None) -> str:
    """Final losses per modality, and FLOPs-to-match against the baseline."""
    keys = [k for k in curves[0].losses if all(k in c.losses for c in curves)]
    lines = [f"{'run':<16}{'train FLOPs':>14}" + "".join(f"{k:>10}" for k in keys)]
    for c in curves:
        lines.append(f"{c.name:<16}{c.flops[-1]:>14.3e}" + "".join(f"{c.final(k):>10.4f}" for k in keys))
    if baseline is not None:
        lines.append(f"\nFLOPs to reach {baseline.name}'s final loss, as a share of {baseline.name}'s training FLOPs:")
        for c in curves:
            if c is baseline:
                continue
            cells = []
            for k in keys:
                f = flops_to_reach(c, k, baseline.final(k))
                cells.append(f"{f / baseline.flops[-1]:>10.1%}" if f is not None else f"{'not yet':>10}")
            lines.append(f"{c.name:<30}" + "".join(cells))
    return "\n".join(lines)


def plot(curves: Sequence[Curve], out: str | Path) -> None:
    """Loss against training FLOPs, one panel per modality (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingDependencyError("plotting needs matplotlib: pip install matplotlib") from err
    keys = [k for k in curves[0].losses if all(k in c.losses for c in curves)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for c in curves:
            measured = [(f, v) for f, v in zip(c.flops, c.losses[key]) if not math.isnan(v)]
            ax.plot([f for f, _ in measured], [v for _, v in measured], marker="o", markersize=3, label=c.name)
        ax.set_xscale("log")
        ax.set_title(f"validation loss: {key}")
        ax.set_xlabel("training FLOPs")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss (nats)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
