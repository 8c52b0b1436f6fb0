"""MoM language model: embeddings, a stack of (norm -> mixer -> residual) blocks (`make_mixer`: the Mamba-1 `MoMMixer`
or the Mamba-2 `Mamba2Mixer`, and in a hybrid's ``config.attention_layers`` an `AttentionMixer`), final norm, LM head.

Hugging Face integration follows ``transformers``' Mamba modelling file: `MoMModel` (backbone) and
`MoMForCausalLM` (``PreTrainedModel`` + ``GenerationMixin``) with a recurrent `MoMCache` (a transformers ``Cache``)
for ``generate()``: greedy, sampling, beam search, assisted decoding, continuing from a returned cache.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from mom.model import generate_loop, registrations
from mom.model.attention import ATTENTION_PROJECTIONS, DECOUPLED_WITH, AttentionMixer
from mom.model.cache import MoMCache
from mom.model.channel_mixers import EinFFT, SelectiveChannelMixer, make_channel_mixer
from mom.model.config import MoMConfig
from mom.model.graph import DecodeGraphs
from mom.model.inputs import (
    IGNORE_INDEX,
    capturing,
    check_inputs,
    kept_positions,
    modality_of_ids,
    padding_mask,
    validate_and_route,
)
from mom.model.mamba2 import Mamba2Mixer
from mom.model.mixer import MoMMixer, SortedStream, masks_on_device, sorted_stream
from mom.model.prefill_graph import PrefillGraphs
from mom.model.routing import Routing, permute_rows
from mom.ops import backend, fused, grouped, scan_ops
from mom.ops.triton.rebind import launched

logger = logging.getLogger(__name__)

MAMBA2_A_INIT_RANGE = (1.0, 16.0)  # Mamba-2's A per head, uniform in this range (mamba-ssm Mamba2's A_init_range)

# transformers >= 5.24 hands generate()'s cache to the model, and reorders it for beam search, under the name
# ``cache``; older versions look for ``past_key_values`` / ``cache_params`` only and would neither carry nor reorder a
# MoMCache, so generate() then runs every step over the whole sequence without one.
GENERATE_CARRIES_CACHE = "cache" in ALL_CACHE_NAMES


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: MoMConfig) -> nn.Module:
    if config.rms_norm:
        return RMSNorm(config.d_model, config.norm_epsilon)
    return nn.LayerNorm(config.d_model, eps=config.norm_epsilon)


def add_norm(
    norm: nn.Module, out: torch.Tensor | None, residual: torch.Tensor, residual_in_fp32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += out (the previous block's mixer output; None before the first block); return (norm(residual),
    residual). On CUDA this is mamba-ssm's fused Triton add+norm kernel (one pass), as in its ``Block``, launched
    directly once tuned (`mom.ops.triton.rebind.launched`)."""
    fn = backend.layer_norm_fn(residual)
    if fn is not None:
        fn = launched(fn)
        return fn(residual if out is None else out, norm.weight, getattr(norm, "bias", None),
                  residual=None if out is None else residual, eps=norm.eps, prenorm=True,
                  residual_in_fp32=residual_in_fp32, is_rms_norm=isinstance(norm, RMSNorm))
    if out is not None:
        residual = residual + out
    if residual_in_fp32:
        residual = residual.float()
    return norm(residual.to(norm.weight.dtype)), residual


def make_mixer(config: MoMConfig, layer_idx: int) -> nn.Module:
    """The sequence mixer of block ``layer_idx``: causal self-attention in ``config.attention_layers``, else by
    ``config.mixer`` (as mamba-ssm's ``create_block``)."""
    if layer_idx in config.attention_layers:
        return AttentionMixer(config, layer_idx)
    if config.mixer == "mamba2":
        return Mamba2Mixer(config, layer_idx)
    return MoMMixer(config, layer_idx)


class MoMBlock(GradientCheckpointingLayer):
    """Pre-norm residual block. With h the residual stream: h += out_prev; out = mixer(norm(h)). The addition of
    a block's output is done by the next block (or the final norm), fused with its norm as mamba-ssm does; the
    stream itself is ``residual + out``. Norms are shared across modalities.

    With ``config.channel_mixer``, a second sublayer follows (`mom.model.channel_mixers`): h += out;
    out = channel_mixer(norm2(h)). Without it the block has no ``norm2`` / ``channel_mixer`` (same state_dict keys).

    A transformers ``GradientCheckpointingLayer``: ``gradient_checkpointing_enable()`` recomputes it in backward
    (the positional arguments are the checkpointed inputs)."""

    def __init__(self, config: MoMConfig, layer_idx: int) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = make_norm(config)
        self.mixer = make_mixer(config, layer_idx)
        self.has_channel_mixer = config.channel_mixer is not None  # a plain bool: read at every forward
        if self.has_channel_mixer:
            self.norm2 = make_norm(config)
            self.channel_mixer = make_channel_mixer(config)

    def forward(self, out, residual, routing, cache=None, mask=None, doc_start=None, sorted_tokens=False, A=None,
                keep_last=0):
        """(previous block's output or None, residual stream) -> (this block's output, residual stream). ``A``: the
        Mamba-1 mixer's ``-exp(A_log)`` computed by the model (`mom.model.mixer.SortedStream`), or None.
        ``keep_last`` k > 0: each row's last k tokens are the only ones whose output is read (the last block of a
        sorted stream, without gradients: `MoMModel`); both results are then their rows (b * k, d), row by row
        (`Routing.last_tokens`)."""
        hidden, residual = add_norm(self.norm, out, residual, self.residual_in_fp32)
        if A is None and not keep_last:
            out = self.mixer(hidden, routing, cache, mask, doc_start, sorted_tokens)
        else:  # only a MoMMixer is given either
            out = self.mixer(hidden, routing, cache, mask, doc_start, sorted_tokens, A=A, keep_last=keep_last)
        if keep_last:  # the stream's rows are sorted: the kept tokens' rows
            residual = residual.view(-1, residual.shape[-1]).index_select(0, routing.last_tokens(keep_last)[1])
        if self.has_channel_mixer:
            hidden, residual = add_norm(self.norm2, out, residual, self.residual_in_fp32)
            out = self.channel_mixer(hidden, routing)
        return out, residual

    def step(self, out, residual, routing, cache):
        """`forward` for one token per row after a cached prefix, with no host sync (`MoMModel.decode_step`)."""
        hidden, residual = add_norm(self.norm, out, residual, self.residual_in_fp32)
        out = self.mixer.step(hidden, routing, cache)
        if self.has_channel_mixer:
            hidden, residual = add_norm(self.norm2, out, residual, self.residual_in_fp32)
            out = self.channel_mixer.step(hidden, routing)
        return out, residual


