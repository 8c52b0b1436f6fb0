"""The convolutional building blocks of the image tokenizers (`mom.tokenization.image`'s VQ and
`mom.tokenization.vae`'s KL VAE): GroupNorm and the pre-activation residual block."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with ``max_groups`` groups where the width allows (their greatest common divisor)."""
    return nn.GroupNorm(math.gcd(max_groups, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip: the identity, or a 1x1 convolution where the width changes.
    (b, c_in, h, w) -> (b, c_out, h, w)."""

    def __init__(self, c_in: int, c_out: int, max_groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(c_in, max_groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            group_norm(c_out, max_groups), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)
