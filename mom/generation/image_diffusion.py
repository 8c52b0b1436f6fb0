"""Sampling in the Transfusion setting: continue a text prompt with an image denoised from noise, then more text.

    parts = generate_transfusion(model, vae, tokenizer, "a red handwritten digit seven", steps=50)
    write_document(parts, Path("samples"), None)       # text.txt and image_0.png (mom.generation.document)
    pixels = sample_transfusion_image(model, vae, tokenizer, "a red handwritten digit seven", seed=3)  # image alone

A causal SSM's state after the prompt ``<s> text <image>`` is all the image positions can see of it, and in training
every patch of an image sees the same noisy version of the patches before it (one timestep per image). So each DDIM
step (`mom.model.diffusion.ddim_sample`) runs the prompt and the whole image span, all patches at the current noise
level and timestep, in one forward (the parallel scan: on a GPU the fused path), and reads the predicted noise at
every patch. Running the span after a cached prompt instead would take the recurrent step once per patch (64 of them
for a 64x64 image, in sequence), which costs far more than the few prompt positions run again. After the last step
the document so far (prompt, the clean latent at timestep 0, ``</image>``) is run into a recurrent cache, and text is
sampled after it until ``</s>``. Classifier-free guidance (``guidance_scale > 1``) mixes in the noise predicted after
an empty prompt ``<s> <image>``: the corpus's ``image_caption`` documents put the image first, so the model learns
unconditional images from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mom.model.cache import MoMCache
from mom.model.diffusion import ddim_sample
from mom.model.transfusion import MoMTransfusionForCausalLM
from mom.tokenization.special import BOI_ID, BOS_ID, EOI_ID, EOS_ID
from mom.utils.patches import unpatchify

DEFAULT_STEPS = 50  # DDIM steps (Song et al. 2021 report sample quality close to 1000 DDPM steps at 50)


def check_vae(model: MoMTransfusionForCausalLM, vae: Any) -> None:
    """The VAE's latents must be what the model was trained on (channels and size)."""
    cfg = model.config
    got = (int(vae.config.latent_channels), int(vae.latent_size))
    if got != (cfg.latent_channels, cfg.latent_size):
        raise ValueError(f"the VAE makes {got[0]}-channel {got[1]}x{got[1]} latents but the model takes "
                         f"{cfg.latent_channels}-channel {cfg.latent_size}x{cfg.latent_size} ones: pass the VAE the "
                         "model was trained with")


@torch.no_grad()
def sample_image(model: MoMTransfusionForCausalLM, prompt: list[int], steps: int = DEFAULT_STEPS,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                 progress: bool = False) -> torch.Tensor:
    """Denoise one image's latent patches after the ids ``prompt`` (ending with ``<image>``) -> (1, L, patch_dim) fp32,
    the clean patches."""
    cfg = model.config
    device = next(model.parameters()).device
    L = cfg.patches_per_image
    image_ids = torch.full((1, L), cfg.image_token_id, device=device)

    def eps_after(prefix: list[int], x: torch.Tensor, t: int) -> torch.Tensor:
        ids = torch.cat([torch.tensor([prefix], device=device), image_ids], dim=1)  # (1, p + L)
        latents = torch.cat([x.new_zeros(1, len(prefix), cfg.patch_dim), x], dim=1)  # text positions: unread
        out = model(ids, latents=latents, timesteps=torch.full_like(ids, t), noisy=True, use_cache=False)
        return out.predicted_noise[:, len(prefix):]  # (1, L, D)

    bar = tqdm(total=steps, desc="denoise", unit="step", disable=not progress, dynamic_ncols=True)

    def predict_noise(x: torch.Tensor, t: int) -> torch.Tensor:
        eps = eps_after(prompt, x, t)
        if guidance_scale != 1.0:
            eps_u = eps_after([BOS_ID, BOI_ID], x, t)
            eps = eps_u + guidance_scale * (eps - eps_u)
        bar.update(1)
        return eps

    x_T = torch.randn((1, L, cfg.patch_dim), generator=generator, device="cpu").to(device)
    with bar:
        return ddim_sample(predict_noise, x_T, model.schedule, steps)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """``<s> prompt <image>``: the ids an image is sampled after."""
    return [BOS_ID, *tokenizer.encode_text(prompt), BOI_ID]


