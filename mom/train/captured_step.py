"""A training step captured once in a CUDA graph and replayed for every batch: one launch per step.

A small model's step can be bound by the host: launching its thousands of kernels takes longer than running them
(docs/performance.md). When every batch has the same shapes (packed sequences) and the step reads nothing from the
device on the host, the whole step (forward under autocast, backward, gradient clipping, optimizer step) can be
recorded once and replayed. MoM's fused GPU path groups each modality's tokens on the device, so its default call
``model(input_ids=..., labels=...)`` is such a step::

    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(3e-4, device="cuda"), fused=True,
                                  capturable=True)
    step = CapturedStep(model, optimizer)
    for batch in loader:                # dicts of tensors, the same shapes every time (CPU tensors: no host sync)
        loss = step(batch)              # a device tensor, overwritten by the next call
        optimizer.param_groups[0]["lr"].fill_(next_lr)

The first ``warmup`` calls are ordinary steps on a side stream (Triton autotuning, cuBLAS workspaces and the
optimizer's state settle); the next one copies its batch into static buffers, records the step and replays it; every
later call copies its batch in and replays. Each batch is checked before it goes in, since a recorded forward cannot
read the device to check it: the same keys, shapes and dtypes as the recorded one, and the values through ``check``
(default: the model's ``check_inputs``, which MoM models have). The graph holds the addresses of the parameters,
gradients and optimizer state it recorded: a parameter or module replaced afterwards (``load_state_dict(assign=True)``,
a peft wrap) raises, and a learning rate given as a Python float is part of the recording, so changing it raises
(give the optimizer a tensor learning rate to schedule it). Load checkpoints before the first call.

``capture(fn, pool) -> replay`` (recording ``fn`` without running it; the warm-up is done) and ``device_type``
default to a CUDA graph on CUDA; the tests pass an eager capture (replaying means running the step again) to check
the rest on CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from mom.model import registrations
from mom.model.graph import Capture, capture_cuda_graph, fingerprint

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]  # (model, batch on the device) -> loss ()
WARMUP_STEPS = 3  # ordinary steps before the recording: Triton's autotuning and the optimizer's state need them
RECORD = functools.partial(capture_cuda_graph, warmup=0)  # the step is warmed up by ordinary calls, not replays


class CaptureError(RuntimeError):
    """The step could not be recorded into a CUDA graph (it reads the device on the host, or changes shape)."""


def model_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss of a Hugging Face-style model called on the batch: ``model(**batch).loss``."""
    return model(**batch).loss


