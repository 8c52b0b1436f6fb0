"""Warm-start a MoM from a dense Mamba checkpoint in Hugging Face format (``transformers.MambaForCausalLM``)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from mom.model.config import MoMConfig

logger = logging.getLogger(__name__)

# (MoMConfig attribute, MambaConfig attribute): must agree for the weights to fit.
_MATCHING_FIELDS = (
    ("d_model", "hidden_size"),
    ("n_layer", "num_hidden_layers"),
    ("d_state", "state_size"),
    ("d_conv", "conv_kernel"),
    ("d_inner", "intermediate_size"),
    ("dt_rank", "time_step_rank"),
    ("bias", "use_bias"),
    ("conv_bias", "use_conv_bias"),
    ("residual_in_fp32", "residual_in_fp32"),
)


def _load_dense(model_or_path):
    from transformers import MambaForCausalLM

    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if not path.is_dir():
            raise ValueError(f"from_dense_mamba: {path} is not a local directory holding a MambaForCausalLM checkpoint")
        return MambaForCausalLM.from_pretrained(path)
    if not isinstance(model_or_path, MambaForCausalLM):
        raise ValueError(f"from_dense_mamba: expected a MambaForCausalLM or a directory, got {type(model_or_path)}")
    return model_or_path


def _copy_projection(target: nn.Module, source: nn.Linear) -> None:
    experts = [target] if isinstance(target, nn.Linear) else list(target.values())
    for expert in experts:
        expert.weight.copy_(source.weight)
        if source.bias is not None:
            expert.bias.copy_(source.bias)


@torch.no_grad()
def mom_from_dense_mamba(model_or_path, config: MoMConfig, cls):
    """See `MoMForCausalLM.from_dense_mamba`."""
    if config.attention_layers:
        raise ValueError(f"from_dense_mamba: config.attention_layers={list(config.attention_layers)}; a dense Mamba "
                         "has no attention weights to start them from: warm-start a pure Mamba config")
    dense = _load_dense(model_or_path)
    dcfg = dense.config
    for ours, theirs in _MATCHING_FIELDS:
        if getattr(config, ours) != int(getattr(dcfg, theirs)) and getattr(config, ours) != getattr(dcfg, theirs):
            raise ValueError(
                f"from_dense_mamba: config.{ours}={getattr(config, ours)} does not match the dense model's "
                f"{theirs}={getattr(dcfg, theirs)}"
            )
    if not config.rms_norm:
        raise ValueError("from_dense_mamba: config.rms_norm must be true (transformers' Mamba uses RMSNorm)")
    if dcfg.hidden_act != "silu":
        raise ValueError(f"from_dense_mamba: only silu activations are supported, got {dcfg.hidden_act}")
    model = cls(config)
    model.to(dense.dtype)
    model.keep_ssm_params_fp32()  # A_log and D stay fp32 whatever the dense model's dtype
    rows = min(dcfg.vocab_size, config.vocab_size)
    if rows < config.vocab_size:
        logger.warning(
            "from_dense_mamba: dense vocabulary has %d ids, MoM's has %d: ids >= %d keep their fresh initialisation",
            dcfg.vocab_size, config.vocab_size, rows,
        )
    model.backbone.embeddings.weight[:rows].copy_(dense.backbone.embeddings.weight[:rows])
    if not config.tie_word_embeddings:
        model.lm_head.weight[:rows].copy_(dense.lm_head.weight[:rows])
    model.backbone.norm_f.weight.copy_(dense.backbone.norm_f.weight)
    for ours, theirs in zip(model.backbone.layers, dense.backbone.layers):
        ours.norm.weight.copy_(theirs.norm.weight)
        m, d = ours.mixer, theirs.mixer
        for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            _copy_projection(getattr(m, name), getattr(d, name))
        m.conv1d.weight.copy_(d.conv1d.weight)
        if d.conv1d.bias is not None:
            m.conv1d.bias.copy_(d.conv1d.bias)
        m.A_log.copy_(d.A_log)
        m.D.copy_(d.D)
    return model
