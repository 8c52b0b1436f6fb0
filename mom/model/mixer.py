"""`MoMMixer`: a Mamba-1 mixer whose token-wise projections are per modality.

Per token, exactly as in Mamba (mamba-ssm's ``modules/mamba_simple.py``)::

    x, z   = in_proj(h)                  # (b, l, 2*d_inner)   expert of the token's modality if decoupled
    x      = silu(conv1d(x))             # shared depthwise causal conv over the WHOLE interleaved sequence
    Δr,B,C = x_proj(x)                   # (b, l, dt_rank + 2*d_state)
    Δ      = softplus(dt_proj(Δr))       # (b, l, d_inner), dt_proj includes its (per-modality) Δ bias
    y      = scan(x, Δ, A, B, C, D) * silu(z)   # ONE selective scan, shared A_log and D: state crosses modalities
    out    = out_proj(y)                 # (b, l, d_model)

Projections named in ``config.decouple`` are `RoutedLinear` (one ``nn.Linear`` per modality), the others plain
``nn.Linear``; with ``decouple=()`` this is exactly a dense Mamba mixer.

Forwards over whole sequences on CUDA take the fast path, `mom.ops.fused` (the same maths as one autograd Function in
the scan's layout), which takes tensors: the mixer decides when it applies (`MoMMixer.fast_path_applies`) and gathers
its parameters for it (`MoMMixer.fast_path_weights`). That covers training and generation's prefill (the Function
writes the recurrent cache's states), padding included outside a prefill (the Function zeroes padded positions on
the device as this path does, so that a training forward's mask is applied unread: `masks_on_device`). This module
path is the reference it is tested against, and runs everything else: CPU, a padded prefill, document resets,
LoRA-wrapped experts, ZeRO-3-partitioned weights; decode steps after a cached prefix run `MoMMixer.step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from mom.model import registrations
from mom.model.cache import MoMCache
from mom.model.config import MoMConfig
from mom.model.routing import RoutedLinear, Routing, plain_experts, project, project_rows
from mom.ops import backend, fused, scan_ops
from mom.ops.projections import Projection
from mom.ops.triton import routed_rows, state_update


class CausalConv1d(nn.Conv1d):
    """The depthwise causal conv, silu included (``weight`` (di, 1, w), as mamba-ssm's ``conv1d``). Called as a
    module, so that whatever places a module's weights at its call (accelerate's offload hooks under
    ``device_map``, ZeRO-3) sees its weights used."""

    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None,
                conv_state: torch.Tensor | None = None) -> torch.Tensor:
        """x: (b, di, l) -> silu(causal conv(x)) (b, di, l); the window restarts where ``doc_start`` (b, l) is set.
        With ``conv_state`` (b, di, w), one recurrent step instead: x (b, di) -> (b, di), the state updated in place."""
        if conv_state is not None:
            return backend.causal_conv1d_update(x, conv_state, self.weight.squeeze(1), self.bias)
        return backend.causal_conv1d(x, self.weight.squeeze(1), self.bias, doc_start)


class MoMMixer(nn.Module):
    def __init__(self, config: MoMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.use_fast_path = config.use_fast_path  # `mom.ops.fused` when its kernels are present
        self.d_inner, self.d_state, self.dt_rank = config.d_inner, config.d_state, config.dt_rank

        def linear(p: Projection, in_f: int, out_f: int, bias: bool) -> nn.Module:
            if p.name in config.decouple:
                return RoutedLinear(config.modalities, in_f, out_f, bias)
            return nn.Linear(in_f, out_f, bias=bias)

        di, n, r = self.d_inner, self.d_state, self.dt_rank
        self.in_proj = linear(Projection.in_proj, config.d_model, 2 * di, config.bias)
        self.conv1d = CausalConv1d(di, di, config.d_conv, groups=di, padding=config.d_conv - 1, bias=config.conv_bias)
        self.x_proj = linear(Projection.x_proj, di, r + 2 * n, False)
        self.dt_proj = linear(Projection.dt_proj, r, di, True)
        self.A_log = nn.Parameter(torch.empty(di, n))  # A = -exp(A_log), S4D-real init in _init_weights
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = linear(Projection.out_proj, di, config.d_model, config.bias)
        # Excluded from weight decay (mom.train.optim reads `_no_weight_decay`).
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self._fast_path_weights: registrations.Cached[fused.MixerWeights | None] = registrations.Cached()

    def forward(
        self,
        hidden: torch.Tensor,
        routing: Routing,
        cache: MoMCache | None = None,
        mask: torch.Tensor | None = None,
        doc_start: torch.Tensor | None = None,
        sorted_tokens: bool = False,
        A: torch.Tensor | None = None,
        keep_last: int = 0,
    ) -> torch.Tensor:
        """hidden: (b, l, d_model) -> (b, l, d_model), or (b * k, d_model) with ``keep_last`` k > 0.

        ``mask`` (b, l), 1 (True) for real tokens and 0 for padding, zeroes padded positions before the projection
        and after the conv so that they leave no trace in the conv window or the SSM state; on either path (the fused
        one zeroes the same on the device, but a prefill with a mask runs this path). ``doc_start`` (b, l)
        bool marks where packed documents start: the conv window and the SSM state restart there. ``sorted_tokens``:
        hidden's rows and the output's are in the routing's sorted order (a sorted residual stream, fast path only:
        the model decides, `sorted_stream`). ``A``: ``-exp(A_log)``, computed by the model for all layers at once
        (`SortedStream`) for the fused path to read, or None (the module path computes its own, with autograd).
        ``keep_last`` k > 0: with ``sorted_tokens`` and without gradients, each row's last k tokens are the only ones
        whose output is wanted (`Routing.last_tokens`, `mom.ops.fused.fused_mixer`'s ``kept``); the output is their
        rows, row by row.
        """
        if sorted_tokens:
            return self.fused_forward(hidden, routing, sorted_tokens=True, cache=cache, mask=mask, A=A,
                                      keep_last=keep_last)
        if keep_last:
            raise ValueError("MoMMixer: keep_last is for a sorted residual stream (the fused path)")
        if cache is not None and cache.seqlen_offset > 0:
            return self._continue(hidden, routing, cache)
        if doc_start is None and (mask is None or cache is None) and self.fast_path_applies(hidden):
            return self.fused_forward(hidden, routing, cache=cache, mask=mask, A=A)  # with a cache: a prefill
        l = hidden.shape[1]
        if mask is not None:  # on the hidden's device: accelerate's device_map may place blocks on several devices
            mask = mask.to(hidden.device)
            hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        xz = project(self.in_proj, hidden, routing)  # (b, l, 2*di)
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # (b, di, l) each
        if cache is not None:  # keep the last w inputs for the recurrent conv
            w = self.conv1d.kernel_size[0]
            cache.conv_states[self.layer_idx].copy_(nn.functional.pad(x, (w - l, 0)) if l < w else x[..., -w:])
        x = self.conv1d(x.contiguous(), doc_start)  # (b, di, l)
        if mask is not None:
            x = x * mask.unsqueeze(1).to(x.dtype)
        dt, B, C = self._ssm_params(x.transpose(1, 2), routing)
        A = -torch.exp(self.A_log.float())  # (di, n)
        result = backend.selective_scan(
            x,
            dt.transpose(1, 2).contiguous(),
            A,
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z.contiguous(),
            delta_bias=None,  # the Δ bias is inside dt_proj (per modality when decoupled)
            delta_softplus=True,
            return_last_state=cache is not None,
            reset=doc_start,
        )
        if cache is not None:
            y, last_state = result
            cache.ssm_states[self.layer_idx].copy_(last_state)
        else:
            y = result
        return project(self.out_proj, y.transpose(1, 2), routing)  # (b, l, d_model)

    def fast_path_weights(self) -> fused.MixerWeights | None:
        """This mixer's parameters as the fused Function reads them (`mom.ops.fused.MixerWeights`), or None when the
        Function cannot compute this mixer: an expert that is not a plain ``nn.Linear`` (a LoRA-wrapped one must be
        called as a module) or a weight that is absent (ZeRO-3 leaves a module's weights empty until the module is
        called; the Function reads them without calling it).

        It runs at every layer's forward, and each ``nn.Module`` attribute read of a submodule or parameter costs host
        time (``__getattr__``), which a small model's step can be bound by: the weights are gathered once and reused
        until a module or parameter is assigned anywhere (`mom.model.registrations`); only their presence is read
        again."""
        weights = self._fast_path_weights.get(self._gather_fast_path_weights)
        return weights if weights is not None and weights.present() else None

    def _gather_fast_path_weights(self) -> fused.MixerWeights | None:
        weights, biases = [], []
        for p in Projection:
            proj = getattr(self, p.name)
            experts = tuple(proj.values()) if isinstance(proj, RoutedLinear) else (proj,)
            if any(type(e) is not nn.Linear for e in experts):
                return None
            weights.append(tuple(quiet_parameter(e, "weight") for e in experts))
            bias = tuple(quiet_parameter(e, "bias") for e in experts)
            if any(b is None for b in bias) and any(b is not None for b in bias):
                return None  # some experts with a bias, some without: the Function stacks them
            biases.append(None if bias[0] is None else bias)
        return fused.MixerWeights(tuple(weights), tuple(biases), quiet_parameter(self.conv1d, "weight"),
                                  quiet_parameter(self.conv1d, "bias"), quiet_parameter(self, "A_log"),
                                  quiet_parameter(self, "D"))

    def directly_read_parameters(self) -> list[nn.Parameter]:
        """The parameters of this mixer's submodules (experts, conv) that its forward may read without calling their
        modules (the fused Function does): whoever makes a module's parameters available only while that module
        runs (DeepSpeed ZeRO-3, `mom.train.distributed.initialize`) must make these available while this mixer
        runs. All of them, whatever the batch's modalities: every data-parallel rank gathers the same ones."""
        return submodule_parameters(self)

    def fast_path_applies(self, hidden: torch.Tensor) -> bool:
        """Whether the fused Function replaces the module path for a forward on ``hidden`` (a cache that holds tokens
        already, a padding mask, a document reset: the caller checks): ``use_fast_path`` is set, the CUDA ops serve
        ``hidden`` and `fast_path_weights` has this mixer's parameters."""
        return self.fast_path(hidden) is not None

    def fast_path(self, hidden: torch.Tensor, runs: bool | None = None) -> fused.MixerWeights | None:
        """`fast_path_weights` where `fast_path_applies`, else None. ``runs``: `mom.ops.scan_ops.runs_on` ``(hidden)``
        where the caller knows it already (a model asks it once for all its mixers)."""
        if not self.use_fast_path or not (scan_ops.runs_on(hidden) if runs is None else runs):
            return None
        return self.fast_path_weights()

    def fused_forward(self, hidden: torch.Tensor, routing: Routing, ops: scan_ops.ScanOps | None = None,
                      sorted_tokens: bool = False, cache: MoMCache | None = None,
                      mask: torch.Tensor | None = None, A: torch.Tensor | None = None,
                      keep_last: int = 0) -> torch.Tensor:
        """The forward through the fused Function (`mom.ops.fused.fused_mixer`), whatever `fast_path_applies` says.
        ``ops``: the Function's conv and scan, CUDA's by default (`mom.ops.scan_ops.REFERENCE_OPS` runs anywhere);
        ``sorted_tokens`` and ``mask`` (b, l) in sequence order as in `forward`. ``cache``: a prefill (nothing
        consumed yet): this layer's conv window and SSM state are written into it, as the module path writes them.
        ``keep_last``: as in `forward`."""
        weights = self.fast_path_weights()
        if weights is None:
            raise ValueError("the fused mixer needs plain nn.Linear experts with their weights present; wrapped (LoRA) "
                             "or ZeRO-3-partitioned ones take the module path")
        states = None
        if cache is not None:
            if cache.seqlen_offset:
                raise ValueError(f"the fused mixer writes a cache from a fresh state (a prefill); this one holds "
                                 f"{cache.seqlen_offset} tokens")
            states = (cache.conv_states[self.layer_idx], cache.ssm_states[self.layer_idx])
        routes = routing.routes(fused.compute_dtype(hidden))
        return fused.fused_mixer(hidden, weights, routes, ops, sorted_tokens=sorted_tokens, states_out=states,
                                 mask=mask, A=A, kept=routing.last_tokens(keep_last) if keep_last else None)

    def _ssm_params(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (b, l, di) -> Δ pre-activation (b, l, di), B (b, l, n), C (b, l, n)."""
        x_dbl = project(self.x_proj, x, routing)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return project(self.dt_proj, dt, routing), B, C

    def step(self, hidden: torch.Tensor, routing: Routing, cache: MoMCache) -> torch.Tensor:
        """One recurrent step. hidden: (b, 1, d_model) -> (b, 1, d_model); updates ``cache`` in place. Off the CPU
        each row's experts are picked on the device (`project_rows`): no host sync, the same work for any mix of
        modalities, so that the step can be captured in a CUDA graph (`mom.model.graph`)."""
        x, z = self._in_proj_conv(hidden[:, 0], routing, cache.conv_states[self.layer_idx])  # (b, di) each
        x_dbl = project_rows(self.x_proj, x, routing)  # (b, r + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = self._state_update(cache.ssm_states[self.layer_idx], x, dt, B, C, z, routing)  # (b, di)
        return project_rows(self.out_proj, y, routing).unsqueeze(1)

    def _in_proj_conv(self, h: torch.Tensor, routing: Routing,
                      conv_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """in_proj and the conv step: h (b, d_model) -> (x after the conv, z), (b, di) each; ``conv_state`` advances.
        A routed in_proj of plain experts on CUDA runs the conv in its kernel's epilogue (`routed_rows.ConvStep`); else
        the conv is its own step, called as a module."""
        experts = plain_experts(self.in_proj) if isinstance(self.in_proj, RoutedLinear) else None
        conv_weight = self.conv1d.weight  # (di, 1, w) unless partitioned (ZeRO-3) or offloaded
        # up to one block of rows: with 64 the epilogue's windows made the step slower (docs/performance.md)
        if (experts is not None and h.shape[0] <= routed_rows.ROWS and type(self.conv1d) is CausalConv1d
                and conv_weight.shape == (self.d_inner, 1, conv_state.shape[-1])):
            weights, biases = [e.weight for e in experts], [e.bias for e in experts]
            conv = routed_rows.ConvStep(conv_state, conv_weight.view(self.d_inner, -1), self.conv1d.bias)
            blocks = routed_rows.default_blocks(h.shape[1], weights[0].shape[0], h.shape[0])
            if routed_rows.kernel_applies(h, weights) and conv.applies(h, weights[0].shape[0], blocks):
                xz = routed_rows.routed_rows_linear(h, weights, None if biases[0] is None else biases,
                                                    routing.expert_ids, use_kernel=True, blocks=blocks, conv=conv)
                return xz[:, : self.d_inner], xz[:, self.d_inner :]
        x, z = project_rows(self.in_proj, h, routing).chunk(2, dim=-1)
        return self.conv1d(x, conv_state=conv_state), z

    def _state_update(self, state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      z: torch.Tensor, routing: Routing) -> torch.Tensor:
        """dt_proj on the Δ-rank features dt (b, r), then the selective state update of ``state`` -> y (b, di). Plain
        dt_proj experts on CUDA: one kernel for both (`mom.ops.triton.state_update`); others (LoRA-wrapped) are
        called as modules (`project_rows`) before the state update."""
        experts = plain_experts(self.dt_proj)
        if experts is not None:
            weights, biases = [e.weight for e in experts], [e.bias for e in experts]
            if all(b is not None for b in biases) and state_update.kernel_applies(state, x, dt, weights, self.A_log,
                                                                                  self.D, B, C, z):
                return state_update.routed_state_update(state, x, dt, weights, biases, routing.expert_ids,
                                                        self.A_log, B, C, self.D, z, use_kernel=True)
        dt = project_rows(self.dt_proj, dt, routing)  # (b, di), Δ pre-activation
        A = -torch.exp(self.A_log.float())  # (di, n)
        return backend.selective_state_update(state, x, dt, A, B, C, self.D.float(), z, dt_softplus=True)

    def _continue(self, hidden: torch.Tensor, routing: Routing, cache: MoMCache) -> torch.Tensor:
        """Several new tokens after a cached prefix: run them through the recurrent step one by one."""
        if hidden.shape[1] == 1:
            return self.step(hidden, routing, cache)
        outs = [self.step(hidden[:, t : t + 1], routing.at(t), cache) for t in range(hidden.shape[1])]
        return torch.cat(outs, dim=1)


def quiet_parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    """``module``'s own parameter ``name`` (None if it has none), read through ``named_parameters`` rather than as an
    attribute. The fast-path checks run ahead of a mixer's own forward (the model asks every mixer first,
    `sorted_stream`); under DeepSpeed ZeRO-3 an attribute read of a partitioned parameter during a forward gathers it
    for whichever module is running and keeps it registered there, which would hold every layer's experts for the
    whole model forward. Read this way, an absent parameter stays absent (the check says so) and is gathered when
    its mixer runs (`directly_read_parameters`)."""
    return dict(module.named_parameters(recurse=False)).get(name)


def submodule_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module``'s submodules (not its own), each once."""
    own = {id(p) for p in module.parameters(recurse=False)}
    return [p for p in module.parameters() if id(p) not in own]


@dataclass(frozen=True)
class SortedStream:
    """A forward whose residual stream stays in the routing's sorted order (`sorted_stream`), and what the model hands
    its mixers then, by layer: each `MoMMixer`'s ``A = -exp(A_log)`` for its fused path, computed for all of them in
    two launches (`mom.ops.fused.negative_exp`) instead of two in each layer; None for other mixers."""

    A: list[torch.Tensor | None]


def sorted_stream(mixers: Sequence[nn.Module], hidden: torch.Tensor) -> SortedStream | None:
    """Whether a model keeps its residual stream in the routing's sorted order (``forward(..., sorted_tokens=True)``),
    None where it does not: when every mixer takes its fast path (`MoMMixer`'s fused Function and
    `mom.model.mamba2.Mamba2Mixer`'s routed GEMMs read and write rows in either order; other mixer kinds have no fast
    path and read sequence order) and some route in_proj or out_proj (`mom.ops.fused.MixerWeights.routes_rows`, a
    Mamba-2 mixer's ``routes_rows``: a shared one reads sequence order as cheaply). ``hidden``: any tensor on the
    forward's device. Cache and reset: the caller checks (a padding mask goes along, in sequence order). Each mixer's
    fast-path weights are looked up once: a prefill's prelude, during which the GPU has nothing queued, is host time
    (docs/performance.md)."""
    logs: list[torch.Tensor | None] = []
    runs, routes = scan_ops.runs_on(hidden), False
    for m in mixers:
        if isinstance(m, MoMMixer):
            weights = m.fast_path(hidden, runs)
            if weights is None:
                return None
            logs.append(weights.A_log)
            routes = routes or weights.routes_rows
        elif m.fast_path_applies(hidden):
            logs.append(None)
            routes = routes or m.routes_rows()
        else:
            return None
    if not routes:
        return None
    present = [a for a in logs if a is not None]
    A = iter(fused.negative_exp(present) if present else [])
    return SortedStream([None if a is None else next(A) for a in logs])


def masks_on_device(mixers: Sequence[nn.Module]) -> bool:
    """Whether a model hands its mixers an attention mask without reading it first (whether it pads anything) in a
    forward that writes no cache: when every mixer is a Mamba-1 `MoMMixer`, whose paths both apply a mask with a few
    elementwise products, exact for an all-ones one. Other mixers take slower kernels for any mask (attention: an
    explicit mask instead of the causal kernel; Mamba-2: its module path), so the model drops an all-ones mask
    first, a host read."""
    return all(isinstance(m, MoMMixer) for m in mixers)
