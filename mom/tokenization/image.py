"""Discrete image tokenizer: a small convolutional VQ-VAE (the Chameleon setting, at toy scale).

An image of ``image_size``² RGB pixels is encoded to a ``(image_size / downsample)``² grid of codes in
``[0, codebook_size)``, read row-major, and decoded back to pixels. The codebook is learnt with exponential moving
averages of the encoder outputs assigned to each code (VQ-VAE-2), and a code used less than
``dead_code_threshold`` times per batch (EMA) is restarted on a random encoder output of the batch.

Command line (``mom-tokenizer image --help``, in :mod:`mom.cli.tokenizer`):

* ``train --recipe tokenizers/recipes/image_small.yaml --out tokenizers/small/image``
* ``eval --tokenizer tokenizers/small/image --images data/small/raw/images [--split validation]``

A tokenizer directory holds ``config.json`` (``"kind": "vq-image"``) and ``model.safetensors``;
:func:`load_image_tokenizer` also opens a ``transformers`` ``ChameleonVQVAE`` saved with ``save_pretrained``
(``"kind": "chameleon-vqvae"`` or ``"model_type": "chameleon_vqgan"``; encode only, see
:class:`ChameleonImageTokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from mom.tokenization.conv_blocks import ResBlock, group_norm
from mom.tokenization.resume import SHOW_EVERY, TrainingRun, device_number, images_digest
from mom.tokenization.schedule import warmup_cosine_adamw
from mom.tokenization.weights import load_checked_weights
from mom.utils.atomic import atomic_directory
from mom.utils.configio import from_dict, read_mapping

KIND = "vq-image"
CHAMELEON_KIND = "chameleon-vqvae"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "training_report.json"

ImagesLike = Union[Sequence[Image.Image], torch.Tensor, np.ndarray]  # noqa: UP007 - a runtime alias


# ---- configuration -----------------------------------------------------------------------------------------------
@dataclass
class ImageTokenizerConfig:
    """Architecture of the VQ-VAE. ``channels`` lists the width at each halving of the side, from ``image_size / 2``
    down to the code grid, so ``downsample == 2 ** len(channels)``."""

    image_size: int = 32
    downsample: int = 4
    codebook_size: int = 512
    code_dim: int = 16  # width of a code vector; low-dimensional lookups keep more codes in use (ViT-VQGAN)
    channels: tuple[int, ...] = (32, 64)
    num_res_blocks: int = 1  # residual blocks per level
    beta: float = 0.25  # commitment weight (VQ-VAE paper)
    ema_decay: float = 0.99  # codebook EMA decay (VQ-VAE-2)
    dead_code_threshold: float = 1.0  # restart a code used fewer than this many times per batch (EMA)

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        for name in ("image_size", "downsample", "codebook_size", "code_dim", "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_res_blocks" else 1):
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.downsample & (self.downsample - 1) or self.downsample < 2:
            raise ValueError(f"downsample: must be a power of two >= 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size: {self.image_size} is not divisible by downsample={self.downsample}")
        if 2 ** len(self.channels) != self.downsample:
            raise ValueError(
                f"channels: need log2(downsample) = {int(math.log2(self.downsample))} entries for "
                f"downsample={self.downsample}, got {list(self.channels)}"
            )
        if any(not isinstance(c, int) or c < 1 for c in self.channels):
            raise ValueError(f"channels: must be positive integers, got {list(self.channels)}")
        if not 2 <= self.codebook_size <= 2**16:
            raise ValueError(f"codebook_size: must be in [2, 65536] (256-8192 is typical), got {self.codebook_size}")
        if self.beta < 0:
            raise ValueError(f"beta: must be >= 0, got {self.beta}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay: must be in (0, 1), got {self.ema_decay}")
        if self.dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold: must be >= 0, got {self.dead_code_threshold}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d


# ---- network -----------------------------------------------------------------------------------------------------
GROUPS = 8  # GroupNorm groups where the width allows


def _norm(channels: int) -> nn.GroupNorm:
    return group_norm(channels, GROUPS)


def _res_block(channels: int) -> ResBlock:
    return ResBlock(channels, channels, GROUPS)


class _Encoder(nn.Module):
    """(b, 3, s, s) in [-1, 1] -> (b, code_dim, s/downsample, s/downsample). Each level halves the side with a
    strided 4x4 convolution, then refines with residual blocks."""

    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c in zip((3, *cfg.channels[:-1]), cfg.channels):
            layers.append(nn.Conv2d(c_in, c, 4, stride=2, padding=1))
            layers += [_res_block(c) for _ in range(cfg.num_res_blocks)]
        layers += [_norm(cfg.channels[-1]), nn.SiLU(), nn.Conv2d(cfg.channels[-1], cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Decoder(nn.Module):
    """(b, code_dim, g, g) -> (b, 3, g*downsample, g*downsample), roughly in [-1, 1]; mirrors the encoder with
    stride-2 transposed convolutions."""

    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        chans = cfg.channels[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, chans[0], 3, padding=1)]
        for level, c in enumerate(chans):
            layers += [_res_block(c) for _ in range(cfg.num_res_blocks)]
            if level + 1 < len(chans):
                layers.append(nn.ConvTranspose2d(c, chans[level + 1], 4, stride=2, padding=1))  # doubles the side
        layers += [_norm(chans[-1]), nn.SiLU(), nn.ConvTranspose2d(chans[-1], 3, 4, stride=2, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class _Codebook(nn.Module):
    """Nearest-neighbour codebook with EMA updates and dead-code restarts (buffers, no gradients)."""

    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        self.decay, self.threshold = cfg.ema_decay, cfg.dead_code_threshold
        # Random until training's first step replaces every code with an encoder output.
        self.register_buffer("embedding", torch.randn(cfg.codebook_size, cfg.code_dim))  # (K, D)
        # Training statistics, not saved: every code starts "dead", so step 1 seeds the codebook with encoder outputs.
        self.register_buffer("ema_count", torch.zeros(cfg.codebook_size), persistent=False)  # (K,)
        self.register_buffer("ema_sum", torch.zeros(cfg.codebook_size, cfg.code_dim), persistent=False)  # (K, D)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n,) index of the closest code (squared Euclidean distance)."""
        e = self.embedding
        dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)  # (n, K)
        return dist.argmin(1)

    @torch.no_grad()
    def update(self, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """EMA step on the batch ``z`` (n, D) assigned to ``codes`` (n,); returns the number of restarted codes (a
        0-d tensor). Nothing here reads the device from the host (no ``bincount``, masked indexing or ``nonzero``,
        which wait for the GPU mid-step): every code gets a restart candidate, kept where the code is dead."""
        k = self.embedding.shape[0]
        ones = torch.ones_like(codes, dtype=z.dtype)
        counts = torch.zeros(k, dtype=z.dtype, device=z.device).index_add_(0, codes, ones)  # (K,) uses this batch
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, z)  # (K, D)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        floor = max(self.threshold, 1e-6)
        dead = (self.ema_count < floor)[:, None]  # (K, 1)
        pick = torch.randint(0, z.shape[0], (k,), device=z.device)
        picked = z[pick]  # (K, D)
        restart = picked + 1e-3 * z.std() * torch.randn_like(picked)  # jittered apart repeated picks
        means = self.ema_sum / self.ema_count.clamp_min(floor)[:, None]  # the live codes' EMA means
        self.embedding.copy_(torch.where(dead, restart, means))
        self.ema_sum.copy_(torch.where(dead, restart * floor, self.ema_sum))
        self.ema_count.copy_(torch.where(dead[:, 0], floor, self.ema_count))
        return dead.sum()


