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

On CUDA with mamba-ssm and causal-conv1d, a training forward runs the routed ``in_proj``, then mamba-ssm's fused
``mamba_split_conv1d_scan_combined`` (conv, scan and gated norm in one autograd Function; document resets through
its ``seq_idx``), then the routed ``out_proj``; everything else (CPU, caches, padding) runs the module path below with
`mom.ops.ssd`'s dispatch. The Mamba-1 fast path (`mom.ops.fused`) does not apply: `fast_path_applies` is False.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom.model.cache import MoMCache
from mom.model.config import MoMConfig
from mom.model.mixer import CausalConv1d
from mom.model.routing import RoutedLinear, Routing, project, project_rows
from mom.ops import backend, ssd


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
        the state. ``sorted_tokens`` must be False (`mom.model.mixer.sorted_stream` never sorts for this mixer)."""
        if sorted_tokens:
            raise ValueError("Mamba2Mixer reads the residual stream in sequence order (sorted_tokens=False)")
        if cache is not None and cache.seqlen_offset > 0:
            return self._continue(hidden, routing, cache)
        if mask is not None:
            hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        zxbcdt = project(self.in_proj, hidden, routing)  # (b, l, d_inner + conv_dim + nheads)
        A = -torch.exp(self.A_log.float())  # (h,)
        if cache is None and mask is None and self.fused_applies(zxbcdt):
            y = ssd.split_conv1d_scan(zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, A,
                                      self.D, self.chunk_size, self.headdim, self.ngroups, self.norm.weight,
                                      self.norm.eps, doc_start)  # (b, l, d_inner), gated norm applied
            return project(self.out_proj, y, routing)
        b, l, _ = hidden.shape
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = xBC.transpose(1, 2)  # (b, c, l)
        if cache is not None:  # keep the last w inputs for the recurrent conv
            w = self.conv1d.kernel_size[0]
            cache.conv_states[self.layer_idx].copy_(F.pad(xBC, (w - l, 0)) if l < w else xBC[..., -w:])
        xBC = self.conv1d(xBC.contiguous(), doc_start).transpose(1, 2)  # (b, l, c)
        if mask is not None:
            xBC = xBC * mask.unsqueeze(-1).to(xBC.dtype)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
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
        y = self.norm(y.flatten(-2), z)  # (b, l, d_inner)
        return project(self.out_proj, y, routing)

    def fused_applies(self, t: torch.Tensor) -> bool:
        """Whether a forward without cache or padding runs mamba-ssm's fused conv + scan + gated norm on ``t``'s
        device (``use_fast_path``, CUDA, mamba-ssm and causal-conv1d present)."""
        kernels = backend.mamba2_kernels(t)
        return self.use_fast_path and kernels is not None and kernels.split_conv1d_scan is not None

    def fast_path_applies(self, hidden: torch.Tensor) -> bool:
        """False: the Mamba-1 fused Function (`mom.ops.fused`) does not compute this mixer (see `fused_applies`)."""
        return False

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
