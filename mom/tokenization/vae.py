"""Continuous image autoencoder: a small convolutional KL-regularised VAE (the Transfusion setting's latent space).

An ``image_size``² image of ``channels`` channels is encoded to ``latent_channels`` x ``latent_size``² floats
(``latent_size = image_size / downsample``), as the Stable Diffusion / Transfusion autoencoders do at full scale
(e.g. 32x32 RGB -> 4x8x8). Encoder and decoder are residual conv blocks with GroupNorm and SiLU, one resolution
level per halving of the side; the encoder predicts the mean and log-variance of a diagonal Gaussian posterior.

:meth:`ImageVAE.encode` returns the posterior mean (or, with ``sample=True``, a draw from the posterior), shifted
and scaled to ``(z - shift_factor) * scaling_factor``; both factors are measured on the training images after
training so that the latents have about zero mean and unit standard deviation (Stable Diffusion's
``scaling_factor``; SD3 adds the ``shift_factor``). :meth:`ImageVAE.decode` undoes them.

    vae = ImageVAE.from_pretrained("tokenizers/small/vae")
    z = vae.encode(images_uint8_nhwc)       # float32 (n, latent_channels, latent_size, latent_size)
    pixels = vae.decode(z)                  # uint8 numpy (n, image_size, image_size, channels)

Command line (``mom-tokenizer vae --help``, in :mod:`mom.cli.tokenizer`): ``train``, ``eval``, ``encode``, ``decode``.
A VAE directory holds ``config.json`` (``"kind": "kl-image-vae"``) and ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mom.tokenization.conv_blocks import ResBlock, group_norm
from mom.tokenization.image import TrainingConfig, images_to_uint8, psnr
from mom.tokenization.resume import SHOW_EVERY, TrainingRun, device_number, images_digest
from mom.tokenization.schedule import warmup_cosine_adamw
from mom.tokenization.weights import load_checked_weights
from mom.utils.atomic import atomic_directory
from mom.utils.configio import from_dict, read_mapping
from mom.utils.patches import patchify, unpatchify

# psnr (of mom.tokenization.image) and the latent patches (of mom.utils.patches) are re-exported for the
# Transfusion setting's users, who need them beside the VAE.
__all__ = ["ImageVAE", "ImageVAEConfig", "TrainReport", "VAETrainingConfig", "evaluate_vae", "patchify", "psnr",
           "train_vae", "unpatchify"]  # fmt: skip

KIND = "kl-image-vae"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "training_report.json"
SCALE_IMAGES = 2048  # training images whose latents set scaling_factor / shift_factor (SD used one batch)
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior log-variance, as in Stable Diffusion's DiagonalGaussian

ImagesLike = Union[Sequence[Image.Image], torch.Tensor, np.ndarray]  # noqa: UP007 - a runtime alias


# ---- configuration -----------------------------------------------------------------------------------------------
@dataclass
class ImageVAEConfig:
    """Architecture of the VAE, its KL weight and the latent scaling measured after training.

    ``width_mult`` lists the width (in units of ``base_width``) at each resolution level, from the image's side down
    to the latent grid, so ``len(width_mult) == log2(downsample) + 1``. ``kl_weight`` multiplies the KL divergence
    per latent element, added to the reconstruction loss per pixel (both means).
    """

    image_size: int = 32
    channels: int = 3  # image channels: 3 (RGB) or 1 (grey)
    base_width: int = 32
    width_mult: tuple[int, ...] = (1, 2, 2)
    downsample: int = 4
    latent_channels: int = 4
    num_res_blocks: int = 1  # residual blocks per level
    kl_weight: float = 1e-4
    scaling_factor: float = 1.0  # latents = (posterior - shift_factor) * scaling_factor; set by training
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        self.width_mult = tuple(self.width_mult)
        for name in ("image_size", "base_width", "downsample", "latent_channels", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels: must be 3 (RGB) or 1 (grey), got {self.channels!r}")
        if self.downsample & (self.downsample - 1) or self.downsample < 2:
            raise ValueError(f"downsample: must be a power of two >= 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size: {self.image_size} is not divisible by downsample={self.downsample}")
        levels = int(math.log2(self.downsample)) + 1
        if len(self.width_mult) != levels:
            raise ValueError(f"width_mult: need log2(downsample) + 1 = {levels} entries for downsample="
                             f"{self.downsample}, got {list(self.width_mult)}")  # fmt: skip
        if any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in self.width_mult):
            raise ValueError(f"width_mult: must be positive integers, got {list(self.width_mult)}")
        if not (isinstance(self.kl_weight, (int, float)) and math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"kl_weight: must be a finite number >= 0, got {self.kl_weight!r}")
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(f"scaling_factor: must be a finite number > 0, got {self.scaling_factor!r}")
        if not math.isfinite(self.shift_factor):
            raise ValueError(f"shift_factor: must be finite, got {self.shift_factor!r}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.base_width * m for m in self.width_mult)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["width_mult"] = list(self.width_mult)
        return d


# ---- network -----------------------------------------------------------------------------------------------------
GROUPS = 32  # GroupNorm groups where the width allows (SD's VAE)


def _norm(channels: int) -> nn.GroupNorm:
    return group_norm(channels, GROUPS)


def _res_block(c_in: int, c_out: int) -> ResBlock:
    return ResBlock(c_in, c_out, GROUPS)


class _Encoder(nn.Module):
    """(b, C, s, s) in [-1, 1] -> (b, 2 * latent_channels, s/f, s/f): posterior mean and log-variance."""

    def __init__(self, cfg: ImageVAEConfig) -> None:
        super().__init__()
        widths = cfg.widths
        layers: list[nn.Module] = [nn.Conv2d(cfg.channels, widths[0], 3, padding=1)]
        c = widths[0]
        for level, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(_res_block(c, w))
                c = w
            if level + 1 < len(widths):
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # halves the side
        layers += [_res_block(c, c), _norm(c), nn.SiLU(), nn.Conv2d(c, 2 * cfg.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Decoder(nn.Module):
    """(b, latent_channels, g, g) -> (b, C, g*f, g*f), roughly in [-1, 1]; upsampling is nearest then a conv (SD)."""

    def __init__(self, cfg: ImageVAEConfig) -> None:
        super().__init__()
        widths = cfg.widths[::-1]
        c = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, c, 3, padding=1), _res_block(c, c)]
        for level, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(_res_block(c, w))
                c = w
            if level + 1 < len(widths):
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


# ---- inputs ------------------------------------------------------------------------------------------------------
def _to_unit(images: ImagesLike, cfg: ImageVAEConfig) -> torch.Tensor:
    """Images -> float32 (n, C, s, s) in [-1, 1].

    Accepted: uint8 (n, s, s, C); floating (n, s, s, C) in [0, 1]; a list of PIL images (fitted to ``s``).
    """
    s, c = cfg.image_size, cfg.channels
    if not isinstance(images, (torch.Tensor, np.ndarray)):
        images = list(images)
        if images and not all(isinstance(im, Image.Image) for im in images):
            raise ValueError("images: expected uint8 / float (n, h, w, c) arrays or a list of PIL images")
        pixels = images_to_uint8(images, s)  # (n, s, s, 3)
        if c == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
            pixels = (pixels.float() @ torch.tensor([0.299, 0.587, 0.114])).round().to(torch.uint8)[..., None]
        images = pixels
    x = torch.as_tensor(images)
    if x.dim() != 4:
        raise ValueError(f"images: expected a batch (n, {s}, {s}, {c}), got shape {tuple(x.shape)}")
    if x.shape[-1] != c:
        hint = " (channels last: (n, h, w, c))" if x.shape[1] == c else ""
        raise ValueError(f"images: expected {c} channels in the last dimension{hint}, got shape {tuple(x.shape)}")
    if tuple(x.shape[1:3]) != (s, s):
        raise ValueError(f"images: {x.shape[1]}x{x.shape[2]} pixels, but this VAE takes {s}x{s} images")
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if not x.dtype.is_floating_point:
        raise ValueError(f"images: expected uint8 (0..255) or floating (0..1) pixels, got {x.dtype}")
    if x.numel() and not (bool(torch.isfinite(x).all()) and x.min() >= 0 and x.max() <= 1):
        raise ValueError("images: floating pixels must be finite and in [0, 1] (or pass uint8 0..255)")
    return x.permute(0, 3, 1, 2).float() * 2.0 - 1.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (n, C, s, s) in [-1, 1] -> uint8 numpy (n, s, s, C)."""
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