@dataclass
class MoMOutput(ModelOutput):
    """``modality_ids`` (b, l): the routing used (given, or derived from the token ids)."""

    last_hidden_state: torch.Tensor | None = None
    modality_ids: torch.Tensor | None = None
    cache: MoMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class MoMCausalLMOutput(ModelOutput):
    """``loss``: the mean next-token loss over all targets (labels other than -100); with no target at all (labels
    all -100) it is 0, a zero that keeps the graph, so that such a micro-batch adds nothing to accumulated gradients.

    ``modality_losses``: {modality: mean next-token loss over targets of that modality, the modality of the target
    token's id}; NaN for a modality without targets (no mean is defined).

    ``modality_loss_sums`` / ``modality_target_counts`` (num_modalities,) let a trainer aggregate exactly over
    micro-batches and ranks.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    modality_losses: dict[str, torch.Tensor] | None = None
    modality_loss_sums: torch.Tensor | None = None
    modality_target_counts: torch.Tensor | None = None
    cache: MoMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class MoMPreTrainedModel(PreTrainedModel):
    config_class = MoMConfig
    config: MoMConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["MoMBlock"]
    supports_gradient_checkpointing = True
    # A_log and D (and Mamba-2's dt_bias) stay fp32 under every load dtype, as mamba-ssm keeps them (regexes on
    # parameter names)
    _keep_in_fp32_modules_strict = [r"mixer\.A_log$", r"mixer\.D$", r"mixer\.dt_bias$"]

    def ssm_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every SSM decay / skip parameter: each scan's ``A_log`` and ``D`` (the sequence
        mixers' and the selective channel mixer's) and Mamba-2's ``dt_bias``. The one list of them: kept in fp32
        (`keep_ssm_params_fp32`) and trained by fine-tuning's ``train_A_D`` (`mom.train.lora`)."""
        found = []
        for prefix, m in self.named_modules():
            if isinstance(m, (MoMMixer, Mamba2Mixer, SelectiveChannelMixer)):
                names = ("A_log", "D", "dt_bias") if isinstance(m, Mamba2Mixer) else ("A_log", "D")
                found += [(f"{prefix}.{n}", getattr(m, n)) for n in names]
        return found

    def keep_ssm_params_fp32(self) -> None:
        """Cast every `ssm_parameters` entry (back) to fp32, as mamba-ssm keeps them; the rest keeps its dtype.
        Not under ZeRO-3, whose partitioned parameters DeepSpeed holds (a load applies
        ``_keep_in_fp32_modules_strict``)."""
        if is_deepspeed_zero3_enabled():
            return
        for _, p in self.ssm_parameters():
            p.data = p.data.float()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Mamba's initialisation (mamba-ssm ``mamba_simple.py`` / ``_init_weights``), applied to every expert."""
        cfg = self.config
        if isinstance(module, MoMMixer):
            # S4D-real: A = -(1..N) for every channel; D = 1.
            A = torch.arange(1, cfg.d_state + 1, dtype=torch.float32).expand(cfg.d_inner, -1)
            init.copy_(module.A_log, torch.log(A))
            init.ones_(module.D)
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                bound = 1 / math.sqrt(cfg.d_conv)  # PyTorch's Conv1d default (fan_in = d_conv for depthwise)
                init.uniform_(module.conv1d.bias, -bound, bound)
            for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
                for linear in _linears(getattr(module, name)):
                    self._init_linear(name, linear)
        elif isinstance(module, AttentionMixer):  # q, k, v as in_proj (nn.Linear's init), o as out_proj (rescaled)
            for name in ATTENTION_PROJECTIONS:
                for linear in _linears(getattr(module, name)):
                    self._init_linear(DECOUPLED_WITH[name], linear)
        elif isinstance(module, Mamba2Mixer):
            self._init_mamba2(module)
        elif isinstance(module, (EinFFT, SelectiveChannelMixer)):
            module.init_weights(cfg)
        elif isinstance(module, MoMModel) and module.layer_weights is not None:
            init.copy_(module.layer_weights, plain_stack_weights(cfg.n_layer))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=cfg.initializer_range)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module is getattr(self, "lm_head", None):
            if not cfg.tie_word_embeddings:
                init.normal_(module.weight, std=cfg.initializer_range)

    def _init_mamba2(self, module: Mamba2Mixer) -> None:
        """mamba-ssm ``modules/mamba2.py``'s initialisation: A uniform in `MAMBA2_A_INIT_RANGE` per head, D = 1,
        softplus(dt_bias) log-uniform in [dt_min, dt_max], PyTorch's default conv and linear init (out_proj scaled
        as for Mamba-1), norm weight 1."""
        cfg = self.config
        init.copy_(module.A_log, torch.log(torch.empty(module.nheads).uniform_(*MAMBA2_A_INIT_RANGE)))
        init.ones_(module.D)
        dt = torch.exp(torch.rand(module.nheads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=cfg.dt_init_floor)
        init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
        if module.conv1d.bias is not None:
            bound = 1 / math.sqrt(cfg.d_conv)  # PyTorch's Conv1d default (fan_in = d_conv for depthwise)
            init.uniform_(module.conv1d.bias, -bound, bound)
        init.ones_(module.norm.weight)
        for name in ("in_proj", "out_proj"):
            for linear in _linears(getattr(module, name)):
                self._init_linear(name, linear)

    def _init_linear(self, name: str, linear: nn.Linear) -> None:
        cfg = self.config
        if name == "dt_proj":
            std = cfg.dt_rank**-0.5 * cfg.dt_scale
            if cfg.dt_init == "constant":
                init.constant_(linear.weight, std)
            else:
                init.uniform_(linear.weight, -std, std)
            # Δ bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max], so that softplus(bias) starts there.
            dt = torch.exp(
                torch.rand(cfg.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
            ).clamp(min=cfg.dt_init_floor)
            init.copy_(linear.bias, dt + torch.log(-torch.expm1(-dt)))
            return
        init.kaiming_uniform_(linear.weight, a=math.sqrt(5))  # nn.Linear's default
        if name == "out_proj" and cfg.rescale_prenorm_residual:
            # GPT-2 scheme as in mamba-ssm: scale residual-branch outputs by 1/sqrt(n_layer).
            init.copy_(linear.weight, linear.weight / math.sqrt(cfg.n_layer))
        if linear.bias is not None:
            init.zeros_(linear.bias)


    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """Resize the unified vocabulary to ``new_num_tokens`` (rounded up to ``pad_to_multiple_of``) by growing or
        shrinking the TEXT vocabulary, the common case (new special or text tokens).

        The layout is [text | image | speech ...] in modality order: new ids go at the end of the text range and the
        ids of every later modality shift up by the change (``config.vocab_sizes[0]`` changes; a tokenizer whose text
        vocabulary grew numbers them so); their rows move with them, unchanged. New rows are transformers'
        ``mean_resizing`` (sampled tightly around the mean of the existing text rows), or the init normal. Everything
        is checked before anything changes; the output embedding is resized alike (or stays tied).
        """
        embeddings = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embeddings
        cfg = self.config
        target = cfg.vocab_size if new_num_tokens is None else new_num_tokens
        if isinstance(target, bool) or not isinstance(target, int):
            raise ValueError(f"resize_token_embeddings: new_num_tokens must be an int, got {target!r}")
        if pad_to_multiple_of is not None:
            multiple = pad_to_multiple_of
            if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
                raise ValueError(f"resize_token_embeddings: pad_to_multiple_of must be a positive int, got "
                                 f"{pad_to_multiple_of!r}")
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        text, others = cfg.vocab_sizes[0], cfg.vocab_size - cfg.vocab_sizes[0]
        new_text = target - others
        if new_text < 1:
            raise ValueError(f"resize_token_embeddings: {target} ids leave no text vocabulary: the text modality is "
                             f"resized, and the other modalities {cfg.modalities[1:]} hold {others} ids")
        if is_deepspeed_zero3_enabled():
            raise ValueError("resize_token_embeddings: resize before DeepSpeed ZeRO-3 partitions the weights")
        if target == cfg.vocab_size:
            return embeddings
        with torch.no_grad():
            weight = embeddings.weight
            new_embeddings = nn.Embedding(target, weight.shape[1], device=weight.device, dtype=weight.dtype)
            std = cfg.initializer_range
            new_embeddings.weight.copy_(_resized_text_rows(weight, text, new_text, mean_resizing, std))
            new_embeddings.weight.requires_grad_(weight.requires_grad)
            head = self.get_output_embeddings()
            if head is not None:
                new_head = nn.Linear(head.in_features, target, bias=False, device=head.weight.device,
                                     dtype=head.weight.dtype)
                new_head.weight.copy_(_resized_text_rows(head.weight, text, new_text, mean_resizing, std))
                new_head.weight.requires_grad_(head.weight.requires_grad)
        self.set_input_embeddings(new_embeddings)
        if head is not None:
            self.set_output_embeddings(new_head)
        cfg.vocab_sizes = (new_text, *cfg.vocab_sizes[1:])
        self.tie_weights()
        return new_embeddings


def _resized_text_rows(weight: torch.Tensor, text: int, new_text: int, mean_resizing: bool, std: float) -> torch.Tensor:
    """(V, d) rows -> (V + new_text - text, d): the text block cut or extended at its end, the rows of the other
    modalities after it unchanged."""
    head, rest = weight[:text], weight[text:]
    if new_text <= text:
        return torch.cat([head[:new_text], rest])
    added = new_text - text
    rows = head.float()
    if mean_resizing:  # transformers' scheme: a normal with the rows' mean and 1e-9 times their covariance
        mean = rows.mean(0)
        covariance = 1e-9 * (rows - mean).T @ (rows - mean) / text
        if bool(torch.distributions.constraints.positive_definite.check(covariance)):
            new = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance).sample((added,))
        else:
            new = mean.expand(added, -1)
    else:
        new = torch.randn(added, rows.shape[1], device=rows.device) * std
    return torch.cat([head, new.to(weight.dtype), rest])


def plain_stack_weights(n_layer: int) -> torch.Tensor:
    """Layer averaging's initial weights (n_layer, n_layer + 1): row i weighs the embedding (column 0) and the
    outputs of blocks 0..i (columns 1..i+1) into the next block's input; 1 on block i's own output and 0 elsewhere,
    so that the model starts as the plain residual stack (entries right of column i + 1 are never read)."""
    weights = torch.zeros(n_layer, n_layer + 1)
    weights[torch.arange(n_layer), torch.arange(1, n_layer + 1)] = 1.0
    return weights


def _linears(proj: nn.Module) -> list[nn.Linear]:
    """The expert ``nn.Linear``s of a projection (one if shared)."""
    return [proj] if isinstance(proj, nn.Linear) else [m for m in proj.values() if isinstance(m, nn.Linear)]


class MoMModel(MoMPreTrainedModel):
    def __init__(self, config: MoMConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([MoMBlock(config, i) for i in range(config.n_layer)])
        self.norm_f = make_norm(config)
        # MambaMixer's weighted averaging of earlier features (`_average`): row i mixes the embedding and the outputs
        # of blocks 0..i into the input of block i + 1 (of the final norm after the last block)
        self.register_parameter("layer_weights", nn.Parameter(plain_stack_weights(config.n_layer))
                                if config.layer_averaging else None)
        if self.layer_weights is not None:
            self.layer_weights._no_weight_decay = True  # decay would pull the plain stack's ones towards 0
        self.keep_ssm_params_fp32()  # also under from_config(dtype=...), which sets torch's default dtype
        self.gradient_checkpointing = False
        self._logged_backend: str | None = None
        self._mixers: registrations.Cached[list[nn.Module]] = registrations.Cached()
        self.post_init()

    def mixers(self) -> list[nn.Module]:
        """Each block's mixer, by layer: read at every forward, so gathered once and again after any module is
        assigned anywhere (`mom.model.registrations`)."""
        return self._mixers.get(lambda: [layer.mixer for layer in self.layers])

    @property
    def backend(self) -> str:
        """Which selective-scan backend this model's forward uses on its current device, and whether its mixers take
        the fused fast path (`mom.ops.fused`) where they can."""
        name = backend.backend_name(self.embeddings.weight.device)
        if name != "reference" and self.config.use_fast_path and scan_ops.cuda_ops() is not None:
            name += " (fused mixer)"
        return name

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        cache: MoMCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        labels: torch.LongTensor | None = None,
        seq_idx: torch.Tensor | None = None,
        modality_counts: Sequence[int] | torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        keep_last: int = 0,
        **kwargs,
    ) -> MoMOutput | tuple:
        """input_ids, modality_ids, attention_mask, seq_idx: (b, l); or ``inputs_embeds`` (b, l, d_model) in place of
        input_ids, with modality_ids. ``labels`` / ``shift_labels`` are only validated here.

        ``seq_idx`` (the packed batch's document index per position) restarts the conv window and the SSM state at
        every document start when ``config.reset_at_document_boundaries`` is set; otherwise state flows on.
        ``modality_counts`` (M,): the batch's tokens per modality, counted on the host by the caller. A forward
        without cache starts without waiting for the device whether they are given or not (its checks are read once
        its work is enqueued: see `validate_and_route`); given, the fused GPU path's forward can run its largest
        routed GEMMs per expert (`mom.ops.grouped.PER_EXPERT_MACS`), which it otherwise groups on the device.
        ``attention_mask``: 1 (nonzero) for real tokens, 0 for padding, (b, l); continuing from a cache it may also
        cover the cached tokens, (b, past + l), and is then unused (new tokens are never padding). A forward without
        cache of a Mamba-1 model applies it on the device, read by nothing (`padding_mask`).
        ``output_hidden_states`` / ``return_dict`` default to the config's, as in transformers.
        ``keep_last`` k > 0: ``last_hidden_state`` holds each row's last k positions only, (b, k, d) (the causal LM's
        ``logits_to_keep``); a prefill's last Mamba-1 block then runs out_proj for those tokens alone, where it can.
        """
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be a non-negative int, got {keep_last!r}")
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training:
            use_cache = False  # checkpointed blocks run without a cache, as transformers' do
        # deferred checks only without a cache: a forward that writes the recurrent cache is checked before it runs,
        # unless it is being recorded into a CUDA graph (which cannot read the device: its caller checks the ids)
        defer = not use_cache or capturing(self.embeddings.weight)
        routing, finish_checks = validate_and_route(self.config, input_ids, modality_ids, labels, modality_counts,
                                                    defer, shift_labels=shift_labels, inputs_embeds=inputs_embeds)
        b, l = routing.modality_ids.shape
        doc_start = None
        if self.config.reset_at_document_boundaries and seq_idx is not None:
            if tuple(seq_idx.shape) != (b, l):
                raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)} but input_ids has {(b, l)}")
            doc_start = torch.zeros((b, l), dtype=torch.bool, device=seq_idx.device)
            doc_start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        if self._logged_backend != self.backend:
            self._logged_backend = self.backend
            logger.info("mom: selective-scan backend = %s", self.backend)
        # a forward through `_run` from a fresh cache writes every layer's states whole before reading any: no zeroing
        # then (recorded tokens alone read the states first)
        written = l > 0 and (cache is None or (cache.seqlen_offset == 0 and cache.tokens_to_record(l) < l))
        cache = self._ready_cache(cache if use_cache else None, use_cache, b, zero=not written)
        mixers = self.mixers()
        mask = padding_mask(attention_mask, b, l, cache.seqlen_offset if cache is not None else 0,
                            unread=defer and masks_on_device(mixers))

        if inputs_embeds is not None:
            residual = inputs_embeds.to(self.embeddings.weight.dtype)
        else:
            # ids are checked by finish_checks() when deferred: until then, in range for the embedding
            embed_ids = input_ids.clamp(0, self.config.vocab_size - 1) if defer else input_ids
        recorded = cache.tokens_to_record(l) if cache is not None else 0
        # a forward over whole rows (training, or a prefill from a fresh cache) whose mixers all take the fast path
        # keeps the stream's b * l rows sorted by modality (`Routing.perm`): the routed in_proj / out_proj then read
        # and write it without row gathers. Not with a channel mixer (its experts read the routing in sequence order)
        # or layer averaging: the module path there. A padding mask goes along to Mamba-1 mixers (which apply it in
        # sequence order on sorted rows), except into a prefill (which then takes the module path); Mamba-2 mixers
        # take a mask on rows in sequence order only.
        fresh = cache is None or (cache.seqlen_offset == 0 and not recorded)
        mask_ok = mask is None or (cache is None and masks_on_device(mixers))
        in_sorted = (sorted_stream(mixers, input_ids)
                     if (fresh and mask_ok and doc_start is None and inputs_embeds is None
                         and self.config.channel_mixer is None and not self.config.layer_averaging) else None)
        if in_sorted is not None:
            embed_ids = embed_ids.reshape(-1).index_select(0, routing.perm).view(b, l)
        if inputs_embeds is None:
            residual = self.embeddings(embed_ids)  # the residual stream (b, l, d) is residual + out

        if recorded and mask is not None:
            raise ValueError("a cache that records its states for rollback (assisted decoding) takes no padding")
        if recorded:
            hidden, all_hidden = self._run_recorded(residual, routing, cache, doc_start, output_hidden_states, recorded)
        else:
            hidden, all_hidden = self._run(residual, routing, cache, mask, doc_start, in_sorted, output_hidden_states,
                                           keep_last)
            if cache is not None:
                cache.seqlen_offset += l
        finish_checks()  # raises for bad input before anything (loss, backward) uses the forward
        if keep_last and hidden.shape[1] > keep_last:  # where `_run` could not keep them alone (a view)
            hidden = hidden[:, -keep_last:]
        out = MoMOutput(hidden, routing.modality_ids, cache, all_hidden)
        return out if return_dict else out.to_tuple()

    def decode_step(self, input_ids: torch.Tensor, cache: MoMCache) -> torch.Tensor:
        """One token per row after a cached prefix, with no host sync and no input check (the ids come from the
        caller's own sampling, e.g. generate(); out-of-range ids are clamped): ids (b, 1) -> final hidden (b, 1, d).
        The cache's states advance in place, its ``seqlen_offset`` does not (the caller counts). Each row's experts
        are picked on the device, so a CUDA graph can capture this (`mom.model.graph`)."""
        routing = Routing(modality_of_ids(self.config, input_ids), self.config.num_modalities)
        residual = self.embeddings(input_ids.clamp(0, self.config.vocab_size - 1))  # (b, 1, d)
        streams = [residual] if self.layer_weights is not None else None  # layer averaging (`_average`)
        out = None
        for i, layer in enumerate(self.layers):
            out, residual = layer.step(out, residual, routing, cache)
            if streams is not None:
                out, residual = self._average(streams, i, out, residual)
        hidden, _ = add_norm(self.norm_f, out, residual, self.config.residual_in_fp32)
        return hidden

    def _ready_cache(self, cache: MoMCache | None, use_cache: bool, batch: int, zero: bool) -> MoMCache | None:
        """The cache this forward writes: the given one (its states allocated here if generate() built it empty,
        zeroed or not: `MoMCache.allocate`), or a new one."""
        if not use_cache:
            return None
        if cache is None:
            cache = MoMCache(self.config)
        if not isinstance(cache, MoMCache):
            raise ValueError(f"cache must be a MoMCache, got {type(cache).__name__}")
        if not cache.is_initialized:
            cache.allocate(batch, self.embeddings.weight.device, self.embeddings.weight.dtype, zero=zero)
        elif cache.batch_size != batch:
            raise ValueError(f"the cache holds {cache.batch_size} rows but the input has {batch}")
        return cache

    def _run(self, residual, routing, cache, mask, doc_start, in_sorted: SortedStream | None,
             output_hidden_states, keep_last: int = 0):
        """Embedded tokens (b, l, d) through every block and the final norm -> (hidden (b, l, d), the residual stream
        after the embedding and after each block, or None). ``in_sorted``: the residual stream's rows are in the
        routing's sorted order (`mom.model.mixer.sorted_stream`), or None (sequence order). With layer averaging,
        block i's hidden state is its output stream (the stream the plain model would carry on), before the
        averaging. ``keep_last`` k > 0: the hidden states of each row's last k positions are all that is read; where
        the last block is a Mamba-1 mixer of a sorted stream (whose out_proj then runs for those tokens alone, and
        the final norm too) and no hidden state is output, hidden is (b, k, d), else still (b, l, d)."""
        b, l, _ = residual.shape
        in_order = functools.partial(self._sequence_order, routing) if in_sorted is not None else (lambda t: t)
        all_hidden = (in_order(residual),) if output_hidden_states else None
        streams = [residual] if self.layer_weights is not None else None
        As = in_sorted.A if in_sorted is not None else [None] * len(self.layers)
        last_only = (0 < keep_last < l and As[-1] is not None  # As[-1]: a sorted stream, a Mamba-1 last block
                     and not output_hidden_states and not torch.is_grad_enabled())
        out = None
        for i, layer in enumerate(self.layers):
            out, residual = layer(out, residual, routing, cache=cache, mask=mask, doc_start=doc_start,
                                  sorted_tokens=in_sorted is not None, A=As[i],
                                  keep_last=keep_last if last_only and i == len(self.layers) - 1 else 0)
            if streams is not None:
                out, residual = self._average(streams, i, out, residual)
            if output_hidden_states:
                all_hidden += (in_order(streams[-1] if streams is not None else residual + out),)
        hidden, _ = add_norm(self.norm_f, out, residual, self.config.residual_in_fp32)
        if last_only:
            return hidden.view(b, keep_last, -1), all_hidden
        return in_order(hidden), all_hidden

    def _average(self, streams: list[torch.Tensor], i: int, out: torch.Tensor,
                 residual: torch.Tensor) -> tuple[None, torch.Tensor]:
        """Layer averaging after block ``i``: its output stream ``residual + out`` joins ``streams`` (the embedding
        and the earlier blocks' outputs, each (b, l, d)); -> (no pending output, the weighted sum of all of them:
        the next block's residual stream)."""
        streams.append(residual + out)
        # on the newest stream's device and dtype: accelerate's device_map may place blocks on several devices
        device, dtype = streams[-1].device, torch.float32 if self.config.residual_in_fp32 else streams[-1].dtype
        weights = self.layer_weights[i, : i + 2].to(device, dtype)
        mixed = weights[0] * streams[0].to(device, dtype)
        for w, stream in zip(weights[1:], streams[1:]):
            mixed = mixed + w * stream.to(device, dtype)
        return None, mixed

    def _run_recorded(self, residual, routing, cache, doc_start, output_hidden_states, recorded):
        """`_run` for a cache that records its states (`MoMCache.activate_past_recording`): the first tokens at once,
        the last ``recorded`` one by one, the states saved before each, so that ``cache.crop`` can roll back to it."""
        l = residual.shape[1]
        chunks = []
        if l > recorded:
            head = l - recorded
            chunks.append(self._run(residual[:, :head], Routing(routing.modality_ids[:, :head], routing.num_modalities),
                                    cache, None, None if doc_start is None else doc_start[:, :head], None,
                                    output_hidden_states))
            cache.seqlen_offset += head
        for t in range(l - recorded, l):
            cache.record()
            chunks.append(self._run(residual[:, t : t + 1], routing.at(t), cache, None, None, None,
                                    output_hidden_states))
            cache.seqlen_offset += 1
        hidden = torch.cat([h for h, _ in chunks], dim=1)
        if not output_hidden_states:
            return hidden, None
        return hidden, tuple(torch.cat(states, dim=1) for states in zip(*(s for _, s in chunks)))

    @staticmethod
    def _sequence_order(routing: Routing, stream: torch.Tensor) -> torch.Tensor:
        """(b, l, d) rows in the routing's sorted order -> sequence order (a row gather, a gather back in backward)."""
        b, l, d = stream.shape
        return permute_rows(stream.reshape(b * l, d), routing.inv_perm, routing.perm).view(b, l, d)


