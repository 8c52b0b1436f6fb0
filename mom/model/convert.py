"""Warm-start a MoM from a dense Mamba checkpoint in Hugging Face format: ``transformers.MambaForCausalLM``
(`mom_from_dense_mamba`) or, for ``mixer: mamba2``, ``transformers.Mamba2ForCausalLM`` (`mom_from_dense_mamba2`)."""

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


# (MoMConfig attribute, Mamba2Config attribute): must agree for the weights to fit (and the logits to match).
_MATCHING_FIELDS_MAMBA2 = (
    ("d_model", "hidden_size"),
    ("n_layer", "num_hidden_layers"),
    ("d_state", "state_size"),
    ("d_conv", "conv_kernel"),
    ("expand", "expand"),
    ("headdim", "head_dim"),
    ("nheads", "num_heads"),
    ("ngroups", "n_groups"),
    ("bias", "use_bias"),
    ("conv_bias", "use_conv_bias"),
    ("residual_in_fp32", "residual_in_fp32"),
    ("norm_epsilon", "layer_norm_epsilon"),
)


def _load_dense(model_or_path, cls_name: str = "MambaForCausalLM", what: str = "from_dense_mamba"):
    import transformers

    model_cls = getattr(transformers, cls_name)
    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if not path.is_dir():
            raise ValueError(f"{what}: {path} is not a local directory holding a {cls_name} checkpoint")
        return model_cls.from_pretrained(path)
    if not isinstance(model_or_path, model_cls):
        raise ValueError(f"{what}: expected a {cls_name} or a directory, got {type(model_or_path)}")
    return model_or_path


def _check_fields(config: MoMConfig, dcfg, fields: tuple[tuple[str, str], ...], what: str) -> None:
    for ours, theirs in fields:
        if getattr(config, ours) != int(getattr(dcfg, theirs)) and getattr(config, ours) != getattr(dcfg, theirs):
            raise ValueError(
                f"{what}: config.{ours}={getattr(config, ours)} does not match the dense model's "
                f"{theirs}={getattr(dcfg, theirs)}"
            )


def _copy_outer(model, dense, config: MoMConfig, what: str) -> None:
    """Embeddings, LM head (untied), final norm and every block's norm."""
    dcfg = dense.config
    rows = min(dcfg.vocab_size, config.vocab_size)
    if rows < config.vocab_size:
        logger.warning(
            "%s: dense vocabulary has %d ids, MoM's has %d: ids >= %d keep their fresh initialisation",
            what, dcfg.vocab_size, config.vocab_size, rows,
        )
    model.backbone.embeddings.weight[:rows].copy_(dense.backbone.embeddings.weight[:rows])
    if not config.tie_word_embeddings:
        model.lm_head.weight[:rows].copy_(dense.lm_head.weight[:rows])
    model.backbone.norm_f.weight.copy_(dense.backbone.norm_f.weight)
    for ours, theirs in zip(model.backbone.layers, dense.backbone.layers):
        ours.norm.weight.copy_(theirs.norm.weight)


def _copy_projection(target: nn.Module, source: nn.Linear) -> None:
    experts = [target] if isinstance(target, nn.Linear) else list(target.values())
    for expert in experts:
        expert.weight.copy_(source.weight)
        if source.bias is not None:
            expert.bias.copy_(source.bias)


def _check_no_attention(config: MoMConfig, what: str) -> None:
    if config.attention_layers:
        raise ValueError(f"{what}: config.attention_layers={list(config.attention_layers)}; a dense Mamba has no "
                         "attention weights to start them from: warm-start a pure Mamba config")


@torch.no_grad()
def mom_from_dense_mamba(model_or_path, config: MoMConfig, cls):
    """See `MoMForCausalLM.from_dense_mamba`."""
    _check_no_attention(config, "from_dense_mamba")
    dense = _load_dense(model_or_path)
    dcfg = dense.config
    _check_fields(config, dcfg, _MATCHING_FIELDS, "from_dense_mamba")
    if config.mixer != "mamba1":
        raise ValueError(f"from_dense_mamba: config.mixer must be mamba1, got {config.mixer!r} (from_dense_mamba2 "
                         f"converts a Mamba2ForCausalLM)")
    if not config.rms_norm:
        raise ValueError("from_dense_mamba: config.rms_norm must be true (transformers' Mamba uses RMSNorm)")
    if dcfg.hidden_act != "silu":
        raise ValueError(f"from_dense_mamba: only silu activations are supported, got {dcfg.hidden_act}")
    if config.channel_mixer is not None:  # layer averaging starts as the plain stack: it keeps the logits equal
        raise ValueError(f"from_dense_mamba: config.channel_mixer={config.channel_mixer!r} would add a new, untrained "
                         "sublayer to every block, so the logits could not equal the dense model's; warm-start "
                         "without it (channel_mixer: null)")
    model = cls(config)
    model.to(dense.dtype)
    model.keep_ssm_params_fp32()  # A_log and D stay fp32 whatever the dense model's dtype
    _copy_outer(model, dense, config, "from_dense_mamba")
    for ours, theirs in zip(model.backbone.layers, dense.backbone.layers):
        m, d = ours.mixer, theirs.mixer
        for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            _copy_projection(getattr(m, name), getattr(d, name))
        m.conv1d.weight.copy_(d.conv1d.weight)
        if d.conv1d.bias is not None:
            m.conv1d.bias.copy_(d.conv1d.bias)
        m.A_log.copy_(d.A_log)
        m.D.copy_(d.D)
    return model


@torch.no_grad()
def mom_from_dense_mamba2(model_or_path, config: MoMConfig, cls):
    """See `MoMForCausalLM.from_dense_mamba2`."""
    what = "from_dense_mamba2"
    _check_no_attention(config, what)
    dense = _load_dense(model_or_path, "Mamba2ForCausalLM", what)
    dcfg = dense.config
    if config.mixer != "mamba2":
        raise ValueError(f"{what}: config.mixer must be mamba2, got {config.mixer!r}")
    _check_fields(config, dcfg, _MATCHING_FIELDS_MAMBA2, what)
    if not config.rms_norm:
        raise ValueError(f"{what}: config.rms_norm must be true (transformers' Mamba2 uses RMSNorm)")
    if dcfg.hidden_act != "silu":
        raise ValueError(f"{what}: only silu activations are supported, got {dcfg.hidden_act}")
    if tuple(dcfg.time_step_limit) != (0.0, float("inf")):
        raise ValueError(f"{what}: the dense model clamps Δ to time_step_limit={dcfg.time_step_limit}; MoM's Mamba-2 "
                         f"does not clamp it")
    model = cls(config)
    model.to(dense.dtype)
    model.keep_ssm_params_fp32()  # A_log, D and dt_bias stay fp32 whatever the dense model's dtype
    _copy_outer(model, dense, config, what)
    for ours, theirs in zip(model.backbone.layers, dense.backbone.layers):
        m, d = ours.mixer, theirs.mixer
        for name in ("in_proj", "out_proj"):
            _copy_projection(getattr(m, name), getattr(d, name))
        m.conv1d.weight.copy_(d.conv1d.weight)
        if d.conv1d.bias is not None:
            m.conv1d.bias.copy_(d.conv1d.bias)
        for name in ("A_log", "D", "dt_bias"):
            getattr(m, name).copy_(getattr(d, name))
        m.norm.weight.copy_(d.norm.weight)
    return model