# ---- the model ---------------------------------------------------------------------------------------------------
class ImageVAE(nn.Module):
    """Encoder + diagonal Gaussian posterior + decoder. ``encode`` / ``decode`` work on images and scaled latents;
    :meth:`posterior` / :meth:`reconstruct` are the raw float passes (pixels in [-1, 1], channels first)."""

    def __init__(self, config: ImageVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder, self.decoder = _Encoder(config), _Decoder(config)

    @property
    def latent_size(self) -> int:
        return self.config.latent_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, C, s, s) in [-1, 1] -> (mean, logvar), each (b, latent_channels, g, g), unscaled."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (b, latent_channels, g, g) -> (b, C, s, s), roughly in [-1, 1]."""
        return self.decoder(z)

    @torch.no_grad()
    def encode(
        self, images: ImagesLike, sample: bool = False, generator: torch.Generator | None = None,
        batch_size: int = 256,
    ) -> torch.Tensor:  # fmt: skip
        """Images -> scaled latents float32 (n, latent_channels, latent_size, latent_size) on the VAE's device.

        ``images``: uint8 (n, s, s, C) tensor or array, floats in [0, 1] of that shape, or a list of PIL images.
        The posterior mean by default; ``sample=True`` draws from the posterior (``generator`` on the VAE's device).
        """
        x = _to_unit(images, self.config)
        cfg, out = self.config, []
        for i in range(0, len(x), batch_size):
            mean, logvar = self.posterior(x[i : i + batch_size].to(self.device))
            z = mean
            if sample:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                z = mean + torch.exp(0.5 * logvar) * noise
            out.append((z - cfg.shift_factor) * cfg.scaling_factor)
        if not out:
            g = self.latent_size
            return torch.zeros(0, cfg.latent_channels, g, g, device=self.device)
        return torch.cat(out).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Scaled latents (n, latent_channels, latent_size, latent_size) -> uint8 numpy images (n, s, s, C)."""
        cfg, g = self.config, self.latent_size
        z = torch.as_tensor(latents)
        expected = f"(n, {cfg.latent_channels}, {g}, {g})"
        if not z.dtype.is_floating_point:
            raise ValueError(f"latents: expected floating latents {expected}, got {z.dtype}")
        if z.dim() != 4:
            raise ValueError(f"latents: expected 4 dimensions {expected}, got shape {tuple(z.shape)}")
        if tuple(z.shape[1:]) != (cfg.latent_channels, g, g):
            raise ValueError(f"latents: expected shape {expected} for this VAE, got {tuple(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("latents: contain NaN or infinity")
        out = []
        for i in range(0, len(z), batch_size):
            zi = z[i : i + batch_size].to(self.device, torch.float32) / cfg.scaling_factor + cfg.shift_factor
            out.append(_to_uint8(self.reconstruct(zi)))
        s = cfg.image_size
        return np.concatenate(out) if out else np.zeros((0, s, s, cfg.channels), dtype=np.uint8)

    # ---- files -------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` to a temporary folder, then rename it onto ``directory``."""
        from safetensors.torch import save_file

        with atomic_directory(directory) as tmp:
            config = {"kind": KIND, "format_version": FORMAT_VERSION, **self.config.to_dict()}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"kind": KIND})
            (tmp / WEIGHTS_FILE).chmod(0o644)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> ImageVAE:
        """Load a VAE saved by :meth:`save_pretrained`; a missing, corrupt or mismatched file raises an error
        naming it."""

        directory = Path(directory)
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no VAE config (is {directory} a saved image VAE?)")
        raw = read_mapping(path, "VAE config")
        if raw.get("kind") != KIND:
            raise ValueError(f"{path}: kind is {raw.get('kind')!r}, expected {KIND!r}")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported format_version {raw.get('format_version')!r}")
        try:
            config = from_dict(ImageVAEConfig, {k: v for k, v in raw.items() if k not in ("kind", "format_version")})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
        model = cls(config)
        load_checked_weights(model, directory / WEIGHTS_FILE, CONFIG_FILE)
        return model.eval().to(device)


