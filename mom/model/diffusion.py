"""Gaussian diffusion of continuous image latents: the DDPM noise schedule, noising, the noise-prediction loss and
a deterministic DDIM sampler (the Transfusion setting, `mom.model.transfusion`).

Conventions (docs/transfusion.md):

* ``T`` discrete timesteps ``t = 0 .. T-1``; ``alpha_bar[t]`` is the share of signal variance left at step ``t``:
  ``x_t = sqrt(alpha_bar[t]) * x_0 + sqrt(1 - alpha_bar[t]) * eps`` (DDPM, Ho et al. 2020, eq. 4).
* ``cosine`` schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17, offset ``s = 0.008``, each beta clipped to
  0.999), the schedule Transfusion trains with; ``linear``: DDPM's betas ``linspace(1e-4, 0.02, T)``.
* The model predicts the noise ``eps``; the loss is its mean squared error (DDPM's "simple" loss).
* DDIM (Song et al. 2021, eta = 0, deterministic) over ``steps`` timesteps with "trailing" spacing (Lin et al. 2024,
  table 2): ``T-1, T-1-T/steps, ...``, so the first step starts from pure noise at ``t = T-1``; the last step lands on
  ``alpha_bar = 1``, i.e. returns the model's prediction of ``x_0``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "linear")
COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal's cosine schedule (keeps beta_0 from being tiny)
MAX_BETA = 0.999  # their clip, which avoids a singularity at t = T
LINEAR_BETAS = (1e-4, 0.02)  # DDPM's linear schedule (Ho et al. 2020, section 4)


@dataclass(frozen=True)
class NoiseSchedule:
    """``alpha_bar`` (T,) float64 on the CPU: the cumulative signal share of every timestep (see the module doc)."""

    alpha_bar: torch.Tensor
    name: str

    @property
    def num_timesteps(self) -> int:
        return self.alpha_bar.numel()

    def at(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``alpha_bar[t]`` as ``like``'s dtype and device, shaped to broadcast over ``like``'s trailing dims (``t``
        indexes its leading ones). Raises for a timestep out of ``[0, T)``."""
        t = torch.as_tensor(t)
        check_timesteps(t, self.num_timesteps)
        ab = self.alpha_bar.to(like.device)[t.to(like.device).long()].to(like.dtype)
        return ab.reshape(*t.shape, *([1] * (like.dim() - t.dim())))


@functools.cache
def make_schedule(name: str = "cosine", num_timesteps: int = 1000) -> NoiseSchedule:
    """The noise schedule ``name`` (one of `SCHEDULES`) over ``num_timesteps`` steps (on the CPU, whatever the default
    device: models built on the meta device, as ``from_pretrained`` does, keep a usable one)."""
    if name not in SCHEDULES:
        raise ValueError(f"noise_schedule: must be one of {list(SCHEDULES)}, got {name!r}")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps: must be an integer >= 2, got {num_timesteps!r}")
    T = num_timesteps
    if name == "linear":
        betas = torch.linspace(*LINEAR_BETAS, T, dtype=torch.float64, device="cpu")
    else:
        def f(u: torch.Tensor) -> torch.Tensor:
            return torch.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

        steps = torch.arange(T + 1, dtype=torch.float64, device="cpu") / T
        betas = (1 - f(steps[1:]) / f(steps[:-1])).clamp(max=MAX_BETA)
    return NoiseSchedule(torch.cumprod(1 - betas, dim=0), name)


def check_timesteps(t: torch.Tensor, num_timesteps: int) -> None:
    """``ValueError`` naming the first timestep outside ``[0, num_timesteps)`` (or a non-integer tensor)."""
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"timesteps must be integers in [0, {num_timesteps}), got dtype {t.dtype}")
    bad = (t < 0) | (t >= num_timesteps)
    if t.numel() and bool(bad.any()):
        raise ValueError(f"timestep {int(t[bad].flatten()[0])} is out of range [0, {num_timesteps})")


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise``; ``t`` (integer) indexes x0's leading dims."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}")
    ab = schedule.at(t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def noise_prediction_loss(predicted: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per position: the mean over the last dim of ``(predicted - noise)^2`` (fp32); (..., D) -> (...)."""
    if predicted.shape != noise.shape:
        raise ValueError(f"predicted noise has shape {tuple(predicted.shape)} but the noise has {tuple(noise.shape)}")
    return (predicted.float() - noise.float()).pow(2).mean(-1)


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The DDIM timesteps, first to last, "trailing" spacing: ``T-1`` down in strides of ``T/steps``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: must be an integer in [1, {num_timesteps}], got {steps!r}")
    stride = num_timesteps / steps
    return [round(num_timesteps - i * stride) - 1 for i in range(steps)]


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int | None
              ) -> torch.Tensor:
    """One deterministic DDIM update (eta = 0) from ``t`` to ``t_prev`` (None: the end, ``alpha_bar = 1``)."""
    ab_t = float(schedule.alpha_bar[t])
    ab_prev = 1.0 if t_prev is None else float(schedule.alpha_bar[t_prev])
    x0 = (x_t - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    return math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps


def ddim_sample(
    predict_noise: Callable[[torch.Tensor, int], torch.Tensor],
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int = 50,
) -> torch.Tensor:
    """Denoise ``x_T`` (pure noise) with ``steps`` DDIM steps; ``predict_noise(x_t, t)`` gives the model's noise
    prediction at timestep ``t``. Returns the sample ``x_0``, same shape as ``x_T``."""
    ts = ddim_timesteps(schedule.num_timesteps, steps)
    x = x_T
    for i, t in enumerate(ts):
        eps = predict_noise(x, t)
        if eps.shape != x.shape:
            raise ValueError(f"predict_noise returned shape {tuple(eps.shape)} for x_t of shape {tuple(x.shape)}")
        x = ddim_step(schedule, x, eps.to(x.dtype), t, ts[i + 1] if i + 1 < len(ts) else None)
    return x
