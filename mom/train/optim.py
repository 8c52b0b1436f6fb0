"""AdamW parameter groups and the learning-rate schedule (linear warmup, then cosine decay).

Weight decay applies to weight matrices only. Excluded: norms and biases (1-d), every parameter marked
``_no_weight_decay`` (the SSM's ``A_log`` and ``D``, as in mamba-ssm), and the (tied) embedding matrix unless
``optim.decay_embeddings``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn as nn

from mom.train.recipe import OptimConfig


def no_weight_decay(name: str, param: nn.Parameter, embedding_params: set[int], decay_embeddings: bool) -> bool:
    """True if ``param`` (called ``name``) must not be weight-decayed."""
    if getattr(param, "_no_weight_decay", False) or param.ndim < 2:
        return True
    return id(param) in embedding_params and not decay_embeddings


def param_groups(
    model: nn.Module, cfg: OptimConfig, trainable: Callable[[str, nn.Parameter], bool] | None = None
) -> list[dict]:
    """Two AdamW groups, ``decay`` and ``no_decay``, over the parameters that require grad.

    ``trainable(name, param)`` further restricts the set (e.g. LoRA adapters only). Shared parameters (the tied LM
    head) appear once. Each group carries its parameter names under ``"names"`` for inspection.
    """
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = {
        "decay": {"params": [], "names": [], "weight_decay": cfg.weight_decay},
        "no_decay": {"params": [], "names": [], "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():  # yields a tied parameter once
        if not param.requires_grad or (trainable is not None and not trainable(name, param)):
            continue
        key = "no_decay" if no_weight_decay(name, param, embedding_params, cfg.decay_embeddings) else "decay"
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    result = [dict(g, name=k) for k, g in groups.items() if g["params"]]
    if not result:
        raise ValueError("no trainable parameters: the model has none that require grad (check trainable_filter)")
    return result


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr``, cosine to ``min_lr_ratio*lr``.

    A pure function of the step, so resuming needs only the step count.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)
