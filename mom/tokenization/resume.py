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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mom.utils.atomic import atomic_save
from mom.utils.signals import StopSignals

SUFFIX = ".resume.pt"
FORMAT_VERSION = 1
SHOW_EVERY = 25  # steps between the loops' reads of their device-side counters for the progress bar (each waits for
# the GPU)


def resume_path(out: str | Path) -> Path:
    """Where the run writing ``out`` keeps its resume file: ``<out>.resume.pt`` beside it."""
    out = Path(out)
    return out.with_name(out.name + SUFFIX)


def device_number(value: float | None, device: str | torch.device) -> torch.Tensor | None:
    """A loop counter kept on the device as a 0-d fp32 tensor (None stays None: an EMA not started yet); a resumed
    run's saved number comes back exactly (fp32 -> Python float -> fp32)."""
    return None if value is None else torch.tensor(value, dtype=torch.float32, device=device)


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


class TrainingRun:
    """One training loop's stop and continue, as a context around the loop::

        with TrainingRun(resume, identity, model, optim, sched, gen, {"loss_ema": None}, announce=True) as run:
            for step in range(run.step, steps):
                ...                                   # one step
                run.after_step(step + 1, steps, {"loss_ema": loss_ema})

    ``resume``: the resume file's path, or None for a run that cannot stop (signals then keep their default
    handlers). Entering restores a stopped run from the file into the objects (made as for a fresh run) or starts
    one: `step`, `counters`. `after_step` stops the run into the file when SIGINT / SIGTERM asked for it and steps
    remain (`TrainingStopped`). ``identity`` (called only with a file: digests cost a pass over the data) says what
    the run is (`ResumeFile`). `seconds`: training time so far, over every stop."""

    def __init__(self, resume: str | Path | None, identity: Callable[[], dict[str, Any]], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, generator: torch.Generator,
                 counters: dict[str, Any], announce: bool) -> None:
        self.file = None if resume is None else ResumeFile(resume, identity())
        self.objects = (model, optimizer, scheduler, generator)
        self.progress = Progress(counters=dict(counters))
        self.signals = StopSignals(announce) if self.file is not None else None
        self._clock = time.time()

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def counters(self) -> dict[str, Any]:
        return self.progress.counters

    def seconds(self) -> float:
        return time.time() - self._clock

    def __enter__(self) -> TrainingRun:
        if self.file is not None:
            self.progress = self.file.load(*self.objects) or self.progress
            self.signals.__enter__()
        self._clock = time.time() - self.progress.seconds
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.signals is not None:
            self.signals.__exit__(*exc)

    def after_step(self, done: int, steps: int, counters: dict[str, Any]) -> None:
        """``done`` steps of ``steps`` are done, the loop's ``counters`` as they stand (numbers, or 0-d tensors the loop
        keeps on the device: read only here, when the run stops): stop into the file if a signal asked and steps
        remain."""
        if self.signals is None or not self.signals.requested() or done >= steps:
            return
        numbers = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in counters.items()}
        self.file.save(*self.objects, Progress(done, self.seconds(), numbers))
        raise TrainingStopped(self.signals.signum, done, steps, self.file.path)
