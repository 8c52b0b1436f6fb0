"""Training metrics: one JSON object per line in ``<out_dir>/metrics.jsonl`` and TensorBoard scalars (rank 0 only).

Each record has ``step`` and ``split`` ("train" or "validation") plus the numbers of that step, e.g.::

    {"split": "train", "step": 20, "loss": 5.21, "loss/text": 5.9, "loss/image": 4.8, "lr": 0.0003,
     "grad_norm": 0.91, "tokens_per_s": 10432.0, "tokens": 81920, "flops": 1.2e12, "mfu": null}

Non-finite numbers are written as ``null`` (JSON has no NaN). On resume the file is cut back to the resumed step
so that it always describes one continuous run.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Append metrics to JSONL (+ TensorBoard). On ranks other than 0 every method is a no-op."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: logging to metrics.jsonl only "
                              "(pip install tensorboard, or set train.tensorboard=false)", stacklevel=2)
            else:  # purge_step drops events a previous, resumed-from run wrote after the checkpoint
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)
        self._file = self.path.open("a")

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        """Write one record; numeric values also go to TensorBoard as ``<split>/<name>``."""
        if not self.enabled:
            return
        record = {"split": split, "step": step, **{k: _json_number(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics file. A torn last line (a crash mid-write) is ignored; any other line that is not
    JSON raises ``ValueError`` naming the file and line."""
    lines = Path(path).read_text().splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not a JSON line ({err})") from err
    return records


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the records with ``step <= step`` (atomic rewrite); remove the file when ``step == 0``."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step] if step > 0 else []
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _json_number(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-dim tensors / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
