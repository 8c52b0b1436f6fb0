"""`Mamba2Mixer`: a Mamba-2 (SSD) mixer whose token-wise projections are per modality (``config.mixer: mamba2``).

Per token, exactly as mamba-ssm's ``modules/mamba2.py`` (``Mamba2`` with ``rmsnorm=True, norm_before_gate=False``)::

    z, xBC, dt = in_proj(h)             # (b, l, 2*d_inner + 2*ngroups*d_state + nheads)  expert of the token's modality
    x, B, C    = silu(conv1d(xBC))      # shared depthwise causal conv over the WHOLE interleaved sequence
    Δ          = softplus(dt + dt_bias) # (b, l, nheads), dt_bias shared
    y          = SSD(x, Δ, A, B, C, D)  # ONE scan, a scalar decay A = -exp(A_log) per head: state crosses modalities
    y          = rmsnorm(y * silu(z))   # gated RMSNorm, per group of d_inner / ngroups channels, shared weight
    out        = out_proj(y)            # (b, l, d_model)                              expert of the token's modality

Mamba-2 has no ``x_proj`` / ``dt_proj``: ``in_proj`` produces z, x, B, C and dt at once, so decoupling it gives each
modality its own gate, input, B, C and Δ projections (what ``in_proj``, ``x_proj`` and ``dt_proj`` are in Mamba-1).
``decouple`` may name ``in_proj`` and ``out_proj``. The Δ bias stays shared, like A and D: in Mamba-1 it sits inside
``dt_proj`` and moves with it, but here it is a per-head parameter added inside the scan kernel (as A and D are),
and the per-modality Δ already comes from the routed ``in_proj``; the conv, A_log, D, dt_bias and the norm are
shared, the paper's split of token-wise (decoupled) and sequence-wise (shared) parameters.

On CUDA with mamba-ssm and causal-conv1d, a forward over whole rows runs the fast path (`fast_path_applies`): each
routed projection is ONE grouped GEMM over the tokens sorted by modality (`mom.ops.routed_linear`), which writes
in_proj's output rows in sequence order, then mamba-ssm's fused ``mamba_split_conv1d_scan_combined`` (conv, scan and
gated norm in one autograd Function; document resets through its ``seq_idx``), then out_proj's grouped GEMM, which
reads its input rows in sorted order (in bf16 the GEMMs gather and scatter the rows themselves,
`mom.ops.triton.gathered_mm`; otherwise a row permutation each way). A model whose mixers all take it
keeps its residual stream in that sorted order (`mom.model.mixer.sorted_stream`, ``sorted_tokens``): in_proj then
reads its rows and out_proj writes its rows without a permutation. Caches (a prefill) and padding run the module
path's conv and scan below (`mom.ops.ssd`'s dispatch) between the same projections. The module path (every expert
called as a module: LoRA adapters, offload hooks and ZeRO-3 see them) runs the rest, and is the reference the fast
path is tested against: CPU, ``use_fast_path: false``, wrapped or absent (ZeRO-3) experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom.model import registrations
from mom.model.cache import MoMCache
from mom.model.config import MoMConfig
from mom.model.mixer import CausalConv1d, quiet_parameter, submodule_parameters
from mom.model.routing import RoutedLinear, Routing, permute_rows, project, project_rows
from mom.ops import backend, ssd
from mom.ops.fused import compute_dtype
from mom.ops.routed_linear import routed_linear


class GatedRMSNorm(nn.Module):
    """rmsnorm(y * silu(z)) over groups of ``group_size`` channels, times ``weight`` (d,), in fp32 (mamba-ssm's
    ``layernorm_gated.rms_norm_ref`` with ``norm_before_gate=False``)."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z: (..., d) -> (..., d) in y's dtype."""
        x = y.float() * F.silu(z.float())
        groups = x.unflatten(-1, (-1, self.group_size))  # (..., g, d / g)
        groups = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)
        return (groups.flatten(-2) * self.weight.float()).to(y.dtype)


@dataclass(frozen=True, eq=False)
class Experts:
    """A routed projection's experts as tensors (`mom.ops.routed_linear` reads them): weights (out, in) and biases
    (out,) or None, in modality order."""

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...] | None


