"""MoM language model: embeddings, a stack of (norm -> `MoMMixer` -> residual) blocks, final norm, LM head.

Hugging Face integration follows ``transformers``' Mamba modelling file: `MoMModel` (backbone) and
`MoMForCausalLM` (``PreTrainedModel`` + ``GenerationMixin``) with a recurrent `MoMCache` for ``generate()``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from mom.model.cache import MoMCache
from mom.model.config import MoMConfig
from mom.model.mixer import MoMMixer, sorted_stream
from mom.model.routing import Routing, permute_rows
from mom.ops import backend, fused

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value excluded from the loss (Hugging Face convention)


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
    residual). On CUDA this is mamba-ssm's fused Triton add+norm kernel (one pass), as in its ``Block``."""
    fn = backend.layer_norm_fn(residual)
    if fn is not None:
        return fn(residual if out is None else out, norm.weight, getattr(norm, "bias", None),
                  residual=None if out is None else residual, eps=norm.eps, prenorm=True,
                  residual_in_fp32=residual_in_fp32, is_rms_norm=isinstance(norm, RMSNorm))
    if out is not None:
        residual = residual + out
    if residual_in_fp32:
        residual = residual.float()
    return norm(residual.to(norm.weight.dtype)), residual


class MoMBlock(nn.Module):
    """Pre-norm residual block. With h the residual stream: h += out_prev; out = mixer(norm(h)). The addition of
    a block's output is done by the next block (or the final norm), fused with its norm as mamba-ssm does; the
    stream itself is ``residual + out``. Norms are shared across modalities."""

    def __init__(self, config: MoMConfig, layer_idx: int) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = make_norm(config)
        self.mixer = MoMMixer(config, layer_idx)

    def forward(self, out, residual, routing, cache=None, mask=None, doc_start=None, sorted_tokens=False):
        """(previous block's output or None, residual stream) -> (this block's output, residual stream)."""
        hidden, residual = add_norm(self.norm, out, residual, self.residual_in_fp32)
        return self.mixer(hidden, routing, cache, mask, doc_start, sorted_tokens), residual


@dataclass
class MoMOutput(ModelOutput):
    """``modality_ids`` (b, l): the routing used (given, or derived from the token ids)."""

    last_hidden_state: torch.Tensor | None = None
    modality_ids: torch.Tensor | None = None
    cache: MoMCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class MoMCausalLMOutput(ModelOutput):
    """``modality_losses``: {modality: mean next-token loss over targets of that modality} (NaN if none).

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
    _is_stateful = True

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
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=cfg.initializer_range)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module is getattr(self, "lm_head", None):
            if not cfg.tie_word_embeddings:
                init.normal_(module.weight, std=cfg.initializer_range)

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


def _linears(proj: nn.Module) -> list[nn.Linear]:
    """The expert ``nn.Linear``s of a projection (one if shared)."""
    return [proj] if isinstance(proj, nn.Linear) else [m for m in proj.values() if isinstance(m, nn.Linear)]


def validate_and_route(
    config: MoMConfig,
    input_ids: torch.Tensor,
    modality_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    modality_counts: Sequence[int] | torch.Tensor | None = None,
    defer: bool = True,
) -> tuple[Routing, Callable[[], object]]:
    """Check shapes and ranges and build the batch's `Routing` (modality ids derived from the token ids if not
    given). -> (routing, finish): call ``finish()`` once the forward's work is enqueued.

    The routing's expert blocks are host integers, and reading anything from the device waits for all the work
    queued before it: at the start of a training forward, the previous step's backward. So:

    - without ``modality_counts``: ONE host sync, now, reads the checks and the per-modality token counts together
      (``finish`` does nothing);
    - with ``modality_counts`` (tokens per modality, counted by the caller on the host, e.g. from the CPU batch as
      `mom.train` does) and ``defer``: no sync now; ``finish`` reads the checks and the device's counts in ONE sync
      after the forward is enqueued, so the GPU never waits for the host, and raises if either is wrong. Until then
      nothing may index with an unchecked id: the forward clamps token ids for the embedding, and the loss comes
      after. (Not ``defer``: the given counts are checked now, with the rest.)
    """
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor of shape (batch, length), got {tuple(input_ids.shape)}")
    for name, t in (("modality_ids", modality_ids), ("labels", labels)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has shape {tuple(input_ids.shape)}")
    V, M = config.vocab_size, config.num_modalities
    checks = {"token id": (input_ids, (input_ids < 0) | (input_ids >= V), f"[0, {V})")}
    if modality_ids is not None:
        bad = (modality_ids < 0) | (modality_ids >= M)
        checks["modality id"] = (modality_ids, bad, f"[0, {M}) {config.modalities}")
    if labels is not None:
        bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= V)
        checks["label"] = (labels, bad, f"[0, {V}) or {IGNORE_INDEX}")
    if modality_ids is None:
        bounds = _vocab_bounds(tuple(config.vocab_offsets[1:]), input_ids.device, input_ids.dtype)
        modality_ids = torch.bucketize(input_ids.contiguous(), bounds, right=True)
    routing = Routing(modality_ids.long(), M)
    flags_and_counts = torch.cat([torch.stack([bad.any() for _, bad, _ in checks.values()]).long(),
                                  routing.device_counts])

    def read() -> tuple[int, ...]:
        """The one host sync: raise for the first failed check, else return the device's counts."""
        values = flags_and_counts.tolist()
        for (what, (ids, bad, valid)), flag in zip(checks.items(), values):
            if flag:
                raise ValueError(f"{what} {int(ids[bad][0])} is out of range; valid: {valid}")
        return tuple(values[len(checks) :])

    given = None if modality_counts is None else tuple(int(c) for c in modality_counts)

    def finish() -> tuple[int, ...]:
        actual = read()
        if given is not None and actual != given:
            raise ValueError(f"modality_counts {given} do not match the batch's tokens per modality {actual} "
                             f"{config.modalities}")
        return actual

    if given is None or not defer:
        routing.set_counts(finish())
        return routing, lambda: None
    routing.set_counts(given)
    return routing, finish