def decode_patches(model: MoMTransfusionForCausalLM, vae: Any, patches: torch.Tensor) -> np.ndarray:
    """One image's clean latent patches (1, L, patch_dim) -> its pixels through ``vae``, uint8 (H, W, 3)."""
    cfg = model.config
    latent = unpatchify(patches.float().cpu(), cfg.patch_size, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    return np.asarray(vae.decode(latent))[0]


@torch.no_grad()
def sample_transfusion_image(model: MoMTransfusionForCausalLM, vae: Any, tokenizer: Any, prompt: str,
                             steps: int = DEFAULT_STEPS, guidance_scale: float = 1.0, seed: int = 0,
                             progress: bool = False) -> np.ndarray:
    """The image of ``generate_transfusion(..., seed=seed)`` alone, without the text after it -> uint8 (H, W, 3)
    (the same pixels: the image is drawn first from the seeded generator)."""
    check_vae(model, vae)
    model.eval()
    patches = sample_image(model, prompt_ids(tokenizer, prompt), steps, guidance_scale,
                           torch.Generator().manual_seed(seed), progress)
    return decode_patches(model, vae, patches)


@torch.no_grad()
def generate_transfusion(
    model: MoMTransfusionForCausalLM,
    vae: Any,
    tokenizer: Any,
    prompt: str,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = 1.0,
    max_new_tokens: int = 0,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> list[tuple[str, Any]]:
    """``<s> prompt <image>``, an image sampled with ``steps`` DDIM steps and decoded by ``vae``, ``</image>``, then up
    to ``max_new_tokens`` text tokens (until ``</s>``). Returns the document's parts as `mom.generation.document`'s
    ``write_document`` takes them: ``[("text", prompt), ("image", (H, W, 3) uint8), ("text", continuation)]``."""
    cfg = model.config
    check_vae(model, vae)
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    ids = prompt_ids(tokenizer, prompt)
    patches = sample_image(model, ids, steps, guidance_scale, generator, progress)
    # the document so far into a fresh cache: the prompt, the clean image (timestep 0), </image>
    device = patches.device
    L = cfg.patches_per_image
    doc = torch.tensor([[*ids, *[cfg.image_token_id] * L, EOI_ID]], device=device)  # (1, p + L + 1)
    latents = torch.zeros(1, doc.shape[1], cfg.patch_dim, device=device, dtype=patches.dtype)
    latents[:, len(ids) : len(ids) + L] = patches
    cache = MoMCache(model.config, 1, device, next(model.parameters()).dtype)
    logits = model(doc, latents=latents, timesteps=torch.zeros_like(doc), noisy=True, cache=cache,
                   use_cache=True).logits[0, -1]
    text_vocab = cfg.vocab_sizes[0]
    new: list[int] = []
    for _ in range(max_new_tokens):
        scores = logits[:text_vocab].float()  # text only: the one image id never follows as a token
        if temperature == 0:
            token = int(scores.argmax())
        else:
            token = int(torch.multinomial(torch.softmax(scores / temperature, -1).cpu(), 1, generator=generator))
        if token == EOS_ID:
            break
        new.append(token)
        logits = model(torch.tensor([[token]], device=device), cache=cache, use_cache=True).logits[0, -1]
    image = decode_patches(model, vae, patches)
    return [("text", prompt), ("image", image), ("text", tokenizer.text.decode(new) if new else "")]


def load_vae(path: str | Path) -> Any:
    """The image VAE saved at ``path`` (`mom.tokenization.vae.ImageVAE.from_pretrained`)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no image VAE at {path}: pass --vae DIR (a VAE trained with mom-tokenizer vae)")
    from mom.tokenization.vae import ImageVAE

    return ImageVAE.from_pretrained(path)
