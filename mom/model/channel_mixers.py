"""Channel-mixing sublayers: SiMBA's EinFFT and MambaMixer's selective channel mixer, per modality under MoM.

With ``config.channel_mixer`` set, every block runs a second, token-wise sublayer after its sequence mixer (pre-norm
and residual, like a transformer's MLP; `mom.model.modeling.MoMBlock`). Both mix the channels of one token only, so
they need no cache: a decode step calls them on its one token.

``einfft`` (SiMBA, Patro & Agneeswaran 2024, arXiv 2403.15360): per token h (d,)::

    X = FFT(h)                                   # over the channels, orthonormal, d complex bins
    X = X.view(blocks, d / blocks)               # block-diagonal weights: one (d/blocks)^2 complex matrix per block
    H = ReLU(Re(X W1 + b1)) + i ReLU(Im(X W1 + b1))   # Einstein matrix multiplication, ReLU on both parts
    Y = softshrink(H W2 + b2, λ)                 # on the real and imaginary parts: sparsity in frequency
    y = Re(IFFT(Y))

``selective`` (MambaMixer, Behrouz et al. 2024, arXiv 2403.19888): a selective SSM (S6) scans the channels. The paper
transposes the input and scans the channel axis with features taken across all tokens, which would let a causal
language model see future tokens; here each token's channels are scanned on their own: h (d,) is ``channel_groups``
positions of ``g = d / channel_groups`` channels, and Mamba's S6 runs over those positions, in both directions (the
paper's bidirectional S6, the channels having no causal order)::

    x, z   = channel_in_proj(h_c)                    # per position c: (2g,)
    x      = silu(x)
    Δr,B,C = channel_x_proj(x);  Δ = softplus(channel_dt_proj(Δr))
    y      = scan→(x, Δ, A, B, C) + scan←(x, Δ, A, B, C) + D x    # over the positions; A (g, n), D (g,)
    out    = channel_out_proj(y * silu(z))

No convolution along the channel positions (the paper's S6 blocks have one): a token's channel groups have no
locality a short convolution would exploit.

Per modality: whenever ``config.decouple`` is non-empty (a MoM), EinFFT holds one set of complex weights per
modality and the selective mixer's four projections are `RoutedLinear` experts; its ``A_log`` and ``D`` are shared,
as the sequence mixer's are. ``decouple: []`` (the dense twin) has one shared channel mixer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import initialization as init

from mom.model.config import MoMConfig
from mom.model.routing import RoutedLinear, Routing, permute_rows, project, project_rows
from mom.ops import backend

CHANNEL_PROJECTIONS = ("channel_in_proj", "channel_x_proj", "channel_dt_proj", "channel_out_proj")
EINFFT_INIT_STD = 0.02  # SiMBA initialises its complex weights and biases as 0.02 * N(0, 1)


def channel_mixer_decoupled(config: MoMConfig) -> bool:
    """Whether the channel mixer has per-modality weights: in every MoM (``decouple`` non-empty), never in a dense
    model."""
    return bool(config.decouple)


def channel_dt_rank(config: MoMConfig) -> int:
    """Rank of the selective channel mixer's Δ projection: ``ceil(g / 16)`` for ``g`` channels per position, Mamba's
    ``"auto"`` rule."""
    return math.ceil(config.d_model // config.channel_groups / 16)


def make_channel_mixer(config: MoMConfig) -> nn.Module:
    """The channel mixer ``config.channel_mixer`` names."""
    if config.channel_mixer == "einfft":
        return EinFFT(config)
    if config.channel_mixer == "selective":
        return SelectiveChannelMixer(config)
    raise ValueError(f"channel_mixer: no channel mixer {config.channel_mixer!r}")


class EinFFT(nn.Module):
    """SiMBA's EinFFT channel mixer (see the module docstring). Parameters hold the real and imaginary parts side by
    side: ``weight1``/``weight2`` (experts, 2, blocks, d/blocks, d/blocks), ``bias1``/``bias2`` (experts, 2, blocks,
    d/blocks); one expert, or one per modality when decoupled. Runs in fp32 (torch.fft)."""

    def __init__(self, config: MoMConfig) -> None:
        super().__init__()
        self.num_experts = config.num_modalities if channel_mixer_decoupled(config) else 1
        self.blocks = config.einfft_blocks
        self.block_size = config.d_model // config.einfft_blocks
        self.shrink = float(config.einfft_shrink)
        e, k, s = self.num_experts, self.blocks, self.block_size
        self.weight1 = nn.Parameter(torch.empty(e, 2, k, s, s))
        self.bias1 = nn.Parameter(torch.empty(e, 2, k, s))
        self.weight2 = nn.Parameter(torch.empty(e, 2, k, s, s))
        self.bias2 = nn.Parameter(torch.empty(e, 2, k, s))

    def init_weights(self, config: MoMConfig) -> None:
        for p in (self.weight1, self.bias1, self.weight2, self.bias2):
            init.normal_(p, std=EINFFT_INIT_STD)

    def mix(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x (n, d) through expert ``expert`` -> (n, d), in x's dtype."""
        n, d = x.shape
        if n == 0:  # a modality absent from the batch (the FFT rejects empty input)
            return x.new_empty(0, d)
        spec = torch.fft.fft(x.float(), dim=-1, norm="ortho").view(n, self.blocks, self.block_size)  # (n, k, s)
        re, im = self._emm(spec.real, spec.imag, self.weight1[expert], self.bias1[expert])
        re, im = self._emm(F.relu(re), F.relu(im), self.weight2[expert], self.bias2[expert])
        spec = torch.complex(F.softshrink(re, self.shrink), F.softshrink(im, self.shrink)).reshape(n, d)
        return torch.fft.ifft(spec, dim=-1, norm="ortho").real.to(x.dtype)

    @staticmethod
    def _emm(re: torch.Tensor, im: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        """Complex block-diagonal product (re + i im) (W_re + i W_im) + b: (n, k, s) parts, weight (2, k, s, s)."""
        w_re, w_im = weight.float()
        b_re, b_im = bias.float()
        out_re = torch.einsum("nki,kio->nko", re, w_re) - torch.einsum("nki,kio->nko", im, w_im) + b_re
        out_im = torch.einsum("nki,kio->nko", re, w_im) + torch.einsum("nki,kio->nko", im, w_re) + b_im
        return out_re, out_im

    def forward(self, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        """hidden (b, l, d) -> (b, l, d), each token through its modality's weights."""
        b, l, d = hidden.shape
        flat = hidden.reshape(b * l, d)
        if self.num_experts == 1:
            return self.mix(flat, 0).view(b, l, d)
        rows = permute_rows(flat, routing.perm, routing.inv_perm)  # sorted by modality
        out = torch.cat([self.mix(chunk, e) for e, chunk in enumerate(rows.split(routing.counts))])
        return permute_rows(out, routing.inv_perm, routing.perm).view(b, l, d)

    def step(self, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        """A decode step, hidden (b, 1, d) -> (b, 1, d). Off the CPU every expert runs on every row and each row keeps
        its own (no host sync, fixed shapes: a CUDA graph can capture it), as `mom.model.routing.project_rows`."""
        if self.num_experts == 1 or hidden.device.type == "cpu":
            return self(hidden, routing)
        flat = hidden[:, 0]
        ys = torch.stack([self.mix(flat, e) for e in range(self.num_experts)], dim=1)  # (b, experts, d)
        pick = routing.expert_ids.view(-1, 1, 1).expand(-1, 1, ys.shape[-1])
        return ys.gather(1, pick)


class SelectiveChannelMixer(nn.Module):
    """MambaMixer's selective channel mixer, per token (see the module docstring)."""

    def __init__(self, config: MoMConfig) -> None:
        super().__init__()
        self.groups = config.channel_groups
        g, n, r = config.d_model // config.channel_groups, config.channel_d_state, channel_dt_rank(config)
        self.width, self.d_state, self.dt_rank = g, n, r
        self.num_modalities = config.num_modalities
        self.decoupled = channel_mixer_decoupled(config)

        def linear(in_f: int, out_f: int, bias: bool) -> nn.Module:
            if self.decoupled:
                return RoutedLinear(config.modalities, in_f, out_f, bias)
            return nn.Linear(in_f, out_f, bias)

        self.channel_in_proj = linear(g, 2 * g, config.bias)
        self.channel_x_proj = linear(g, r + 2 * n, False)
        self.channel_dt_proj = linear(r, g, True)
        self.channel_out_proj = linear(g, g, config.bias)
        self.A_log = nn.Parameter(torch.empty(g, n))  # fp32, as the sequence mixer's (keep_ssm_params_fp32)
        self.D = nn.Parameter(torch.empty(g))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def init_weights(self, config: MoMConfig) -> None:
        """Mamba's initialisation at this width: S4D-real A, D = 1, Δ bias so that softplus(bias) is log-uniform in
        [dt_min, dt_max], nn.Linear's default elsewhere."""
        init.copy_(self.A_log, torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32).expand(self.width, -1)))
        init.ones_(self.D)
        for name in CHANNEL_PROJECTIONS:
            proj = getattr(self, name)
            for linear in (proj.values() if isinstance(proj, RoutedLinear) else (proj,)):
                init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                if name == "channel_dt_proj":
                    std = self.dt_rank**-0.5 * config.dt_scale
                    init.uniform_(linear.weight, -std, std)
                    log_dt = torch.rand(self.width) * (math.log(config.dt_max) - math.log(config.dt_min))
                    dt = torch.exp(log_dt + math.log(config.dt_min)).clamp(min=config.dt_init_floor)
                    init.copy_(linear.bias, dt + torch.log(-torch.expm1(-dt)))
                elif linear.bias is not None:
                    init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        """hidden (b, l, d) -> (b, l, d)."""
        b, l, d = hidden.shape
        grouped = group_routing(routing, self.groups) if self.decoupled else None  # one row per (token, position)

        def proj(module: nn.Module, x: torch.Tensor) -> torch.Tensor:  # (b*l, G, in) -> (b*l, G, out)
            return project(module, x.reshape(b, l * self.groups, -1), grouped).view(b * l, self.groups, -1)

        return self.mix(hidden.reshape(b * l, self.groups, self.width), proj).view(b, l, d)

    def step(self, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        """A decode step, hidden (b, 1, d) -> (b, 1, d); each row's experts picked as `project_rows` picks them."""
        b, _, d = hidden.shape
        ids = routing.modality_ids.reshape(b, 1).repeat_interleave(self.groups, dim=0)  # (b*G, 1)
        grouped = Routing(ids, self.num_modalities)

        def proj(module: nn.Module, x: torch.Tensor) -> torch.Tensor:  # (b, G, in) -> (b, G, out)
            return project_rows(module, x.reshape(b * self.groups, -1), grouped).view(b, self.groups, -1)

        return self.mix(hidden.reshape(b, self.groups, self.width), proj).view(b, 1, d)

    def mix(self, u: torch.Tensor, proj: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """u (tokens, G, g) -> (tokens, G, g); ``proj(module, x)`` applies a projection to (tokens, G, in) rows."""
        x, z = proj(self.channel_in_proj, u).chunk(2, dim=-1)  # (t, G, g) each
        x = F.silu(x)
        dt, B, C = torch.split(proj(self.channel_x_proj, x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = proj(self.channel_dt_proj, dt)  # (t, G, g) Δ pre-activation, its bias inside the projection
        A = -torch.exp(self.A_log.float())  # (g, n)
        y = bidirectional_scan(x, dt, A, B, C) + self.D.float() * x.float()
        return proj(self.channel_out_proj, (y * F.silu(z.float())).to(u.dtype))


def bidirectional_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor) -> torch.Tensor:
    """The selective scan over the positions, forward plus backward (no D skip, no gate): x, dt (t, G, g) (Δ before
    its softplus, in x's dtype), A (g, n), B, C (t, G, n) -> (t, G, g) fp32. Tokens are the scan's batch
    (`mom.ops.backend.selective_scan`: mamba-ssm's kernel on CUDA)."""
    u, delta = x.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous()  # (t, g, G)
    Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (t, n, G)
    forward = backend.selective_scan(u, delta, A, Bt, Ct, delta_softplus=True)
    backward = backend.selective_scan(u.flip(-1), delta.flip(-1), A, Bt.flip(-1), Ct.flip(-1),
                                      delta_softplus=True).flip(-1)
    return (forward.float() + backward.float()).transpose(1, 2)


def group_routing(routing: Routing, groups: int) -> Routing:
    """(b, l) routing -> (b, l * groups): every token's ``groups`` positions go to its modality's experts; the counts
    are the routing's times ``groups`` (read once, as the sequence mixer's experts read them)."""
    grouped = Routing(routing.modality_ids.repeat_interleave(groups, dim=1), routing.num_modalities)
    grouped.set_counts(tuple(c * groups for c in routing.counts))
    return grouped
