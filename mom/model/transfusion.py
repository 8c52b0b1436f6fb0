"""The Transfusion setting (Zhou et al. 2024, arXiv 2408.11039; MoM's third setting, arXiv 2501.16295): one MoM (or,
with ``decouple=()``, dense Mamba) over an interleaved stream of text tokens and continuous image latent patches.

Sequence layout: ``<s> caption <image> [patch_1 .. patch_n] </image> </s>`` (or the image first). The begin / end of
image markers are text tokens; each image position holds one ``p x p`` patch of the image's VAE latent
(``latent_channels * p * p`` numbers) and carries the one id of the image modality (``image_token_id``), so routing
by id sends image positions through the image experts of every decoupled projection while the scan runs over the
whole interleaved sequence.

* Text positions: token embedding in, LM head out, next-token loss (targets that are image positions are ignored).
* Image positions: ``image_in(noisy patch) + time_embed(t)`` in (one diffusion timestep per image), ``noise_head``
  out: the predicted noise, MSE against the true noise (`mom.model.diffusion`).
* ``loss = text loss + diffusion_loss_weight * diffusion loss``; ``modality_losses`` / sums / counts hold the text
  next-token loss under ``text`` and the diffusion loss (per-element MSE of a patch) under ``image``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init

from mom.model.cache import MoMCache
from mom.model.config import MoMConfig
from mom.model.diffusion import (
    SCHEDULES,
    NoiseSchedule,
    add_noise,
    check_timesteps,
    make_schedule,
    noise_prediction_loss,
)
from mom.model.inputs import IGNORE_INDEX, modality_of_ids
from mom.model.modeling import MoMCausalLMOutput, MoMModel, MoMPreTrainedModel

IMAGE_MODALITY = "image"
# Transfusion's loss balance: L = L_LM + lambda * L_DDPM with lambda = 5 (Zhou et al. 2024, section 4.1)
TRANSFUSION_LAMBDA = 5.0
TIME_FREQUENCIES = 256  # sinusoidal features of the timestep embedding (DiT's frequency_embedding_size)
MAX_PERIOD = 10_000  # of the sinusoidal features (the transformer position encoding's)
IMAGE_MODULES = ("image_in", "time_embed", "noise_head")  # the image-only modules (LoRA presets, FLOPs)


class MoMTransfusionConfig(MoMConfig):
    """`MoMConfig` plus the image-latent side of the Transfusion setting.

    Args:
        patch_size: ``p``: each image position is a ``p x p`` patch of the latent.
        latent_channels: channels ``c`` of the VAE latent.
        latent_size: side ``h'`` of the (square) latent; an image spans ``(h' / p) ** 2`` positions.
        diffusion_loss_weight: ``lambda`` of ``loss = LM loss + lambda * diffusion loss`` (Transfusion's 5).
        noise_schedule: ``cosine`` (Transfusion's) or ``linear`` (`mom.model.diffusion`).
        num_timesteps: diffusion timesteps ``T``.
        **kwargs: `MoMConfig`'s; ``modalities`` must hold ``image`` with a vocabulary of exactly one id.
    """

    model_type = "mom_transfusion"

    def __init__(
        self,
        patch_size: int = 2,
        latent_channels: int = 4,
        latent_size: int = 8,
        diffusion_loss_weight: float = TRANSFUSION_LAMBDA,
        noise_schedule: str = "cosine",
        num_timesteps: int = 1000,
        **kwargs,
    ) -> None:
        kwargs.setdefault("modalities", ("text", IMAGE_MODALITY))
        kwargs.setdefault("vocab_sizes", (1024, 1))
        self.patch_size = patch_size
        self.latent_channels = latent_channels
        self.latent_size = latent_size
        self.diffusion_loss_weight = float(diffusion_loss_weight)
        self.noise_schedule = noise_schedule
        self.num_timesteps = num_timesteps
        super().__init__(**kwargs)
        for name in ("patch_size", "latent_channels", "latent_size", "num_timesteps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.latent_size % self.patch_size:
            raise ValueError(f"latent_size: {self.latent_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps: must be >= 2, got {self.num_timesteps}")
        if not math.isfinite(self.diffusion_loss_weight) or self.diffusion_loss_weight < 0:
            raise ValueError(f"diffusion_loss_weight: must be a finite number >= 0, got {diffusion_loss_weight!r}")
        if self.noise_schedule not in SCHEDULES:
            raise ValueError(f"noise_schedule: must be one of {list(SCHEDULES)}, got {self.noise_schedule!r}")
        if IMAGE_MODALITY not in self.modalities:
            raise ValueError(f"modalities: the Transfusion setting needs an {IMAGE_MODALITY!r} modality, got "
                             f"{self.modalities}")
        if self.vocab_sizes[self.modalities.index(IMAGE_MODALITY)] != 1:
            raise ValueError(f"vocab_sizes: the {IMAGE_MODALITY!r} modality of the Transfusion setting has one id (the "
                             f"image-patch position), got {self.vocab_sizes}")

    @property
    def patch_dim(self) -> int:
        """Numbers per image position: ``latent_channels * patch_size ** 2``."""
        return self.latent_channels * self.patch_size**2

    @property
    def patches_per_image(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        """The unified id every image position carries."""
        return self.vocab_offsets[self.modalities.index(IMAGE_MODALITY)]


def timestep_features(t: torch.Tensor, dim: int = TIME_FREQUENCIES) -> torch.Tensor:
    """Sinusoidal features of integer timesteps: (...) -> (..., dim) fp32 (cos then sin, as DiT's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs  # (..., half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Timestep -> sinusoidal features -> Linear -> SiLU -> Linear: (...) -> (..., d_model)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(TIME_FREQUENCIES, d_model)
        self.fc2 = nn.Linear(d_model, d_model)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = timestep_features(t).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(x)))


def image_numbers(image_mask: torch.Tensor) -> torch.Tensor:
    """(b, l) bool -> (b, l) int64: for each image position the number of its image (a maximal run of image positions)
    counted over the whole batch in row-major order, -1 elsewhere."""
    starts = image_mask.clone()
    starts[:, 1:] &= ~image_mask[:, :-1]
    numbers = starts.reshape(-1).long().cumsum(0).view_as(image_mask) - 1
    return torch.where(image_mask, numbers, torch.full_like(numbers, -1))


@dataclass
class TransfusionOutput(MoMCausalLMOutput):
    """`MoMCausalLMOutput` plus ``predicted_noise`` (b, l, patch_dim) fp32: the noise head's output at image positions,
    zero elsewhere."""

    predicted_noise: torch.Tensor | None = None


class MoMTransfusionForCausalLM(MoMPreTrainedModel):
    """Text next-token LM and image-latent noise predictor over one MoM backbone (see the module docstring)."""

    config_class = MoMTransfusionConfig
    config: MoMTransfusionConfig
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: MoMTransfusionConfig) -> None:
        super().__init__(config)
        self.backbone = MoMModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.image_in = nn.Linear(config.patch_dim, config.d_model)  # noisy latent patch -> residual stream
        self.time_embed = TimestepEmbedding(config.d_model)
        self.noise_head = nn.Linear(config.d_model, config.patch_dim)  # final hidden -> predicted noise
        self.post_init()

    @property
    def backend(self) -> str:
        return self.backbone.backend

    @property
    def schedule(self) -> NoiseSchedule:
        """The config's noise schedule (`mom.model.diffusion.make_schedule`, computed once per schedule)."""
        return make_schedule(self.config.noise_schedule, self.config.num_timesteps)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The backbone's init; the image modules keep ``nn.Linear``'s default init, except the noise head: zero (DiT's
        final-layer init, so that the first prediction is zero noise)."""
        super()._init_weights(module)
        if module is getattr(self, "noise_head", None):
            init.zeros_(module.weight)
            init.zeros_(module.bias)

    # ---- checks ----------------------------------------------------------------------------------------------------
    def check_image_inputs(self, input_ids: torch.Tensor, latents: torch.Tensor | None,
                           image_mask: torch.Tensor | None, modality_ids: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the image side of a batch against its ids (shapes now, values in ONE host sync) -> ((b, l) bool mask
        of image positions, (b, l) modality ids derived from the ids)."""
        cfg = self.config
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("the Transfusion model takes input_ids (batch, length); image positions carry "
                             f"id {cfg.image_token_id}")
        mask = input_ids == cfg.image_token_id  # (b, l)
        derived = modality_of_ids(cfg, input_ids)
        checks: list[tuple[torch.Tensor, str]] = []  # (bad, message)
        for name, t in (("image_mask", image_mask), ("modality_ids", modality_ids)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}")
        if image_mask is not None:
            checks.append(((image_mask.bool() != mask).any(), f"image_mask disagrees with the image positions of "
                           f"input_ids (id {cfg.image_token_id}): the image span and its latents do not line up"))
        if modality_ids is not None:
            checks.append(((modality_ids.long() != derived).any(), "modality_ids contradict the token ids' "
                           f"vocabulary ranges (image positions carry id {cfg.image_token_id})"))
        if latents is None:
            checks.append((mask.any(), f"input_ids hold image positions (id {cfg.image_token_id}) but no latents "
                                       "were given"))
        else:
            want = (*input_ids.shape, cfg.patch_dim)
            if latents.dim() != 3 or latents.shape[-1] != cfg.patch_dim:
                raise ValueError(f"latents must have shape (batch, length, latent_channels * patch_size**2 = "
                                 f"{cfg.patch_dim}), got {tuple(latents.shape)}: wrong latent dimension for "
                                 f"latent_channels={cfg.latent_channels}, patch_size={cfg.patch_size}")
            if tuple(latents.shape) != want:
                raise ValueError(f"latents have shape {tuple(latents.shape)} but input_ids need {want}")
            if not latents.is_floating_point():
                raise ValueError(f"latents must be floating point, got dtype {latents.dtype}")
        if checks:
            for flag, (_, message) in zip(torch.stack([bad for bad, _ in checks]).tolist(), checks):
                if flag:
                    raise ValueError(message)
        return mask, derived

    # ---- the model -------------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor, noisy: torch.Tensor | None,
              timesteps: torch.Tensor | None) -> torch.Tensor:
        """(b, l) ids, (b, l) mask, (b, l, patch_dim) noisy latents, (b, l) timesteps -> residual stream (b, l, d):
        token embeddings at text positions, ``image_in(noisy) + time_embed(t)`` at image positions. The image side
        runs at every position and is selected by the mask: no host sync, and its FLOPs are what `mom.model.flops`
        counts per token."""
        embeds = self.backbone.embeddings(input_ids.clamp(0, self.config.vocab_size - 1))  # (b, l, d)
        if noisy is None:
            return embeds
        image = self.image_in(noisy.to(self.image_in.weight.dtype)) + self.time_embed(timesteps)  # (b, l, d)
        return torch.where(image_mask[..., None], image.to(embeds.dtype), embeds)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        noisy: bool = False,
        cache: MoMCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        modality_counts: Sequence[int] | torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TransfusionOutput | tuple:
        """input_ids, labels, image_mask, modality_ids, seq_idx: (b, l); latents (b, l, patch_dim): the clean latent
        patch at every image position (anything elsewhere).

        Training (``noisy=False``): each image gets a timestep (``timesteps`` (n_images,) in image order, else
        uniform in [0, T)), its patches are noised with ``noise`` (b, l, patch_dim; else standard normal) and the
        noise is predicted. ``noisy=True`` (sampling): ``latents`` are already noisy and ``timesteps`` (b, l) give
        each position's timestep; no noise is added and there is no diffusion loss.

        Output: `TransfusionOutput` (``logits`` (b, l, V) fp32, the losses with labels, ``predicted_noise``).
        """
        cfg = self.config
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        mask, derived = self.check_image_inputs(input_ids, latents, image_mask, modality_ids)
        x_t, t_pos, eps = None, None, None
        if latents is not None:
            if noisy:
                if timesteps is None or tuple(timesteps.shape) != tuple(input_ids.shape):
                    raise ValueError("noisy latents need timesteps of shape (batch, length): each position's timestep")
                check_timesteps(timesteps[mask], cfg.num_timesteps)
                x_t, t_pos = latents, torch.where(mask, timesteps.long(), 0)
            else:
                numbers = image_numbers(mask)  # (b, l)
                if timesteps is None:  # one draw per possible image (b * l of them): no host sync for the count
                    timesteps = torch.randint(0, cfg.num_timesteps, (mask.numel(),), device=latents.device)
                else:
                    n_images = int(numbers.max()) + 1 if bool(mask.any()) else 0
                    if tuple(timesteps.shape) != (n_images,):
                        raise ValueError(f"timesteps must give one timestep per image ({n_images}), got shape "
                                         f"{tuple(timesteps.shape)}")
                    check_timesteps(timesteps, cfg.num_timesteps)
                t_pos = torch.where(mask, timesteps.to(latents.device).long()[numbers.clamp(min=0)], 0)  # (b, l)
                eps = torch.randn_like(latents, dtype=torch.float32) if noise is None else noise.float()
                if eps.shape != latents.shape:
                    raise ValueError(f"noise has shape {tuple(eps.shape)} but latents have {tuple(latents.shape)}")
                x_t = add_noise(self.schedule, latents.float(), eps, t_pos)
        embeds = self.embed(input_ids, mask, x_t, t_pos)
        out = self.backbone(inputs_embeds=embeds, modality_ids=derived, labels=labels, cache=cache,
                            use_cache=use_cache, attention_mask=attention_mask, seq_idx=seq_idx,
                            modality_counts=modality_counts, output_hidden_states=output_hidden_states,
                            return_dict=True)
        hidden = out.last_hidden_state  # (b, l, d)
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()  # (b, l, V)
        predicted = self.noise_head(hidden.to(self.noise_head.weight.dtype)).float() * mask[..., None]  # (b, l, D)
        losses = self._losses(logits, labels, predicted, eps, mask) if labels is not None else {}
        result = TransfusionOutput(logits=logits, cache=out.cache, hidden_states=out.hidden_states, **losses,
                                   predicted_noise=predicted)
        return result if return_dict else result.to_tuple()

    def _losses(self, logits: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor,
                noise: torch.Tensor | None, mask: torch.Tensor) -> dict[str, object]:
        """Text next-token loss (targets that are image positions ignored) + lambda * diffusion loss, and their sums /
        counts per modality (text: next-token targets; image: image positions). No host sync."""
        cfg = self.config
        M = cfg.num_modalities
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1).long()  # (b * l,)
        targets = torch.where(targets == cfg.image_token_id, IGNORE_INDEX, targets)
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX,
                                    reduction="none")
        valid = (targets != IGNORE_INDEX).float()
        text_modality = modality_of_ids(cfg, targets)  # -100 lands in 0, with weight 0
        sums = per_token.new_zeros(M).scatter_add_(0, text_modality, per_token * valid)
        counts = valid.new_zeros(M).scatter_add_(0, text_modality, valid)
        text_mean = sums.sum() / counts.sum().clamp(min=1)
        if noise is not None:
            weight = mask.float()  # (b, l)
            mse = noise_prediction_loss(predicted, noise * mask[..., None])  # (b, l), 0 off images
            image = torch.zeros(M, device=sums.device)
            image[cfg.modalities.index(IMAGE_MODALITY)] = 1.0
            sums = sums + image * (mse * weight).sum()
            counts = counts + image * weight.sum()
            diffusion_mean = (mse * weight).sum() / weight.sum().clamp(min=1)
        else:
            diffusion_mean = predicted.sum() * 0.0  # no diffusion target (sampling): keeps the graph
        means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        return {
            "loss": text_mean + cfg.diffusion_loss_weight * diffusion_mean,
            "modality_losses": dict(zip(cfg.modalities, means.unbind())),
            "modality_loss_sums": sums,
            "modality_target_counts": counts,
        }


# ---- latent patches ------------------------------------------------------------------------------------------------