class MoMForCausalLM(MoMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: MoMConfig) -> None:
        super().__init__(config)
        self.backbone = MoMModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.decode_graphs = DecodeGraphs()  # generate()'s CUDA-graph decode steps (`mom.model.graph`)
        self.prefill_graphs = PrefillGraphs()  # recorded prefills (`mom.model.prefill_graph`)
        self.post_init()

    @property
    def backend(self) -> str:
        return self.backbone.backend

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build its key/value cache: _prepare_cache_for_generation builds a MoMCache

    def _prepare_cache_for_generation(self, generation_config: GenerationConfig, model_kwargs: dict, *args,
                                      **kwargs) -> None:
        """Where transformers builds its own cache for generate(): an empty `MoMCache` (the prefill allocates it, once
        beam search has set the batch). An assistant's cache records its states, to be rolled back to the accepted
        draft, as transformers does with its own."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)  # checks a given one
        if GENERATE_CARRIES_CACHE and generation_config.use_cache and model_kwargs.get("cache") is None:
            model_kwargs["cache"] = MoMCache(self.config)
            if getattr(generation_config, "is_assistant", False):
                model_kwargs["cache"].activate_past_recording(generation_config.num_assistant_tokens)

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 **kwargs: Any) -> Any:
        """transformers' ``generate()``; a plain call (`mom.model.generate_loop.plan`: greedy, or sampling with
        temperature / top-k / top-p; ``max_new_tokens``, optionally ``min_new_tokens`` and end-of-sequence / padding
        ids, nothing else) runs MoM's own loop, which gives the same tokens without waiting for the device between
        steps (`mom.model.generate_loop.decode`)."""
        p = generate_loop.plan(inputs, generation_config, self.generation_config, kwargs)
        if p is None:
            return super().generate(inputs, generation_config, **kwargs)
        return generate_loop.decode(self, p)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: MoMCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        use_cache: bool | None = None,
        modality_ids: torch.LongTensor | None = None,
        cuda_graph: bool = True,
        prefill_cuda_graph: bool = True,
        **kwargs,
    ) -> dict:
        """transformers' inputs (every keyword argument goes on to ``forward``), as for its Mamba: the tokens the cache
        has not consumed, no attention mask after the prefill. ``modality_ids`` go with the prompt's ``inputs_embeds``
        only: token ids say their modality. ``cuda_graph`` (a generate() keyword, default True): decode steps replay
        a CUDA graph where one applies (`decode_logits`). ``prefill_cuda_graph`` (a generate() keyword, default True)
        records and replays the prompt's forward (`mom.model.prefill_graph`) in MoM's own loop (a plain greedy or
        sampling call, `mom.model.generate_loop`); transformers' loop, which passes the prompt's attention mask, runs
        it eagerly."""
        if not GENERATE_CARRIES_CACHE:
            cache, next_sequence_length, use_cache = None, None, False
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, use_cache=use_cache, **kwargs,
        )
        if use_cache and not is_first_iteration:
            model_inputs["attention_mask"] = None
            model_inputs["cuda_graph"] = cuda_graph
        embeds = model_inputs.get("inputs_embeds")
        if embeds is not None and modality_ids is not None:
            model_inputs["modality_ids"] = modality_ids[:, -embeds.shape[1] :]
        return model_inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        cache: MoMCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        seq_idx: torch.Tensor | None = None,
        modality_counts: Sequence[int] | torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        cuda_graph: bool = False,
        **kwargs,
    ) -> MoMCausalLMOutput | tuple:
        """Next-token LM. input_ids, labels, modality_ids, seq_idx: (b, l); labels are shifted inside (HF
        convention), or ``shift_labels`` (b, l) give position t's target directly (context-parallel shards).
        ``logits_to_keep``: an int k computes the logits of the last k positions only (0: all), an index tensor
        those positions; ``generate()`` passes 1. ``inputs_embeds``, ``seq_idx``, ``modality_counts``: see
        `MoMModel.forward`. ``return_dict=False`` returns ``to_tuple()`` of the output. ``cuda_graph``: a one-token
        step after a cached prefix replays a CUDA graph where one applies (`decode_logits`); its ids are not checked
        (generate() sets it for the ids it sampled). On a prefill (token ids into a fresh cache, ``logits_to_keep=k``,
        no other input) it records the prompt shape's forward the second time the shape comes and replays it from
        then on, its ids checked first (`mom.model.prefill_graph`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        has_targets = labels is not None or shift_labels is not None
        keep = kept_positions(logits_to_keep)
        keep_last = -keep.start if isinstance(keep, slice) else 0  # the last k positions, or 0: all or an index
        if cuda_graph and self._graph_step_applies(input_ids, cache, use_cache, keep, has_targets, inputs_embeds,
                                                   output_hidden_states):
            logits = self.decode_logits(input_ids, cache).unsqueeze(1)  # (b, 1, V)
            result = MoMCausalLMOutput(logits=logits, cache=cache)
            return result if return_dict else result.to_tuple()
        if cuda_graph and self._graph_prefill_applies(input_ids, cache, use_cache, keep_last, has_targets,
                                                      output_hidden_states, modality_ids, attention_mask, seq_idx,
                                                      modality_counts, inputs_embeds):
            cache = cache if cache is not None else MoMCache(self.config)  # (the eager forward's too, if it runs)
            logits = None
            if self.prefill_graphs.applies(input_ids, cache, keep_last):
                logits = self.prefill_graphs.logits(self, functools.partial(self._prefill_logits, keep_last=keep_last),
                                                    input_ids, cache, keep_last, self.check_inputs)
            if logits is not None:  # else: a shape that cannot be recorded, or a model of other modules
                result = MoMCausalLMOutput(logits=logits, cache=cache)
                return result if return_dict else result.to_tuple()
        if has_targets and not (isinstance(keep, slice) and keep == slice(0, None)):
            raise ValueError("labels cannot be combined with logits_to_keep: the loss needs every position's logits")
        out = self.backbone(
            input_ids,
            modality_ids=modality_ids,
            seq_idx=seq_idx,
            modality_counts=modality_counts,
            cache=cache,
            use_cache=use_cache,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            labels=labels,
            shift_labels=shift_labels,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            keep_last=keep_last,
        )
        hidden = out.last_hidden_state if keep_last else out.last_hidden_state[:, keep]
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()  # (b, kept, V)
        losses = {}
        if has_targets:
            # position t predicts labels[t + 1]: shift the labels, not the (b, l, V) logits (no copy of them)
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) if shift_labels is None else shift_labels
            losses = self._losses(logits, targets.long())
        # every field given at once: to_tuple() keeps the fields' order
        result = MoMCausalLMOutput(logits=logits, cache=out.cache, hidden_states=out.hidden_states, **losses)
        return result if return_dict else result.to_tuple()

    def check_inputs(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                     modality_ids: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None,
                     inputs_embeds: torch.Tensor | None = None, **other_inputs) -> None:
        """Raise ValueError for a batch `forward` would reject (ids, labels or modality ids out of range or
        contradicting each other), checked now: one read of the batch's device, none for CPU tensors. A CUDA-graph
        step (`mom.train.captured_step`) checks each batch with it before it goes in, since a captured forward
        cannot read the device to check it. ``other_inputs`` (a mask, seq_idx) need no check of their values."""
        check_inputs(self.config, input_ids, modality_ids, labels, shift_labels, inputs_embeds)

    def decode_logits(self, input_ids: torch.Tensor, cache: MoMCache) -> torch.Tensor:
        """One token per row after ``cache``'s prefix, no host sync, ids unchecked (`MoMModel.decode_step`): ids (b, 1)
        -> next-token logits (b, V) fp32; the cache advances by one token. Replays the model's CUDA graph of this
        batch where one applies (`mom.model.graph.DecodeGraphs`), else runs eagerly: the same step either way."""
        if self.decode_graphs.applies(self, input_ids, cache):
            logits = self.decode_graphs.step(self, self._decode_step_logits, input_ids, cache)
        else:
            logits = self._decode_step_logits(input_ids, cache)
        cache.seqlen_offset += 1
        return logits

    def _decode_step_logits(self, input_ids: torch.Tensor, cache: MoMCache) -> torch.Tensor:
        """(b, 1) ids -> (b, V) fp32 logits, the states of ``cache`` advanced (what a decode graph captures)."""
        hidden = self.backbone.decode_step(input_ids, cache)[:, -1]  # (b, d)
        return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()

    def _prefill_logits(self, input_ids: torch.Tensor, cache: MoMCache, keep_last: int) -> torch.Tensor:
        """A prompt's forward into a fresh ``cache`` -> the last ``keep_last`` positions' logits (b, k, V) fp32 (what a
        prefill graph records, `mom.model.prefill_graph`)."""
        hidden = self.backbone(input_ids, cache=cache, use_cache=True, output_hidden_states=False, return_dict=True,
                               keep_last=keep_last).last_hidden_state
        return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()

    def _hidden_states_asked(self, output_hidden_states: bool | None) -> bool:
        return bool(output_hidden_states or (output_hidden_states is None and self.config.output_hidden_states))

    def _graph_prefill_applies(self, input_ids, cache, use_cache, keep_last, has_targets, output_hidden_states,
                               *other_inputs) -> bool:
        """Whether a forward may be a prefill that a prefill graph computes (`mom.model.prefill_graph`, which checks
        the ids and the cache): token ids into a cache, the last positions' logits wanted (``logits_to_keep=k``), no
        other input (modality ids, mask, seq_idx, counts, embeddings: ``other_inputs`` all None) and nothing else
        asked for."""
        wants_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        return (wants_cache and keep_last > 0 and input_ids is not None and all(x is None for x in other_inputs)
                and (cache is None or isinstance(cache, MoMCache)) and not has_targets
                and not self._hidden_states_asked(output_hidden_states) and not self._weights_offloaded()
                and self._groups_on_device(input_ids.device))

    def _groups_on_device(self, device: torch.device) -> bool:
        """Whether a forward on ``device`` can run its routed GEMMs without the tokens per modality on the host, as a
        recorded one must: in a compute dtype (`fused.compute_dtype` of the embedded tokens) that ``torch._grouped_mm``
        takes there."""
        dtype = fused.compute_dtype(self.get_input_embeddings().weight)
        return grouped.grouped_mm_supported(device, dtype, dtype)

    def _graph_step_applies(self, input_ids, cache, use_cache, keep, has_targets, inputs_embeds,
                            output_hidden_states) -> bool:
        """Whether a forward is a plain decode step that `decode_logits` computes: one token id per row after a
        cached prefix, its logits wanted, nothing else asked for."""
        return (input_ids is not None and inputs_embeds is None and input_ids.dim() == 2 and input_ids.shape[1] == 1
                and isinstance(cache, MoMCache) and cache.seqlen_offset > 0 and use_cache is not False
                and cache.batch_size == input_ids.shape[0] and not cache.recording and not has_targets
                and not self._hidden_states_asked(output_hidden_states)
                and isinstance(keep, slice) and not self._weights_offloaded())

    def _weights_offloaded(self) -> bool:
        """Whether accelerate places some weights at each module call (a ``device_map`` with blocks on disk, or on the
        CPU beside a GPU): `decode_logits` reads weights without calling every module, so the forward's module path
        decodes then."""
        placement = set((getattr(self, "hf_device_map", None) or {}).values())
        return "disk" in placement or ("cpu" in placement and len(placement) > 1)

    def _losses(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, object]:
        """The loss fields of `MoMCausalLMOutput`: mean loss over all targets (b, l), and per modality of the target
        token (no host sync)."""
        M = self.config.num_modalities
        targets = targets.reshape(-1)  # (b * l,)
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX,
                                    reduction="none")
        valid = (targets != IGNORE_INDEX).float()
        target_modality = modality_of_ids(self.config, targets)  # -100 lands in 0, with weight 0
        sums = per_token.new_zeros(M).scatter_add_(0, target_modality, per_token * valid)
        counts = valid.new_zeros(M).scatter_add_(0, target_modality, valid)
        means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        return {
            "loss": sums.sum() / counts.sum().clamp(min=1),  # 0 without targets (see MoMCausalLMOutput)
            "modality_losses": dict(zip(self.config.modalities, means.unbind())),
            "modality_loss_sums": sums,
            "modality_target_counts": counts,
        }

    @classmethod
    def from_dense_mamba(cls, model_or_path, config: MoMConfig) -> MoMForCausalLM:
        """Warm-start a MoM from a dense ``transformers.MambaForCausalLM`` (object or local directory).

        Every dense projection is copied into every modality's expert, so the new model's logits equal the dense
        model's for any mix of modalities until training makes the experts diverge.
        """
        from mom.model.convert import mom_from_dense_mamba

        return mom_from_dense_mamba(model_or_path, config, cls)

    @classmethod
    def from_dense_mamba2(cls, model_or_path, config: MoMConfig) -> MoMForCausalLM:
        """Warm-start a ``mixer: mamba2`` MoM from a dense ``transformers.Mamba2ForCausalLM`` (object or local
        directory): every dense projection copied into every expert, so the logits equal the dense model's."""
        from mom.model.convert import mom_from_dense_mamba2

        return mom_from_dense_mamba2(model_or_path, config, cls)
