"""Token routing by modality, computed once per forward and shared by every layer and projection.

A MoM projection sends each token through the expert of its modality. Instead of a boolean-mask gather per
projection per modality (one host sync each), `Routing` sorts the flattened tokens by modality ONCE per forward:
every `RoutedLinear` then gathers its input with one index, runs each expert on a contiguous slice and scatters
back with the inverse permutation. The only host synchronisation is reading the per-modality counts (`counts`), once,
where a path first needs them: the module path does, the fused path (`routes`) does not (its GEMMs group the sorted
tokens by the blocks' ends on the device, `offsets`) and uses them where they are known (given by the caller, or read
meanwhile, as the model's deferred input checks read them after the forward).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn as nn

from mom.ops.fused import Routes
from mom.ops.grouped import HostCounts
from mom.ops.triton import routed_rows


@dataclass(frozen=True)
class Routing:
    """Where each token goes.

    Attributes:
        modality_ids: (b, l) the modality index of each token.
        num_modalities: number of modalities of the model (experts per routed projection).

    Everything else is derived on first use and cached, so each path pays only for what it reads: the module path
    the permutation and counts, the fused path its `routes` (also the one-hot).
    """

    modality_ids: torch.Tensor
    num_modalities: int

    @classmethod
    def build(cls, modality_ids: torch.Tensor, num_modalities: int) -> Routing:
        return cls(modality_ids, num_modalities)

    @cached_property
    def perm(self) -> torch.Tensor:
        """(n,) flat token indices sorted by modality (stable, so order within a modality is kept), by each token's
        expert id (`expert_ids`: a modality id out of range, which the model's checks reject, still leaves a
        permutation): the inverse of ``inv_perm``, one scatter."""
        inv = self.inv_perm
        return torch.empty_like(inv).scatter_(0, inv, _positions(inv.numel(), inv.device))

    @cached_property
    def inv_perm(self) -> torch.Tensor:
        """(n,) each token's position in the sorted order: the stable partition by expert, without a sort. A cumsum
        over the one-hot read row by row (`is_modality`, flattened) counts, at (m, i), the tokens of every expert
        before m plus those of m up to token i: token i's place, less one, in its own expert's row. Fewer launches
        and less device time than CUDA's radix sort, which makes a pass per byte of its keys; a prefill's prelude
        is bound by its launches (docs/performance.md)."""
        onehot = self.is_modality  # (M, n)
        places = onehot.view(-1).cumsum(0).view(onehot.shape)  # (M, n) int64
        return places.gather(0, self.expert_ids[None]).squeeze(0).sub_(1)

    @cached_property
    def is_modality(self) -> torch.Tensor:
        """(num_modalities, n) bool, row m marks the tokens of expert m (`expert_ids`: a modality id out of range
        counts in the expert it is clamped to; the model's checks reject it). A comparison with ``arange``: unlike
        ``bincount`` and ``one_hot``, which read the ids' range on the host, it does not synchronise."""
        return self.expert_ids[None, :] == _modality_column(self.num_modalities, self.expert_ids.device)

    @cached_property
    def device_counts(self) -> torch.Tensor:
        """(num_modalities,) tokens per modality, on the device (no host sync)."""
        return self.is_modality.sum(1)

    @cached_property
    def offsets(self) -> torch.Tensor:
        """(num_modalities,) int32 on the device: where each modality's block of the sorted tokens ends (the group
        offsets of ``torch._grouped_mm``), computed there: no host sync."""
        return self.device_counts.cumsum(0, dtype=torch.int32)  # one op (its cast inside: no second dispatch)

    @cached_property
    def expert_ids(self) -> torch.Tensor:
        """(n,) each token's expert: its modality id, clamped into ``[0, num_modalities)`` so that it can index
        before the model's deferred input checks have run (`mom.model.inputs.validate_and_route`)."""
        return self.modality_ids.reshape(-1).clamp(0, self.num_modalities - 1)

    @cached_property
    def host_counts(self) -> HostCounts:
        """Tokens per modality on the host once known (`mom.ops.grouped.HostCounts`), shared with the fused path's
        `routes`: given (`set_counts`), or read from the device the first time a path needs them (by its ``reader``:
        ``device_counts``, or the model's deferred input checks, which read them in their own sync)."""
        return HostCounts(self.device_counts.tolist)

    @property
    def counts(self) -> tuple[int, ...]:
        """Tokens per modality, on the host (one host sync, the first time, unless `set_counts` gave them)."""
        return self.host_counts.read()

    def set_counts(self, counts: tuple[int, ...]) -> None:
        """Give the counts read by a caller's own host sync (``device_counts``), so that none is added."""
        if len(counts) != self.num_modalities or sum(counts) != self.modality_ids.numel():
            raise ValueError(f"counts {counts} do not match {self.num_modalities} modalities and "
                             f"{self.modality_ids.numel()} tokens")
        self.host_counts.set(counts)

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """(start, end) of each modality's block of the sorted tokens (reads `counts`)."""
        return self.host_counts.blocks(read=True)

    @cached_property
    def _routes(self) -> dict[torch.dtype, Routes]:
        return {}

    def routes(self, dtype: torch.dtype) -> Routes:
        """The routing as the fused mixer reads it (`mom.ops.fused.Routes`), its one-hot of each token's modality in
        ``dtype`` (the Function's compute dtype); built once per dtype and shared by all layers. Reads nothing from
        the device: the counts go with it as `host_counts`, known or not."""
        if dtype not in self._routes:
            self._routes[dtype] = Routes(perm=self.perm, inv_perm=self.inv_perm, offsets=self.offsets,
                                         counts=self.host_counts, expert_ids=self.expert_ids,
                                         onehot=self.is_modality.to(dtype))
        return self._routes[dtype]

    @cached_property
    def _last_tokens(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {}

    def last_tokens(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's last ``k`` tokens, row by row: their flat indices in sequence order (b * k,) int64 and their
        positions in the sorted order (``inv_perm`` at them); built once per k and shared by the block and the mixer
        that read them (`mom.model.modeling.MoMModel`'s ``keep_last``)."""
        if k not in self._last_tokens:
            b, l = self.modality_ids.shape
            device = self.modality_ids.device
            if k == 1:  # generate()'s prefill: one launch
                tokens = torch.arange(l - 1, b * l, l, device=device)
            else:
                tokens = (torch.arange(0, b * l, l, device=device)[:, None] + torch.arange(l - k, l, device=device))
                tokens = tokens.view(-1)
            self._last_tokens[k] = tokens, self.inv_perm.index_select(0, tokens)
        return self._last_tokens[k]

    def at(self, t: int) -> Routing:
        """Routing of position ``t`` alone, (b, 1)."""
        return Routing.build(self.modality_ids[:, t : t + 1], self.num_modalities)


@functools.lru_cache(maxsize=16)
def _positions(n: int, device: torch.device) -> torch.Tensor:
    """(n,) 0, 1, ... n - 1 on the device, made once per token count (the shapes of training steps repeat)."""
    return torch.arange(n, device=device)


@functools.cache
def _modality_column(num_modalities: int, device: torch.device) -> torch.Tensor:
    """(num_modalities, 1): 0, 1, ... on the device, made once (not a launch at every forward)."""
    return torch.arange(num_modalities, device=device)[:, None]


class _PermuteRows(torch.autograd.Function):
    """rows -> rows[perm]. The gradient of a permutation is the inverse permutation: a gather again, instead of
    the scatter-add that ``index_select``'s backward runs (much slower on CPU, atomics on GPU: docs/performance.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inv_perm: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv_perm)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inv_perm,) = ctx.saved_tensors
        return grad.index_select(0, inv_perm), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inv_perm: torch.Tensor) -> torch.Tensor:
    """x: (n, f) -> x[perm]; ``inv_perm`` must be the inverse permutation (used by the backward)."""
    return _PermuteRows.apply(x, perm, inv_perm)


class RoutedLinear(nn.ModuleDict):
    """One ``nn.Linear`` expert per modality, addressable by name (``in_proj.text``, ``in_proj.image``...).

    Experts are plain ``nn.Linear`` children so that ``peft`` can wrap them with LoRA by module name.
    """

    def __init__(self, modalities: tuple[str, ...], in_features: int, out_features: int, bias: bool) -> None:
        super().__init__({m: nn.Linear(in_features, out_features, bias=bias) for m in modalities})
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: (b, l, in) -> (b, l, out), each token through its modality's expert."""
        experts = list(self.values())
        lead = x.shape[:-1]
        x_sorted = permute_rows(x.reshape(-1, x.shape[-1]), routing.perm, routing.inv_perm)  # (n, in)
        # Every expert runs, on an empty slice if its modality is absent, so each gets a (zero) gradient and every
        # data-parallel rank calls the same modules (ZeRO-3 gathers a module's weights when it is called, in step
        # across ranks). Experts are called as modules, so LoRA adapters and other wrappers are honoured.
        y_sorted = torch.cat([expert(chunk) for expert, chunk in zip(experts, x_sorted.split(routing.counts))])
        return permute_rows(y_sorted, routing.inv_perm, routing.perm).reshape(*lead, self.out_features)


def project(proj: nn.Module, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Apply a projection that is either shared (``nn.Linear``) or routed (`RoutedLinear`)."""
    if isinstance(proj, RoutedLinear):
        return proj(x, routing)
    return proj(x)


def plain_experts(proj: nn.Module) -> list[nn.Linear] | None:
    """The experts of a routed projection (or a shared one's linear) when every one is a plain ``nn.Linear``, whose
    weights a decode kernel may read directly; None when one is wrapped (LoRA) or of another type: called as modules."""
    experts = list(proj.values()) if isinstance(proj, RoutedLinear) else [proj]
    return experts if all(type(e) is nn.Linear for e in experts) else None


def project_rows(
    proj: nn.Module, x: torch.Tensor, routing: Routing, pick_on_device: bool | None = None
) -> torch.Tensor:
    """A decode step's projection, one token per row: x (b, in) -> (b, out), row i through the expert of its modality
    (``routing`` of shape (b, 1)) if ``proj`` is a `RoutedLinear` (a shared ``nn.Linear`` ignores it).

    ``pick_on_device`` (default: on any device but the CPU): every expert runs on every row and each row keeps its own
    expert's output, picked on the device: no host sync and the same shapes whatever the rows' modalities (so a CUDA
    graph replays it); each weight is read once, as a memory-bound one-token GEMM reads it anyway. Plain ``nn.Linear``
    experts whose weights are in place on a CUDA device take one Triton kernel for all experts
    (`mom.ops.triton.routed_rows`); other experts (LoRA-wrapped, offloaded, partitioned) are called as modules, so
    adapters (merged or not) and offload hooks are honoured. On the CPU, where reading the per-modality counts costs
    no wait, the routed module path runs each expert on its rows only (M times fewer FLOPs: faster there, measured).
    A row's output is its own expert's, the others' (even non-finite ones) are discarded.
    """
    if not isinstance(proj, RoutedLinear):
        return proj(x)
    if pick_on_device is None:
        pick_on_device = x.device.type != "cpu"
    if not pick_on_device:
        return proj(x.unsqueeze(1), routing)[:, 0]
    experts = list(proj.values())
    if plain_experts(proj) is not None:  # plain experts: one kernel on CUDA (`mom.ops.triton.routed_rows`)
        weights, biases = [e.weight for e in experts], [e.bias for e in experts]
        uniform_bias = all(b is None for b in biases) or all(b is not None for b in biases)
        if uniform_bias and routed_rows.kernel_applies(x, weights):
            return routed_rows.routed_rows_linear(x, weights, None if biases[0] is None else biases,
                                                  routing.expert_ids, use_kernel=True)
    ys = torch.stack([expert(x) for expert in experts], dim=1)  # (b, M, out)
    pick = routing.expert_ids.view(-1, 1, 1).expand(-1, 1, ys.shape[-1])  # (b, 1, out)
    return ys.gather(1, pick).squeeze(1)