@functools.cache
def _vocab_bounds(offsets: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The first id of every modality but the first, on the device: copied there once, not at every forward (a copy
    from host memory waits for the device)."""
    return torch.tensor(offsets, device=device, dtype=dtype)


class MoMModel(MoMPreTrainedModel):
    def __init__(self, config: MoMConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([MoMBlock(config, i) for i in range(config.n_layer)])
        self.norm_f = make_norm(config)
        self.gradient_checkpointing = False
        self._logged_backend: str | None = None
        self.post_init()

    @property
    def backend(self) -> str:
        """Which selective-scan backend this model's forward uses on its current device, and whether its mixers take
        the fused fast path (`mom.ops.fused`) where they can."""
        name = backend.backend_name(self.embeddings.weight.device)
        if name != "reference" and self.config.use_fast_path and fused.cuda_ops() is not None:
            name += " (fused mixer)"
        return name

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        modality_ids: torch.LongTensor | None = None,
        cache: MoMCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        labels: torch.LongTensor | None = None,
        seq_idx: torch.Tensor | None = None,
        modality_counts: Sequence[int] | torch.Tensor | None = None,
        **kwargs,
    ) -> MoMOutput:
        """input_ids, modality_ids, attention_mask, seq_idx: (b, l). ``labels`` is only validated here.

        ``seq_idx`` (the packed batch's document index per position) restarts the conv window and the SSM state at
        every document start when ``config.reset_at_document_boundaries`` is set; otherwise state flows on.
        ``modality_counts`` (M,): the batch's tokens per modality, counted on the host by the caller; a forward
        without cache then starts without waiting for the device (see `validate_and_route`).
        """
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        # deferred checks only without a cache: a forward that writes the recurrent cache is checked before it runs
        defer = modality_counts is not None and not use_cache
        routing, finish_checks = validate_and_route(self.config, input_ids, modality_ids, labels, modality_counts,
                                                    defer)
        doc_start = None
        if self.config.reset_at_document_boundaries and seq_idx is not None:
            if seq_idx.shape != input_ids.shape:
                raise ValueError(f"seq_idx has shape {tuple(seq_idx.shape)} but input_ids has {tuple(input_ids.shape)}")
            doc_start = torch.zeros_like(input_ids, dtype=torch.bool)
            doc_start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        if self._logged_backend != self.backend:
            self._logged_backend = self.backend
            logger.info("mom: selective-scan backend = %s", self.backend)
        if use_cache and cache is None:
            cache = MoMCache(self.config, input_ids.shape[0], input_ids.device, self.embeddings.weight.dtype)
        cache = cache if use_cache else None
        mask = None
        if attention_mask is not None and cache is not None and cache.seqlen_offset > 0:
            attention_mask = None  # steps after the prefill are never padding
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask

        # ids are checked by finish_checks() when the caller gave the counts: until then, in range for the embedding
        embed_ids = input_ids.clamp(0, self.config.vocab_size - 1) if defer else input_ids
        b, l = input_ids.shape
        # a training forward whose mixers all take the fast path keeps the stream's b * l rows sorted by modality
        # (`Routing.perm`): the routed in_proj / out_proj then read and write it without row gathers
        in_sorted = (cache is None and mask is None and doc_start is None
                     and sorted_stream([layer.mixer for layer in self.layers], input_ids))
        if in_sorted:
            embed_ids = embed_ids.reshape(-1)[routing.perm].view(b, l)
        out, residual = None, self.embeddings(embed_ids)  # the residual stream (b, l, d) is residual + out
        in_order = functools.partial(self._sequence_order, routing) if in_sorted else (lambda t: t)
        all_hidden = (in_order(residual),) if output_hidden_states else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                out, residual = self._gradient_checkpointing_func(layer.__call__, out, residual, routing, None, mask,
                                                                  doc_start, in_sorted)
            else:
                out, residual = layer(out, residual, routing, cache, mask, doc_start, in_sorted)
            if output_hidden_states:
                all_hidden += (in_order(residual + out),)
        hidden, _ = add_norm(self.norm_f, out, residual, self.config.residual_in_fp32)
        hidden = in_order(hidden)
        finish_checks()  # raises for bad input before anything (loss, backward, cache) uses the forward
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        return MoMOutput(hidden, routing.modality_ids, cache, all_hidden)

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
        return False  # generate() must not build a key/value cache: prepare_inputs_for_generation makes a MoMCache

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: MoMCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        if use_cache is not False and cache is not None and cache.seqlen_offset > 0:
            input_ids = input_ids[:, -1:]  # the prefix lives in the recurrent state
            attention_mask = None
        return {
            "input_ids": input_ids,
            "cache": cache,
            "use_cache": use_cache,
            "attention_mask": attention_mask,
        }

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        modality_ids: torch.LongTensor | None = None,
        cache: MoMCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        seq_idx: torch.Tensor | None = None,
        modality_counts: Sequence[int] | torch.Tensor | None = None,
        **kwargs,
    ) -> MoMCausalLMOutput:
        """Next-token LM. input_ids, labels, modality_ids, seq_idx: (b, l); labels are shifted inside (HF
        convention). ``seq_idx``, ``modality_counts``: see `MoMModel.forward`."""
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
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()  # (b, l, V)
        result = MoMCausalLMOutput(logits=logits, cache=out.cache, hidden_states=out.hidden_states)
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels cannot be combined with logits_to_keep")
            self._add_losses(result, logits, labels, out.modality_ids)
        return result

    def _add_losses(self, result, logits, labels, modality_ids) -> None:
        """Mean loss over all targets, and per modality of the target token (no host sync)."""
        M = self.config.num_modalities
        # position t predicts labels[t + 1]: shift the labels, not the (b, l, V) logits (no copy of them)
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # (b * l,)
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX,
                                    reduction="none")
        valid = (targets != IGNORE_INDEX).float()
        target_modality = F.pad(modality_ids[:, 1:], (0, 1)).reshape(-1).long()
        sums = per_token.new_zeros(M).scatter_add_(0, target_modality, per_token * valid)
        counts = valid.new_zeros(M).scatter_add_(0, target_modality, valid)
        result.loss = sums.sum() / counts.sum().clamp(min=1)
        result.modality_loss_sums, result.modality_target_counts = sums, counts
        means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        result.modality_losses = dict(zip(self.config.modalities, means.unbind()))

    @classmethod
    def from_dense_mamba(cls, model_or_path, config: MoMConfig) -> MoMForCausalLM:
        """Warm-start a MoM from a dense ``transformers.MambaForCausalLM`` (object or local directory).

        Every dense projection is copied into every modality's expert, so the new model's logits equal the dense
        model's for any mix of modalities until training makes the experts diverge.
        """
        from mom.model.convert import mom_from_dense_mamba

        return mom_from_dense_mamba(model_or_path, config, cls)