# ---- evaluation and training -------------------------------------------------------------------------------------
def evaluate_vae(vae: ImageVAE, images: ImagesLike) -> dict:
    """Round-trip PSNR (posterior mean, uint8 in and out) and the scaled latents' mean and std on ``images``."""
    pixels = _as_uint8(images, vae.config).permute(0, 2, 3, 1)  # (n, s, s, C)
    if len(pixels) == 0:
        raise ValueError("images: no images to evaluate")
    z = vae.encode(pixels)
    return {
        "images": len(pixels),
        "psnr": psnr(pixels, torch.from_numpy(vae.decode(z))),
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
    }


@dataclass
class VAETrainingConfig(TrainingConfig):
    """The ``training`` section of a VAE recipe (:func:`train_vae`'s arguments): the VQ's, with its own batch size
    and a reconstruction loss."""

    batch_size: int = 32
    recon_loss: Literal["mse", "l1"] = "mse"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.recon_loss not in ("mse", "l1"):
            raise ValueError(f"recon_loss: must be 'mse' or 'l1', got {self.recon_loss!r}")


@dataclass
class TrainReport:
    steps: int
    train_images: int
    held_out_images: int
    seconds: float
    final_loss: float  # EMA of the training loss (reconstruction + kl_weight * KL)
    final_kl: float  # EMA of the KL per latent element
    held_out_psnr: float  # dB over all held-out pixels (uint8 round trip through the posterior mean)
    held_out_latent_std: float  # std of the scaled held-out latents (about 1 by construction of scaling_factor)
    scaling_factor: float
    shift_factor: float

    def summary(self) -> str:
        return (
            f"{self.steps} steps on {self.train_images} images in {self.seconds:.0f}s; held-out "
            f"({self.held_out_images} images): PSNR {self.held_out_psnr:.2f} dB, scaled latent std "
            f"{self.held_out_latent_std:.3f}; scaling_factor {self.scaling_factor:.4f}, shift_factor "
            f"{self.shift_factor:.4f}"
        )