class CapturedStep:
    """``step(batch) -> loss``: one training step, after ``warmup`` ordinary ones replayed from a CUDA graph
    (module docstring). ``loss_fn(model, batch)`` gives the loss (default `model_loss`); ``autocast_dtype`` (None:
    no autocast) the forward's autocast; ``max_grad_norm`` clips the gradients' global norm before the optimizer's
    step; ``check(**batch)`` raises for bad values (default: ``model.check_inputs`` if the model has it)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn = model_loss,
                 autocast_dtype: torch.dtype | None = torch.bfloat16, max_grad_norm: float | None = None,
                 warmup: int = WARMUP_STEPS, check: Callable[..., None] | None = None,
                 capture: Capture = RECORD, device_type: str = "cuda") -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("CapturedStep: the model has no trainable parameters")
        for i, group in enumerate(optimizer.param_groups):
            if device_type == "cuda" and group.get("capturable") is False:
                raise ValueError(f"CapturedStep: the optimizer's param group {i} has capturable=False; create it with "
                                 f"capturable=True (e.g. torch.optim.AdamW(..., fused=True, capturable=True)) so that "
                                 f"its step can be recorded")
        self.device = params[0].device
        if self.device.type != device_type:
            raise ValueError(f"CapturedStep records a CUDA graph: the model must be on a CUDA device, its parameters "
                             f"are on {self.device}")
        if warmup < 1:
            raise ValueError(f"CapturedStep: warmup must be at least 1 ordinary step (the optimizer's state and "
                             f"Triton's autotuning must exist before the recording), got {warmup}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.autocast_dtype, self.max_grad_norm, self.warmup = autocast_dtype, max_grad_norm, warmup
        self.check = check if check is not None else getattr(model, "check_inputs", None)
        self.capture, self.device_type = capture, device_type
        self.steps = 0  # calls so far
        self._params = params
        self._static: dict[str, torch.Tensor] | None = None  # the recorded batch's buffers
        self._loss: torch.Tensor | None = None  # the recorded step's loss ()
        self._replay: Callable[[], None] | None = None
        self._lrs: list[float | torch.Tensor] = []  # each group's learning rate at the recording
        self._registrations: object = None
        self._fingerprint: tuple | None = None
        self._stream = torch.cuda.Stream(self.device) if device_type == "cuda" else None

    @property
    def captured(self) -> bool:
        return self._replay is not None

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One step on ``batch`` (tensors on the CPU or the model's device) -> its loss (), on the device; once
        recorded, the same tensor every call (read or clone it before the next)."""
        self.steps += 1
        if not self.captured and self.steps <= self.warmup:
            return self._ordinary(batch)
        self._check(batch)
        if not self.captured:
            self._record(batch)
        else:
            for name, t in batch.items():
                self._static[name].copy_(t, non_blocking=True)
        self._replay()
        return self._loss

    def _step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward, clipping, optimizer step -> the loss (detached); gradients start from None."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self._params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def _ordinary(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A warm-up step, run eagerly (on a side stream on CUDA, as recordings want: `capture_cuda_graph`); the
        model's forward checks the batch itself."""
        inputs = {name: t.to(self.device, non_blocking=True) for name, t in batch.items()}
        if self._stream is None:
            return self._step(inputs)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            loss = self._step(inputs)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return loss

    def _record(self, batch: Mapping[str, torch.Tensor]) -> None:
        self._static = {name: t.to(self.device, copy=True) for name, t in batch.items()}
        self._loss = torch.zeros((), device=self.device)

        def step() -> None:
            self._loss.copy_(self._step(self._static))

        pool = torch.cuda.graph_pool_handle() if self.device_type == "cuda" else None
        try:
            self._replay = self.capture(step, pool)
        except RuntimeError as e:
            self._static = self._loss = None
            self.optimizer.zero_grad(set_to_none=True)
            raise CaptureError(
                "CapturedStep: the training step could not be recorded into a CUDA graph: it reads the device on the "
                "host or synchronises (for a MoM: a path that needs the tokens per modality on the host, such as the "
                "module path with use_fast_path=False, LoRA-wrapped experts or document resets; or a loss function "
                f"that reads a value). Run it as an ordinary step instead. The error: {e}") from e
        self._lrs = [group["lr"] for group in self.optimizer.param_groups]
        self._registrations, self._fingerprint = registrations.current(), fingerprint(self.model)

    def _check(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError, before anything is copied in, for a batch the recorded step cannot take."""
        if self._static is not None:
            if set(batch) != set(self._static):
                raise ValueError(f"CapturedStep: the batch has keys {sorted(batch)} but the recorded step takes "
                                 f"{sorted(self._static)}")
            for name, t in batch.items():
                want = self._static[name]
                if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                    raise ValueError(f"CapturedStep: {name} has shape {tuple(t.shape)} and dtype {t.dtype}, but the "
                                     f"recorded step takes {tuple(want.shape)} {want.dtype}: a graph replays fixed "
                                     f"shapes (pad or pack every batch to one shape, or use an ordinary step)")
        for i, (group, lr) in enumerate(zip(self.optimizer.param_groups, self._lrs)):
            if not isinstance(lr, torch.Tensor) and group["lr"] != lr:
                raise ValueError(f"CapturedStep: param group {i}'s learning rate changed from {lr} to {group['lr']} "
                                 f"after the step was recorded with it; give the optimizer a tensor learning rate "
                                 f"(lr=torch.tensor(...)) and change it in place to schedule it")
        if self._registrations is not None and self._registrations is not registrations.current():
            if fingerprint(self.model) != self._fingerprint:  # (checked again at every call until they are back)
                raise ValueError("CapturedStep: the model's modules or parameters were replaced since the step was "
                                 "recorded (load_state_dict(assign=True), a peft wrap, an assignment); the graph "
                                 "still reads the old ones: make a new CapturedStep")
            self._registrations = registrations.current()
        if self.check is not None:
            self.check(**batch)