@dataclass(frozen=True, eq=False)
class FastPathWeights:
    """What the fast path reads without calling the modules that hold it: the routed projections' `Experts` (None
    for a shared projection, called as its module) and ``tensors``, every such tensor (the experts', and the conv's
    and the norm's weights, which mamba-ssm's fused kernel reads)."""

    in_proj: Experts | None
    out_proj: Experts | None
    tensors: tuple[torch.Tensor, ...]

    def present(self) -> bool:
        """Whether every tensor holds its values (ZeRO-3 leaves a module's weights empty until it is called)."""
        return min(map(torch.Tensor.numel, self.tensors)) > 0


class Mamba2Mixer(nn.Module):
    def __init__(self, config: MoMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.use_fast_path = config.use_fast_path
        self.d_inner, self.d_state = config.d_inner, config.d_state
        self.headdim, self.ngroups, self.nheads = config.headdim, config.ngroups, config.nheads
        self.chunk_size = config.chunk_size
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state  # x, B, C go through the conv

        def linear(name: str, in_f: int, out_f: int) -> nn.Module:
            if name in config.decouple:
                return RoutedLinear(config.modalities, in_f, out_f, config.bias)
            return nn.Linear(in_f, out_f, bias=config.bias)

        h, c = self.nheads, self.conv_dim
        self.in_proj = linear("in_proj", config.d_model, self.d_inner + c + h)  # [z, x, B, C, dt]
        self.conv1d = CausalConv1d(c, c, config.d_conv, groups=c, padding=config.d_conv - 1, bias=config.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(h))  # softplus^-1 of Δ in [dt_min, dt_max], init in _init_weights
        self.A_log = nn.Parameter(torch.empty(h))  # A = -exp(A_log), one scalar per head
        self.D = nn.Parameter(torch.empty(h))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, config.norm_epsilon)
        self.out_proj = linear("out_proj", self.d_inner, config.d_model)
        for p in (self.dt_bias, self.A_log, self.D):  # excluded from weight decay (mom.train.optim)
            p._no_weight_decay = True
        self._fast_path_weights: registrations.Cached[FastPathWeights | None] = registrations.Cached()
        self._kernel_weights: registrations.Cached[tuple[nn.Parameter, ...]] = registrations.Cached()

    def forward(
        self,
        hidden: torch.Tensor,
        routing: Routing,
        cache: MoMCache | None = None,
        mask: torch.Tensor | None = None,
        doc_start: torch.Tensor | None = None,
        sorted_tokens: bool = False,
    ) -> torch.Tensor:
        """hidden: (b, l, d_model) -> (b, l, d_model), as `mom.model.mixer.MoMMixer.forward`: ``cache`` written (a
        prefill) or continued, ``mask`` (b, l) zeroes left padding, ``doc_start`` (b, l) restarts the conv window and
        the state. ``sorted_tokens``: hidden's b * l rows and the output's are in the routing's sorted order (a sorted
        residual stream, fast path only: the model decides, `mom.model.mixer.sorted_stream`); ``mask`` and
        ``doc_start`` stay in sequence order."""
        if cache is not None and cache.seqlen_offset > 0:
            if sorted_tokens:
                raise ValueError("Mamba2Mixer continues a cache on rows in sequence order (sorted_tokens=False)")
            return self._continue(hidden, routing, cache)
        weights = None
        if sorted_tokens or self.fast_path_applies(hidden):
            weights = self.fast_path_weights()
            if weights is None:
                raise ValueError("the Mamba-2 fast path needs plain nn.Linear experts with their weights present; "
                                 "wrapped (LoRA) or ZeRO-3-partitioned ones take the module path")
        if mask is not None:
            if sorted_tokens:
                raise ValueError("Mamba2Mixer: a padding mask is in sequence order; the rows are sorted")
            hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        zxbcdt = self._in_proj(hidden, routing, weights, sorted_tokens)  # (b, l, d_inner + conv_dim + nheads)
        if cache is None and mask is None and self.fused_applies(zxbcdt):
            A = -torch.exp(self.A_log.float())  # (h,)
            y = ssd.split_conv1d_scan(zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, A,
                                      self.D, self.chunk_size, self.headdim, self.ngroups, self.norm.weight,
                                      self.norm.eps, doc_start)  # (b, l, d_inner), gated norm applied
        else:
            y = self._conv_scan_norm(zxbcdt, cache, mask, doc_start)
        return self._out_proj(y, routing, weights, sorted_tokens)

    def _in_proj(self, hidden: torch.Tensor, routing: Routing, weights: FastPathWeights | None,
                 sorted_tokens: bool) -> torch.Tensor:
        """in_proj: hidden (b, l, d_model), sorted rows if ``sorted_tokens`` -> (b, l, d_inner + conv_dim + nheads) in
        sequence order. On the fast path (``weights``), a routed one is one grouped GEMM writing sequence order."""
        if weights is None:
            return project(self.in_proj, hidden, routing)
        if weights.in_proj is not None:
            experts = weights.in_proj
            return routed_linear(hidden, experts.weights, experts.biases, routing.routes(compute_dtype(hidden)),
                                 x_sorted=sorted_tokens)
        if sorted_tokens:  # a shared in_proj: its input (the narrower side) to sequence order
            hidden = _permute(hidden, routing.inv_perm, routing.perm)
        return self.in_proj(hidden)

    def _out_proj(self, y: torch.Tensor, routing: Routing, weights: FastPathWeights | None,
                  sorted_tokens: bool) -> torch.Tensor:
        """out_proj: y (b, l, d_inner) in sequence order -> (b, l, d_model), sorted rows if ``sorted_tokens``. On the
        fast path (``weights``), a routed one is one grouped GEMM reading its rows in sorted order."""
        if weights is None:
            return project(self.out_proj, y, routing)
        if weights.out_proj is not None:
            experts = weights.out_proj
            return routed_linear(y, experts.weights, experts.biases, routing.routes(compute_dtype(y)),
                                 out_sorted=sorted_tokens)
        out = self.out_proj(y)
        return _permute(out, routing.perm, routing.inv_perm) if sorted_tokens else out  # the narrower side

    def _conv_scan_norm(self, zxbcdt: torch.Tensor, cache: MoMCache | None, mask: torch.Tensor | None,
                        doc_start: torch.Tensor | None) -> torch.Tensor:
        """The module path between the projections: zxbcdt (b, l, d_inner + conv_dim + nheads) -> the gated, normed
        SSD output (b, l, d_inner), writing ``cache``'s conv window and state (a prefill)."""
        l = zxbcdt.shape[1]
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = xBC.transpose(1, 2)  # (b, c, l)
        if cache is not None:  # keep the last w inputs for the recurrent conv
            w = self.conv1d.kernel_size[0]
            cache.conv_states[self.layer_idx].copy_(F.pad(xBC, (w - l, 0)) if l < w else xBC[..., -w:])
        xBC = self.conv1d(xBC.contiguous(), doc_start).transpose(1, 2)  # (b, l, c)
        if mask is not None:
            xBC = xBC * mask.unsqueeze(-1).to(xBC.dtype)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())  # (h,)
        result = ssd.ssd_scan(
            x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
            B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
            self.chunk_size, D=self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True, reset=doc_start,
            return_final_state=cache is not None,
        )
        if cache is not None:
            y, last_state = result
            cache.ssm_states[self.layer_idx].copy_(last_state)
        else:
            y = result
        return self.norm(y.flatten(-2), z)  # (b, l, d_inner)

    def fused_applies(self, t: torch.Tensor) -> bool:
        """Whether a forward without cache or padding runs mamba-ssm's fused conv + scan + gated norm on ``t``'s
        device (``use_fast_path``, CUDA, mamba-ssm and causal-conv1d present, and the conv's and the norm's weights,
        which it reads without calling their modules, present: not ZeRO-3's empty ones)."""
        kernels = backend.mamba2_kernels(t)
        if not (self.use_fast_path and kernels is not None and kernels.split_conv1d_scan is not None):
            return False
        return min(map(torch.Tensor.numel, self._kernel_tensors())) > 0

    def _kernel_tensors(self) -> tuple[nn.Parameter, ...]:
        """The conv's and the norm's weights, which the fused kernel reads without calling their modules: read once
        (`quiet_parameter`), until a module or parameter is reassigned."""
        return self._kernel_weights.get(lambda: tuple(quiet_parameter(m, "weight") for m in (self.conv1d, self.norm)))

    def fast_path_weights(self) -> FastPathWeights | None:
        """What the fast path reads (`FastPathWeights`), or None when it cannot run this mixer: an expert that is not
        a plain ``nn.Linear`` (a LoRA-wrapped one must be called as a module), experts with and without biases, or a
        tensor that is absent (ZeRO-3). Gathered once and reused until a module or parameter is assigned anywhere
        (`mom.model.registrations`), as `mom.model.mixer.MoMMixer.fast_path_weights`; only their presence is read
        again."""
        weights = self._fast_path_weights.get(self._gather_fast_path_weights)
        return weights if weights is not None and weights.present() else None

    def _gather_fast_path_weights(self) -> FastPathWeights | None:
        routed, tensors = [], list(self._kernel_tensors())
        for proj in (self.in_proj, self.out_proj):
            if not isinstance(proj, RoutedLinear):
                routed.append(None)
                continue
            experts = tuple(proj.values())
            if any(type(e) is not nn.Linear for e in experts):
                return None
            weights = tuple(quiet_parameter(e, "weight") for e in experts)
            biases = tuple(quiet_parameter(e, "bias") for e in experts)
            if any(b is None for b in biases) and any(b is not None for b in biases):
                return None  # some experts with a bias, some without: the Function stacks them
            biases = None if biases[0] is None else biases
            routed.append(Experts(weights, biases))
            tensors += [*weights, *(biases or ())]
        return FastPathWeights(routed[0], routed[1], tuple(tensors))

    def directly_read_parameters(self) -> list[nn.Parameter]:
        """The parameters of this mixer's submodules (experts, conv, norm) that its fast path may read without
        calling their modules; as `mom.model.mixer.MoMMixer.directly_read_parameters`."""
        return submodule_parameters(self)

    def fast_path_applies(self, hidden: torch.Tensor) -> bool:
        """Whether a forward on ``hidden`` takes the fast path (its routed projections through
        `mom.ops.routed_linear`; with no cache or padding, mamba-ssm's fused kernel between them): `fused_applies`
        and `fast_path_weights` has this mixer's tensors; as `mom.model.mixer.MoMMixer.fast_path_applies`, it reads
        and writes rows in sequence or sorted order."""
        return self.fused_applies(hidden) and self.fast_path_weights() is not None

    def routes_rows(self) -> bool:
        """Whether in_proj or out_proj routes (a sorted residual stream spares their permutations)."""
        return isinstance(self.in_proj, RoutedLinear) or isinstance(self.out_proj, RoutedLinear)

    def step(self, hidden: torch.Tensor, routing: Routing, cache: MoMCache) -> torch.Tensor:
        """One recurrent step. hidden: (b, 1, d_model) -> (b, 1, d_model); updates ``cache`` in place. Sync-free as
        `mom.model.mixer.MoMMixer.step` (experts picked on the device), so a CUDA graph can capture it."""
        b = hidden.shape[0]
        zxbcdt = project_rows(self.in_proj, hidden[:, 0], routing)  # (b, d_inner + conv_dim + nheads)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = self.conv1d(xBC, conv_state=cache.conv_states[self.layer_idx])  # (b, c)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())  # (h,)
        y = ssd.ssd_state_update(
            cache.ssm_states[self.layer_idx], x.reshape(b, self.nheads, self.headdim), dt, A,
            B.reshape(b, self.ngroups, self.d_state), C.reshape(b, self.ngroups, self.d_state), self.D.float(),
            self.dt_bias.float(), dt_softplus=True,
        )  # (b, h, p)
        y = self.norm(y.reshape(b, self.d_inner), z)
        return project_rows(self.out_proj, y, routing).unsqueeze(1)

    def _continue(self, hidden: torch.Tensor, routing: Routing, cache: MoMCache) -> torch.Tensor:
        """Several new tokens after a cached prefix: run them through the recurrent step one by one."""
        if hidden.shape[1] == 1:
            return self.step(hidden, routing, cache)
        outs = [self.step(hidden[:, t : t + 1], routing.at(t), cache) for t in range(hidden.shape[1])]
        return torch.cat(outs, dim=1)


def _permute(x: torch.Tensor, perm: torch.Tensor, inv_perm: torch.Tensor) -> torch.Tensor:
    """x (b, l, f) viewed as b * l rows -> rows[perm] (b, l, f) (`mom.model.routing.permute_rows`)."""
    return permute_rows(x.reshape(-1, x.shape[-1]), perm, inv_perm).view(x.shape)