class VQModel(nn.Module):
    """Encoder + codebook + decoder; pixels are floats in [-1, 1], channels first."""

    def __init__(self, cfg: ImageTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder, self.codebook, self.decoder = _Encoder(cfg), _Codebook(cfg), _Decoder(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, s, s) -> codes (b, g*g)."""
        z = self.encoder(x)  # (b, D, g, g)
        b, d, g, _ = z.shape
        return self.codebook.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, g * g)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (b, g*g) -> (b, 3, s, s)."""
        b, g = codes.shape[0], self.cfg.grid_size
        q = self.codebook.embedding[codes].view(b, g, g, -1).permute(0, 3, 1, 2)  # (b, D, g, g)
        return self.decoder(q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """Training pass: (reconstruction, commitment loss, codes (b*g*g,), restarted codes (a 0-d tensor; 0 in
        eval mode))."""
        z = self.encoder(x)  # (b, D, g, g)
        b, d, g, _ = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (b*g*g, D)
        codes = self.codebook.nearest(flat.detach())
        q = self.codebook.embedding[codes]
        commitment = F.mse_loss(flat, q)
        restarts = self.codebook.update(flat.detach(), codes) if self.training else 0
        q = flat + (q - flat).detach()  # straight-through estimator
        recon = self.decoder(q.view(b, g, g, d).permute(0, 3, 1, 2))
        return recon, commitment, codes, restarts


# ---- tokenizer ---------------------------------------------------------------------------------------------------
def images_to_uint8(images: ImagesLike, size: int) -> torch.Tensor:
    """PIL images (centre-cropped and resized to ``size``) or a uint8 array (n, size, size, 3) -> uint8 (n, s, s, 3)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(images)
        if t.dtype != torch.uint8 or t.dim() != 4 or tuple(t.shape[1:]) != (size, size, 3):
            raise ValueError(f"images: expected a uint8 tensor of shape (n, {size}, {size}, 3), got {t.dtype} "
                             f"{tuple(t.shape)}")  # fmt: skip
        return t
    arrays = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ValueError(f"images[{i}]: expected a PIL image, got {type(im).__name__}")
        if im.mode != "RGB":
            rgba = im.convert("RGBA")  # transparency onto white, as the image sources do
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        if im.size != (size, size):
            im = ImageOps.fit(im, (size, size), method=Image.Resampling.LANCZOS)
        arrays.append(np.asarray(im, dtype=np.uint8))
    if not arrays:
        return torch.zeros(0, size, size, 3, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays))


def _to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (n, s, s, 3) -> float (n, 3, s, s) in [-1, 1]."""
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (n, 3, s, s) in [-1, 1] -> uint8 (n, s, s, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class ImageTokenizerLike(Protocol):
    """What the corpus builder needs from an image tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def tokens_per_image(self) -> int: ...
    @property
    def image_size(self) -> int: ...
    def encode(self, images: ImagesLike) -> torch.Tensor: ...
    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...


def _check_codes(codes: torch.Tensor, vocab_size: int, tokens_per_image: int) -> torch.Tensor:
    codes = torch.as_tensor(codes)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes: expected an integer tensor, got {codes.dtype}")
    if codes.dim() != 2 or codes.shape[1] != tokens_per_image:
        raise ValueError(f"codes: expected shape (n, {tokens_per_image}), got {tuple(codes.shape)}")
    bad = (codes < 0) | (codes >= vocab_size)
    if bool(bad.any()):
        raise ValueError(f"codes: value {int(codes[bad][0])} is outside [0, {vocab_size}) (the image vocabulary)")
    return codes.long()


class ImageTokenizer:
    """Images <-> discrete codes with a trained :class:`VQModel` (``"kind": "vq-image"``)."""

    def __init__(self, config: ImageTokenizerConfig, model: VQModel | None = None) -> None:
        self.config = config
        self.model = (model or VQModel(config)).eval()

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def device(self) -> torch.device:
        return self.model.codebook.embedding.device

    def to(self, device: str | torch.device) -> ImageTokenizer:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: ImagesLike, batch_size: int = 256) -> torch.Tensor:
        """Images (PIL list, resized as needed, or uint8 (n, s, s, 3)) -> codes int64 (n, tokens_per_image)."""
        pixels = images_to_uint8(images, self.image_size)
        out = [
            self.model.encode(_to_unit(pixels[i : i + batch_size].to(self.device))).cpu()
            for i in range(0, len(pixels), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.tokens_per_image, dtype=torch.long)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Codes (n, tokens_per_image) in [0, vocab_size) -> uint8 images (n, s, s, 3)."""
        codes = _check_codes(codes, self.vocab_size, self.tokens_per_image)
        s = self.image_size
        out = [
            _to_uint8(self.model.decode(codes[i : i + batch_size].to(self.device))).cpu()
            for i in range(0, len(codes), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, s, s, 3, dtype=torch.uint8)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` to a temporary folder, then rename it onto ``directory``."""
        from safetensors.torch import save_file

        with atomic_directory(directory) as tmp:
            config = {"kind": KIND, "format_version": FORMAT_VERSION, **self.config.to_dict()}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"kind": KIND})
            (tmp / WEIGHTS_FILE).chmod(0o644)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> ImageTokenizer:
        """Load a tokenizer saved by :meth:`save`; a missing or mismatched file raises an error naming it."""

        directory = Path(directory)
        raw = _read_config(directory)
        if raw.get("kind") != KIND:
            raise ValueError(f"{directory / CONFIG_FILE}: kind is {raw.get('kind')!r}, expected {KIND!r}")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory / CONFIG_FILE}: unsupported format_version {raw.get('format_version')!r}")
        fields = {k: v for k, v in raw.items() if k not in ("kind", "format_version")}
        try:
            config = from_dict(ImageTokenizerConfig, fields)
        except ValueError as err:
            raise ValueError(f"{directory / CONFIG_FILE}: {err}") from err
        model = VQModel(config)
        load_checked_weights(model, directory / WEIGHTS_FILE, CONFIG_FILE)
        return cls(config, model).to(device)


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer config (is {directory} a saved image tokenizer?)")
    return read_mapping(path, "image tokenizer config")


# ---- pretrained Chameleon VQ-VAE ---------------------------------------------------------------------------------
class ChameleonImageTokenizer:
    """Adapter for a ``transformers`` ``ChameleonVQVAE`` saved locally with ``save_pretrained`` (no downloads).

    ``transformers`` ships only the encoder and quantizer of Chameleon's VQ-GAN, so :meth:`decode` raises
    ``NotImplementedError``. Pixels are scaled as ``ChameleonImageProcessor`` does (``x * 0.0078 - 1``).
    """

    RESCALE = 0.0078  # ChameleonImageProcessor: rescale_factor=0.0078, image_mean=image_std=1.0

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        cfg = model.config
        self._image_size = int(cfg.resolution)
        self._grid = self._image_size // 2 ** (len(cfg.channel_multiplier) - 1)
        self._vocab = int(cfg.num_embeddings)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def tokens_per_image(self) -> int:
        return self._grid**2

    @property
    def image_size(self) -> int:
        return self._image_size

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> ChameleonImageTokenizer:
        try:
            from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE
        except ImportError as err:
            raise ImportError(f"{directory}: a chameleon-vqvae tokenizer needs `pip install transformers`") from err
        directory = Path(directory)
        _read_config(directory)
        if not any((directory / f).is_file() for f in (WEIGHTS_FILE, "model.safetensors.index.json")):
            raise FileNotFoundError(f"{directory / WEIGHTS_FILE}: weights file missing")
        model = ChameleonVQVAE.from_pretrained(str(directory), local_files_only=True)
        return cls(model.to(device))

    @torch.no_grad()
    def encode(self, images: ImagesLike, batch_size: int = 16) -> torch.Tensor:
        pixels = images_to_uint8(images, self.image_size)
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(pixels), batch_size):
            x = pixels[i : i + batch_size].permute(0, 3, 1, 2).float() * self.RESCALE - 1.0
            tokens = self.model.encode(x.to(device)).image_tokens  # (b * g * g,)
            out.append(tokens.view(len(x), -1).cpu().long())
        return torch.cat(out) if out else torch.zeros(0, self.tokens_per_image, dtype=torch.long)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        _check_codes(codes, self.vocab_size, self.tokens_per_image)
        raise NotImplementedError(
            "transformers' ChameleonVQVAE has no decoder (only the encoder and quantizer are ported); "
            "decode Chameleon image tokens with the original Chameleon VQ-GAN code"
        )


def load_image_tokenizer(directory: str | os.PathLike, device: str | torch.device = "cpu") -> ImageTokenizerLike:
    """Open a tokenizer directory by its ``config.json``: ``"kind": "vq-image"`` (ours) or ``"chameleon-vqvae"`` /
    ``"model_type": "chameleon_vqgan"`` (a saved ``transformers`` ChameleonVQVAE)."""
    directory = Path(directory)
    raw = _read_config(directory)
    kind = raw.get("kind")
    if kind == KIND:
        return ImageTokenizer.load(directory, device)
    if kind == CHAMELEON_KIND or (kind is None and raw.get("model_type") == "chameleon_vqgan"):
        return ChameleonImageTokenizer.load(directory, device)
    raise ValueError(f"{directory / CONFIG_FILE}: unknown image tokenizer kind {kind!r}; "
                     f"expected {KIND!r} or {CHAMELEON_KIND!r}")  # fmt: skip


# ---- training ----------------------------------------------------------------------------------------------------
@dataclass
class TrainingConfig:
    """The ``training`` section of an image tokenizer recipe (`train_image_tokenizer`'s arguments); the VAE's
    (`mom.tokenization.vae.VAETrainingConfig`) adds its reconstruction loss."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 10% of lr
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay: must be >= 0")


@dataclass
class TrainReport:
    steps: int
    train_images: int
    held_out_images: int
    seconds: float
    final_loss: float
    restarts: int  # dead codes restarted over the whole run
    held_out_psnr: float  # dB over all held-out pixels (uint8 round trip)
    codes_used: int  # distinct codes in the held-out encodings
    codebook_usage: float  # codes_used / codebook_size
    perplexity: float  # exp(entropy) of the held-out code histogram

    def summary(self) -> str:
        return (
            f"{self.steps} steps on {self.train_images} images in {self.seconds:.0f}s; held-out ({self.held_out_images}"
            f" images): PSNR {self.held_out_psnr:.2f} dB, codebook usage {self.codes_used} codes "
            f"({100 * self.codebook_usage:.1f}%), perplexity {self.perplexity:.1f}; {self.restarts} code restarts"
        )


def psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB of uint8 images, from the mean squared error over all pixels and channels."""
    mse = (original.double() - reconstruction.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def evaluate_image_tokenizer(tokenizer: ImageTokenizerLike, images: ImagesLike) -> dict:
    """Reconstruction PSNR and codebook usage of ``tokenizer`` on ``images``."""
    pixels = images_to_uint8(images, tokenizer.image_size)
    codes = tokenizer.encode(pixels)
    hist = torch.bincount(codes.flatten(), minlength=tokenizer.vocab_size).double()
    p = hist[hist > 0] / hist.sum()
    used = int((hist > 0).sum())
    return {
        "images": len(pixels),
        "psnr": psnr(pixels, tokenizer.decode(codes)),
        "codes_used": used,
        "codebook_usage": used / tokenizer.vocab_size,
        "perplexity": float(torch.exp(-(p * p.log()).sum())),
    }


def train_image_tokenizer(
    images: ImagesLike,
    config: ImageTokenizerConfig,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    held_out: ImagesLike | None = None,
    *,
    device: str | torch.device = "cpu",
    warmup_steps: int = 100,
    weight_decay: float = 0.0,
    progress: bool = True,
    resume: str | os.PathLike | None = None,
) -> tuple[ImageTokenizer, TrainReport]:
    """Train a VQ-VAE on ``images`` (AdamW, MSE + beta * commitment) and report held-out PSNR / codebook usage.

    ``held_out`` defaults to the training images when not given (then the figures are not held out). With ``resume``
    (`mom.tokenization.resume`), a stopped run continues from its file, and SIGINT / SIGTERM stop this one after its
    current step into that file (`TrainingStopped`); the caller removes the file once the tokenizer is saved.
    """
    from tqdm import tqdm

    training = TrainingConfig(steps, batch_size, lr, warmup_steps, weight_decay, seed, str(device))  # validates
    pixels = images_to_uint8(images, config.image_size)
    if len(pixels) == 0:
        raise ValueError("images: no training images")
    held = pixels if held_out is None else images_to_uint8(held_out, config.image_size)
    torch.manual_seed(seed)
    model = VQModel(config).to(device).train()
    data = pixels.to(device)
    optim, sched = warmup_cosine_adamw(model.parameters(), lr, weight_decay, steps, warmup_steps)
    gen = torch.Generator().manual_seed(seed)
    def identity() -> dict:  # what the run is, for its resume file (a run may continue on another device)
        return {"model": "image VQ", "tokenizer": config.to_dict(),
                "training": {k: v for k, v in dataclasses.asdict(training).items() if k != "device"},
                "train_images": images_digest(pixels), "held_out_images": images_digest(held)}

    with TrainingRun(resume, identity, model, optim, sched, gen, {"restarts": 0, "loss_ema": None}, progress) as run:
        # on the device: the loop reads them only when it shows them (no wait for the GPU every step)
        restarts = torch.as_tensor(run.counters["restarts"], device=device)
        loss_ema = device_number(run.counters["loss_ema"], device)
        bar = tqdm(range(run.step, steps), desc="train image VQ", unit="step", initial=run.step, total=steps,
                   disable=not progress)
        for step in bar:
            idx = torch.randint(0, len(data), (batch_size,), generator=gen).to(device)
            x = _to_unit(data[idx])
            recon, commitment, codes, restarted = model(x)
            loss = F.mse_loss(recon, x) + config.beta * commitment
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            restarts = restarts + restarted
            loss_ema = loss.detach() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.detach()
            if step % SHOW_EVERY == 0 or step == steps - 1:
                used = int(torch.unique(codes).numel())
                bar.set_postfix(loss=f"{loss_ema.item():.4f}", used=f"{used}/{config.codebook_size}",
                                restarts=int(restarts))
            run.after_step(step + 1, steps, {"restarts": restarts, "loss_ema": loss_ema})
    tokenizer = ImageTokenizer(config, model.eval())
    metrics = evaluate_image_tokenizer(tokenizer, held)
    report = TrainReport(
        steps=steps,
        train_images=len(pixels),
        held_out_images=metrics["images"],
        seconds=run.seconds(),
        final_loss=float(loss_ema),
        restarts=int(restarts),
        held_out_psnr=metrics["psnr"],
        codes_used=metrics["codes_used"],
        codebook_usage=metrics["codebook_usage"],
        perplexity=metrics["perplexity"],
    )
    return tokenizer.to("cpu"), report
