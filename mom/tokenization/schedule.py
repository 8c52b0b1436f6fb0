"""The optimiser of the tokenizers' own training (image VQ, image VAE): AdamW with a linear warm-up and a cosine decay
to a tenth of the peak learning rate."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FINAL_LR_RATIO = 0.1  # the cosine ends at this fraction of the peak learning rate
BETAS = (0.9, 0.99)  # a shorter second-moment memory than LM training's 0.999: these runs are a few thousand steps


def warmup_cosine_adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, steps: int,
                        warmup_steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """(optimiser, scheduler): call ``scheduler.step()`` after each ``optimiser.step()``, ``steps`` times."""
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=BETAS)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * t))

    return optim, torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