def _as_uint8(images: ImagesLike, cfg: ImageVAEConfig) -> torch.Tensor:
    """Images -> uint8 (n, C, s, s), checked as :meth:`ImageVAE.encode` checks them."""
    return ((_to_unit(images, cfg) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def _latent_statistics(model: ImageVAE, pixels: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(mean, std) over every element of the posterior means of ``pixels`` (uint8 (n, C, s, s))."""
    means = [model.posterior(pixels[i : i + batch_size].float() / 127.5 - 1.0)[0].double()
             for i in range(0, len(pixels), batch_size)]  # fmt: skip
    z = torch.cat(means)
    return float(z.mean()), float(z.std())


def train_vae(
    images: ImagesLike,
    config: ImageVAEConfig,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    *,
    held_out: ImagesLike | None = None,
    held_out_fraction: float = 0.1,
    warmup_steps: int = 100,
    weight_decay: float = 0.0,
    recon_loss: Literal["mse", "l1"] = "mse",
    resume: str | os.PathLike | None = None,
) -> tuple[ImageVAE, TrainReport]:
    """Train a VAE on ``images`` (AdamW; reconstruction loss + ``config.kl_weight`` * KL) and report held-out PSNR.

    ``held_out`` images are evaluated, never trained on; without them a seeded ``held_out_fraction`` of ``images``
    is held out. After training, ``scaling_factor`` and ``shift_factor`` are set from the posterior means of (up to
    ``SCALE_IMAGES``) training images. Deterministic for a given seed on a given device. Returns the VAE on CPU.
    With ``resume`` (`mom.tokenization.resume`), a stopped run continues from its file, and SIGINT / SIGTERM stop
    this one after its current step into that file (`TrainingStopped`); the caller removes the file once the VAE is
    saved.
    """
    from tqdm import tqdm

    training = VAETrainingConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                                 weight_decay=weight_decay, seed=seed, device=str(device),
                                 recon_loss=recon_loss)  # validates
    pixels = _as_uint8(images, config)  # (n, C, s, s)
    gen = torch.Generator().manual_seed(seed)
    if held_out is None:
        if not 0 < held_out_fraction < 1:
            raise ValueError(f"held_out_fraction: must be in (0, 1) when no held_out images are given, "
                             f"got {held_out_fraction}")  # fmt: skip
        n_held = round(held_out_fraction * len(pixels))
        if n_held < 1 or n_held >= len(pixels):
            raise ValueError(f"images: {len(pixels)} images leave no held-out or no training image at "
                             f"held_out_fraction={held_out_fraction}")  # fmt: skip
        order = torch.randperm(len(pixels), generator=gen)
        held, pixels = pixels[order[:n_held]], pixels[order[n_held:]]
    else:
        held = _as_uint8(held_out, config)
        if len(held) == 0:
            raise ValueError("held_out: no images")
    if len(pixels) == 0:
        raise ValueError("images: no training images")
    torch.manual_seed(seed)
    model = ImageVAE(config).to(device).train()
    data = pixels.to(device)
    optim, sched = warmup_cosine_adamw(model.parameters(), lr, weight_decay, steps, warmup_steps)
    reconstruction = F.mse_loss if recon_loss == "mse" else F.l1_loss
    def identity() -> dict:  # what the run is, for its resume file (a run may continue on another device)
        return {"model": "image VAE", "vae": config.to_dict(),
                "training": {k: v for k, v in dataclasses.asdict(training).items() if k != "device"},
                "train_images": images_digest(pixels), "held_out_images": images_digest(held)}

    with TrainingRun(resume, identity, model, optim, sched, gen, {"loss_ema": None, "kl_ema": None}, progress) as run:
        # on the device: the loop reads them only when it shows them (no wait for the GPU every step)
        loss_ema, kl_ema = (device_number(run.counters[k], device) for k in ("loss_ema", "kl_ema"))
        bar = tqdm(range(run.step, steps), desc="train image VAE", unit="step", initial=run.step, total=steps,
                   disable=not progress)
        for step in bar:
            idx = torch.randint(0, len(data), (batch_size,), generator=gen).to(device)
            x = data[idx].float() / 127.5 - 1.0  # (b, C, s, s)
            mean, logvar = model.posterior(x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # reparameterised posterior sample
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()  # KL(q || N(0, 1)) per latent element
            loss = reconstruction(model.reconstruct(z), x) + config.kl_weight * kl
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            loss_ema = loss.detach() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.detach()
            kl_ema = kl.detach() if kl_ema is None else 0.95 * kl_ema + 0.05 * kl.detach()
            if step % SHOW_EVERY == 0 or step == steps - 1:
                shown = loss_ema.item()
                if not math.isfinite(shown):  # a non-finite loss stays in the EMA: caught here, SHOW_EVERY steps on
                    raise FloatingPointError(f"by step {step}: the training loss is {shown} (lower lr?)")
                bar.set_postfix(loss=f"{shown:.4f}", kl=f"{kl_ema.item():.2f}")
            run.after_step(step + 1, steps, {"loss_ema": loss_ema, "kl_ema": kl_ema})
    model.eval()
    pick = torch.randperm(len(data), generator=gen)[:SCALE_IMAGES].to(device)
    shift, std = _latent_statistics(model, data[pick], batch_size=256)
    model.config = dataclasses.replace(config, scaling_factor=1.0 / max(std, 1e-8), shift_factor=shift)
    model = model.cpu()
    metrics = evaluate_vae(model, held.permute(0, 2, 3, 1))
    report = TrainReport(
        steps=steps,
        train_images=len(pixels),
        held_out_images=metrics["images"],
        seconds=run.seconds(),
        final_loss=float(loss_ema),
        final_kl=float(kl_ema),
        held_out_psnr=metrics["psnr"],
        held_out_latent_std=metrics["latent_std"],
        scaling_factor=model.config.scaling_factor,
        shift_factor=model.config.shift_factor,
    )
    return model, report
