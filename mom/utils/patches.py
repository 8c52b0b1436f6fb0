"""Latent patches: an image's latent grid cut into ``p x p`` patches, one sequence position each, and back.

    patches = patchify(latents, 2)                 # (n, c, h, w) -> (n, (h/2)*(w/2), c*2*2)
    latents = unpatchify(patches, 2, c, h, w)      # the exact inverse

Patches are read row by row over the grid; inside a patch the features are ordered (row, column, channel), as in
DiT and Transfusion's linear patch embedding, so ``patches[i, j].view(p, p, c)`` is patch ``j``'s pixels.
"""

from __future__ import annotations

import torch


def _check_patch_size(p: int) -> None:
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ValueError(f"patch size: must be a positive integer, got {p!r}")


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(n, c, h, w) -> (n, (h/p)*(w/p), p*p*c); ``h`` and ``w`` must be multiples of ``p``."""
    _check_patch_size(p)
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents: expected a tensor (n, c, h, w), got {shape}")
    n, c, h, w = latents.shape
    if h % p or w % p:
        raise ValueError(f"latents: a {h}x{w} latent grid is not divisible into {p}x{p} patches")
    x = latents.reshape(n, c, h // p, p, w // p, p)  # (n, c, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """(n, (h/p)*(w/p), p*p*c) -> (n, c, h, w): the inverse of :func:`patchify`."""
    _check_patch_size(p)
    if h % p or w % p:
        raise ValueError(f"unpatchify: a {h}x{w} latent grid is not divisible into {p}x{p} patches")
    expected = ((h // p) * (w // p), p * p * c)
    if not isinstance(patches, torch.Tensor) or patches.dim() != 3 or tuple(patches.shape[1:]) != expected:
        shape = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
        raise ValueError(f"patches: expected shape (n, {expected[0]}, {expected[1]}) for p={p}, c={c}, {h}x{w}; "
                         f"got {shape}")  # fmt: skip
    n = patches.shape[0]
    x = patches.reshape(n, h // p, w // p, p, p, c)  # (n, gh, gw, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)
