"""Crash-safe DeepSpeed checkpoints (rotation, auto-resume); the Hugging Face export is `mom.train.export`.

Layout under ``<out_dir>/checkpoints/``::

    latest                  # name of the newest complete checkpoint (replaced atomically)
    step-00000100/          # one complete checkpoint
        meta.json           # step, tokens, FLOPs so far, world size, model shape... written LAST: marks it complete
        rank-00000.pt       # per rank: data-loader position and RNG states (torch, cuda, numpy, python)
        mp_rank_00_model_states.pt, *optim_states.pt ...   # DeepSpeed's own files (model, optimizer)
    .tmp-step-00000200/     # a save in progress (or killed mid-way): never loaded, removed by the next save

A save writes everything into ``.tmp-step-N``, then renames it to ``step-N`` and only then points ``latest`` at it,
so a crash or kill at any moment leaves the previous checkpoint loadable. The checkpoint directory must be on a
filesystem every rank sees (DeepSpeed writes each rank's optimizer shard itself).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mom.train.distributed import Context, barrier
from mom.utils.atomic import atomic_save, atomic_write_text

LATEST = "latest"
META = "meta.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class Checkpointer:
    """Save / find / load checkpoints of one run directory; keeps the newest ``keep_last``."""

    def __init__(self, root: str | os.PathLike, keep_last: int, ctx: Context) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.ctx = ctx

    # ---- save ----------------------------------------------------------------------------------------------------
    def save(self, engine: Any, loader: Any, meta: dict[str, Any]) -> Path:
        """Checkpoint the engine, this rank's loader position and RNG states; ``meta`` must hold ``step``.

        Collective: every rank must call it.
        """
        step = int(meta["step"])
        final = self.root / step_dir_name(step)
        tmp_tag = "." + "tmp-" + final.name
        if self.ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # from a save that was killed
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False)
        tmp = self.root / tmp_tag
        rank_state = {"loader": loader.state_dict(), "rng": rng_state(self.ctx.device)}
        atomic_torch_save(rank_state, tmp / f"rank-{self.ctx.rank:05d}.pt")
        barrier()  # every rank's files are in tmp
        if self.ctx.is_main:
            meta = {**meta, "world_size": self.ctx.world_size, "format": 1}
            atomic_write_text(tmp / META, json.dumps(meta, indent=2))
            if final.exists():  # a fresh run (train.resume=none) reaching a step an older run saved
                remove_dir(final)
            os.rename(tmp, final)
            atomic_write_text(self.root / LATEST, final.name)
            self._rotate()
        barrier()
        return final

    def _rotate(self) -> None:
        complete = sorted(self.complete(), key=lambda p: _step_of(p))
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            remove_dir(old)

    # ---- find ----------------------------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoint directories (those with meta.json)."""
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / META).is_file()]

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, else the highest complete step, else None."""
        pointer = self.root / LATEST
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / META).is_file():
                return candidate
        complete = self.complete()
        return max(complete, key=_step_of) if complete else None

    def resolve(self, resume: str) -> Path | None:
        """What ``train.resume`` means: "auto" -> latest (or None), "none" -> None, else a checkpoint path."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if (path / META).is_file():
            return path
        if path.is_dir() and (path / LATEST).is_file() or any(STEP_DIR.match(p.name) for p in _children(path)):
            found = Checkpointer(path, self.keep_last, self.ctx).latest()
            if found is not None:
                return found
        raise FileNotFoundError(
            f"train.resume: {path} is not a complete checkpoint (no {META}) nor a directory holding one"
        )

    # ---- load ----------------------------------------------------------------------------------------------------
    def load(self, engine: Any, loader: Any, path: Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
        """Restore engine (model + optimizer), loader position and RNG states from ``path``; return its meta.

        ``expect``: meta entries that must match (e.g. ``{"model": shape}``), checked before anything is loaded.
        """
        meta = json.loads((path / META).read_text())
        for key, value in (expect or {}).items():
            saved = meta.get(key)
            if isinstance(saved, dict) and isinstance(value, dict):
                keys = value.keys() | saved.keys()
                diff = {k: (saved.get(k), value.get(k)) for k in keys if saved.get(k) != value.get(k)}
            else:
                diff = {} if saved == value else {key: (saved, value)}
            if diff:
                shown = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in sorted(diff.items()))
                raise ValueError(f"cannot resume from {path}: {key} differs ({shown}); use another train.out_dir "
                                 "or --resume none")
        if meta.get("world_size") != self.ctx.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {meta.get('world_size')} data-parallel ranks, this run has "
                f"{self.ctx.world_size}: resume with the same number of processes (the data position is per rank)"
            )
        load_path, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        rank_state = torch.load(path / f"rank-{self.ctx.rank:05d}.pt", map_location="cpu", weights_only=True)
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"], self.ctx.device)
        return meta


# ---- RNG states --------------------------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict[str, Any]:
    """RNG states of torch (CPU and this rank's CUDA device), numpy and python; ``torch.load(weights_only)``-safe."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuples(x: Any) -> Any:
    """random.setstate wants the nested tuples random.getstate gave (serialisation may turn them into lists)."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---- file helpers -----------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_save(path, lambda tmp: torch.save(obj, tmp))


def remove_dir(path: Path) -> None:
    """Delete a directory by first renaming it out of the way, so that no half-deleted checkpoint stays visible."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def _children(path: Path) -> list[Path]:
    return list(path.iterdir()) if path.is_dir() else []
