"""Crash-safe DeepSpeed checkpoints (rotation, auto-resume); the Hugging Face export is `mom.train.export`.

Layout under ``<out_dir>/checkpoints/``::

    latest                  # name of the newest complete checkpoint (replaced atomically)
    step-00000100/          # one complete checkpoint
        meta.json           # step, tokens, FLOPs so far, world size, model shape, the size of every other file...
                            #   written LAST: marks it complete
        rank-00000.pt       # per rank: data-loader position and RNG states (torch, cuda, numpy, python)
        mp_rank_00_model_states.pt, *optim_states.pt ...   # DeepSpeed's own files (model, optimizer)
    .tmp-step-00000200/     # a save in progress (or killed mid-way): never loaded, removed by the next save
    step-00000300.rejected/ # failed verification when resuming: set aside, never loaded nor rotated
    step-00000400.superseded/  # later than the checkpoint a run was rolled back to (``--resume PATH``): set aside

A save writes everything into ``.tmp-step-N``, then renames it to ``step-N`` and only then points ``latest`` at it,
so a crash or kill at any moment leaves the previous checkpoint loadable. Before a checkpoint is loaded its files
are checked against the sizes ``meta.json`` recorded (`verify`); ``auto`` resume falls back to the newest checkpoint
that verifies. A run continuing from step S sets aside every checkpoint after S (`set_aside_after`), so the
directory only ever holds one history: the highest step is the newest, which is what rotation and ``latest`` rely
on. The checkpoint directory must be on a filesystem every rank sees (DeepSpeed writes each rank's optimizer shard
itself).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mom.train.distributed import Context, barrier, decided_on_main
from mom.utils.atomic import atomic_save, atomic_write_text

LATEST = "latest"
META = "meta.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT = 2  # meta.json version; 2 added "files" ({path relative to the checkpoint: size in bytes}) for `verify`
REJECTED = ".rejected"  # suffix of a checkpoint that failed verification (set aside, kept for inspection)
SUPERSEDED = ".superseded"  # suffix of a checkpoint later than the one a run was rolled back to


class CheckpointError(ValueError):
    """No checkpoint that verifies where one was asked for; the message names every file found wrong."""


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
            meta = {**meta, "world_size": self.ctx.world_size, "format": FORMAT, "files": file_sizes(tmp)}
            atomic_write_text(tmp / META, json.dumps(meta, indent=2))
            if final.exists():  # only by hand: a run sets aside every checkpoint after its start (set_aside_after)
                remove_dir(final)
            os.rename(tmp, final)
            atomic_write_text(self.root / LATEST, final.name)
            self._rotate(final)
        barrier()
        return final

    def _rotate(self, newest: Path) -> None:
        """Keep ``newest`` and the ``keep_last - 1`` highest checkpoints before it; never touch a later one (there is
        none unless put there by hand: a run sets them aside when it starts)."""
        older = sorted((p for p in self.complete() if _step_of(p) < _step_of(newest)), key=_step_of)
        for old in older[: max(0, len(older) - (self.keep_last - 1))]:
            remove_dir(old)

    # ---- find ----------------------------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoint directories (those with meta.json), not verified."""
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / META).is_file()]

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, else the highest complete step, else None (not verified)."""
        pointer = self.root / LATEST
        if pointer.is_file():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / META).is_file():
                return candidate
        complete = self.complete()
        return max(complete, key=_step_of) if complete else None

    def resolve(self, resume: str) -> Path | None:
        """What ``train.resume`` means, as a checkpoint that verifies: "auto" -> the newest of this root (None if it
        has none), "none" -> None, else a checkpoint directory or a directory of checkpoints (its newest).

        Collective: rank 0 decides (verifying, warning, setting damaged checkpoints of this root aside) and every
        rank gets its answer, or the same `CheckpointError`.
        """
        if resume == "none":
            return None
        return decided_on_main(lambda: self._resolve(resume))

    def _resolve(self, resume: str) -> Path | None:
        if resume == "auto":
            return self._newest_intact(self)
        path = Path(resume)
        if (path / META).is_file():
            problem = verify(path)
            if problem:
                raise CheckpointError(f"train.resume: checkpoint {path} is damaged: {problem}")
            return path
        if path.is_dir() and (path / LATEST).is_file() or any(STEP_DIR.match(p.name) for p in _children(path)):
            found = self._newest_intact(Checkpointer(path, self.keep_last, self.ctx))
            if found is not None:
                return found
        raise FileNotFoundError(
            f"train.resume: {path} is not a complete checkpoint (no {META}) nor a directory holding one"
        )

    def _newest_intact(self, source: Checkpointer) -> Path | None:
        """The newest checkpoint of ``source`` that verifies; each damaged one is named in a warning (and set aside
        when it is one of this root's). None if ``source`` has none; `CheckpointError` if none verifies."""
        newest = source.latest()
        candidates = sorted(source.complete(), key=_step_of, reverse=True)
        if newest is not None:  # the pointer first (it is the highest step unless edited by hand)
            candidates = [newest, *(c for c in candidates if c != newest)]
        problems = []
        for candidate in candidates:
            problem = verify(candidate)
            if problem is None:
                return candidate
            problems.append(f"{candidate.name}: {problem}")
            note = "ignored"
            if candidate.parent.resolve() == self.root.resolve():
                aside = candidate.with_name(candidate.name + REJECTED)
                remove_dir(aside)
                os.rename(candidate, aside)
                note = f"set aside as {aside.name}"
            warn(f"checkpoint {candidate} is damaged ({problem}); {note}, trying the previous one")
        if problems:
            raise CheckpointError(f"no checkpoint in {source.root} verifies: " + "; ".join(problems))
        return None

    def set_aside_after(self, step: int) -> list[Path]:
        """Rename every checkpoint of this root after ``step`` to ``<name>.superseded`` (never loaded or rotated),
        so that the run continuing from ``step`` owns the directory's history. Rank 0 only; returns the new paths."""
        moved = []
        for path in sorted(_children(self.root)):
            if STEP_DIR.match(path.name) and _step_of(path) > step:
                aside = path.with_name(path.name + SUPERSEDED)
                remove_dir(aside)
                os.rename(path, aside)
                moved.append(aside)
        return moved

    # ---- load ----------------------------------------------------------------------------------------------------
    def load(self, engine: Any, loader: Any, path: Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
        """Restore engine (model + optimizer), loader position and RNG states from ``path``; return its meta.

        ``expect``: meta entries that must match (e.g. ``{"model": shape}``), checked before anything is loaded.
        """
        meta = read_meta(path)
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
        try:
            load_path, _ = engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except Exception as e:  # DeepSpeed's errors (e.g. "[Errno 22] Invalid argument") name no file
            raise CheckpointError(f"cannot load checkpoint {path} (rank {self.ctx.rank}): {type(e).__name__}: {e}; "
                                  "resume from an earlier one with --resume PATH") from e
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
        rank_file = path / f"rank-{self.ctx.rank:05d}.pt"
        try:
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot load {rank_file}: {type(e).__name__}: {e}") from e
        loader.load_state_dict(rank_state["loader"])
        set_rng_state(rank_state["rng"], self.ctx.device)
        return meta


# ---- verification ------------------------------------------------------------------------------------------------
def file_sizes(path: Path) -> dict[str, int]:
    """Size in bytes of every file under ``path`` (meta.json excepted), by path relative to it."""
    return {f.relative_to(path).as_posix(): f.stat().st_size
            for f in sorted(path.rglob("*")) if f.is_file() and f.name != META}


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json; `CheckpointError` naming the file if it is missing, torn or not a mapping."""
    meta_file = path / META
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{meta_file} is not a checkpoint's meta.json (no integer step)")
    return meta


def verify(path: Path) -> str | None:
    """None if the checkpoint ``path`` is intact, else what is wrong with it (naming the file).

    Intact: meta.json parses and every file it lists has the size recorded at save time (a checkpoint of format 1,
    which recorded no sizes, is only checked for its meta.json).
    """
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return str(e)
    files = meta.get("files", {})
    if not isinstance(files, dict):
        return f"{path / META} has no valid file list"
    for name, size in files.items():
        f = path / name
        try:
            actual = f.stat().st_size
        except OSError:
            return f"{f} is missing"
        if actual != size:
            return f"{f} has {actual:,} bytes, {size:,} were written"
    return None


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


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
