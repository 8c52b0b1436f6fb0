"""Stopping a tokenizer's training run and continuing it (`mom-tokenizer image train`, `mom-tokenizer vae train`).

A job limit (the lent GPU's 10 minutes a command) can end a long run. SIGINT or SIGTERM (``timeout -s TERM 540
mom-tokenizer ...``) stops the loop after its current step, and the run's state goes to a resume file beside the
output, ``<out>.resume.pt``: the model (every buffer, the VQ codebook's EMA statistics included, which its
``state_dict`` leaves out), the optimiser, the scheduler, the batch generator, the global random states and the
loop's counters. The same command again continues from it, exactly as a run that never stopped (the same batches and
updates: tested), and removes it once the output is written.

The file records what its run was (`identity`: the tokenizer and training configs and a digest of the training
images): another command that finds it refuses, naming what differs, rather than mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mom.utils.atomic import atomic_save
from mom.utils.signals import StopSignals

SUFFIX = ".resume.pt"
FORMAT_VERSION = 1


def resume_path(out: str | Path) -> Path:
    """Where the run writing ``out`` keeps its resume file: ``<out>.resume.pt`` beside it."""
    out = Path(out)
    return out.with_name(out.name + SUFFIX)


def images_digest(pixels: torch.Tensor) -> str:
    """SHA-1 of a uint8 image tensor's bytes (its shape included): whether a resumed run sees the same images."""
    h = hashlib.sha1(str(tuple(pixels.shape)).encode())
    h.update(pixels.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


class TrainingStopped(Exception):
    """A signal stopped the run after ``step`` of ``steps`` steps; its state is in ``path``."""

    def __init__(self, signum: int, step: int, steps: int, path: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step} of {steps}: the run's state is in {path}; "
                         "run the same command again to continue it")
        self.signum, self.step, self.steps, self.path = signum, step, steps, path


@dataclass
class Progress:
    """Where a run stands: ``step`` steps done, ``seconds`` of training so far, the loop's own ``counters`` (EMAs of
    the loss, code restarts...)."""

    step: int = 0
    seconds: float = 0.0
    counters: dict[str, Any] = field(default_factory=dict)


class ResumeFile:
    """The resume file of one run: ``path`` and the run's ``identity`` (a JSON-able dict), checked on load."""

    def __init__(self, path: str | Path, identity: dict[str, Any]) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity))  # tuples -> lists: compared as they are stored

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             generator: torch.Generator) -> Progress | None:
        """Restore a stopped run into these objects (made as for a fresh run) and return its `Progress`; None when
        there is no file. Raises ValueError naming the file when it is unreadable or belongs to another run."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if saved.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {saved.get('format_version')!r}, expected {FORMAT_VERSION}")
            identity = json.loads(saved["identity"])
        except Exception as e:  # torch.load raises many kinds on a truncated or foreign file
            raise ValueError(f"{self.path}: not a readable resume file ({e}); delete it to start the run over") from e
        if identity != self.identity:
            diff = sorted(k for k in identity.keys() | self.identity.keys() if identity.get(k) != self.identity.get(k))
            raise ValueError(f"{self.path} holds a stopped run that differs from this one in {', '.join(diff)}; "
                             "rerun that command to finish it, or delete the file to start this one")
        model.load_state_dict(saved["model"])
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in saved["buffers"].items():  # the non-persistent ones too (the codebook's EMA)
                buffers[name].copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["cpu_rng"])
        device = next(model.parameters()).device
        if device.type == "cuda" and saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        return Progress(saved["step"], saved["seconds"], saved["counters"])

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             generator: torch.Generator, progress: Progress) -> None:
        """Write the run's state, whole or not at all (`mom.utils.atomic`)."""
        device = next(model.parameters()).device
        state = {
            "format_version": FORMAT_VERSION,
            "identity": json.dumps(self.identity),
            "model": model.state_dict(),
            "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},  # state_dict leaves some out
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "step": progress.step,
            "seconds": progress.seconds,
            "counters": progress.counters,
        }
        atomic_save(self.path, lambda p: torch.save(state, p))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class _NoStop:
    """`StopSignals`' interface for a run that cannot be resumed: never asked to stop, the default handlers kept."""

    signum = None

    def requested(self) -> bool:
        return False

    def __enter__(self) -> _NoStop:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def stop_signals(resume: ResumeFile | None, announce: bool) -> StopSignals | _NoStop:
    """What a training loop checks after each step: SIGINT / SIGTERM (`StopSignals`) when it has a resume file to
    stop into, else nothing (a signal then ends the process as usual)."""
    return StopSignals(announce) if resume is not None else _NoStop()
