"""Token routing by modality, computed once per forward and shared by every layer and projection.

A MoM projection sends each token through the expert of its modality. Instead of a boolean-mask gather per
projection per modality (one host sync each), `Routing` sorts the flattened tokens by modality ONCE per forward:
every `RoutedLinear` then gathers its input with one index, runs each expert on a contiguous slice and scatters
back with the inverse permutation. The only host synchronisation is reading the per-modality counts, once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from mom import kernels

DISABLE_GROUPED_ENV = "MOM_DISABLE_GROUPED_MM"


def grouped_mm_disabled() -> bool:
    """``MOM_DISABLE_GROUPED_MM=1`` makes routed projections call each expert module (the reference routing)."""
    return os.environ.get(DISABLE_GROUPED_ENV, "0").lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class Routing:
    """Where each token goes.

    Attributes:
        perm: (n,) flat token indices sorted by modality (stable, so order within a modality is kept).
        inv_perm: (n,) inverse of ``perm``: position of each original token in the sorted order.
        counts: tokens per modality, on the host (read once when the routing is built).
        modality_ids: (b, l) the modality index of each token.
        num_modalities: number of modalities of the model (experts per routed projection).
        offsets: (num_modalities,) int32 end offset of each modality's rows in sorted order (grouped GEMM layout).
        sorted_modality: (n,) modality of each row in sorted order.
    """

    perm: torch.Tensor
    inv_perm: torch.Tensor
    counts: tuple[int, ...]
    modality_ids: torch.Tensor
    num_modalities: int
    offsets: torch.Tensor
    sorted_modality: torch.Tensor

    @classmethod
    def build(cls, modality_ids: torch.Tensor, num_modalities: int) -> Routing:
        flat = modality_ids.reshape(-1)
        perm = torch.argsort(flat, stable=True)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
        bins = torch.bincount(flat, minlength=num_modalities)
        counts = tuple(bins.tolist())  # the one host sync
        offsets = torch.cumsum(bins, 0).to(torch.int32)
        return cls(perm, inv_perm, counts, modality_ids, num_modalities, offsets, flat[perm])

    def at(self, t: int) -> Routing:
        """Routing of position ``t`` alone, (b, 1)."""
        return Routing.build(self.modality_ids[:, t : t + 1], self.num_modalities)

    @property
    def single(self) -> int | None:
        """Index of the only modality present, or None if several are."""
        present = [i for i, c in enumerate(self.counts) if c > 0]
        return present[0] if len(present) == 1 else None


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
        if routing.single is not None and not torch.is_grad_enabled():  # inference on one modality: no permutation
            return experts[routing.single](x)
        lead = x.shape[:-1]
        x_sorted = x.reshape(-1, x.shape[-1]).index_select(0, routing.perm)  # (n, in)
        dtype = self._grouped_dtype(x)
        if dtype is not None:
            y_sorted = self._grouped(x_sorted, routing, dtype)
        else:
            # Every expert runs, on an empty slice if its modality is absent, so each gets a (zero) gradient and
            # data-parallel engines see the same parameters used on every rank.
            y_sorted = torch.cat([expert(chunk) for expert, chunk in zip(experts, x_sorted.split(routing.counts))])
        return y_sorted.index_select(0, routing.inv_perm).reshape(*lead, self.out_features)

    def _grouped_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype of the grouped-GEMM fast path, or None where the per-expert module calls must run.

        The fast path reads the expert weights directly, so it only runs when every expert is a plain
        ``nn.Linear`` (no LoRA or other wrapper, whose forward must be honoured), on CUDA, in 16-bit (bf16 params
        or autocast), with the 16-element alignment ``torch._grouped_mm`` needs.
        """
        if not x.is_cuda or grouped_mm_disabled() or kernels.force_reference() or not hasattr(torch, "_grouped_mm"):
            return None
        if any(type(e) is not nn.Linear for e in self.values()):
            return None
        if self.in_features % 16 or self.out_features % 16:
            return None
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return dtype if dtype == torch.bfloat16 else None

    def _grouped(self, x_sorted: torch.Tensor, routing: Routing, dtype: torch.dtype) -> torch.Tensor:
        """One grouped GEMM over modality-sorted rows: (n, in) -> (n, out)."""
        experts = list(self.values())
        weight = torch.stack([e.weight for e in experts]).to(dtype)  # (M, out, in)
        with torch.autocast("cuda", enabled=False):
            y = torch._grouped_mm(x_sorted.to(dtype), weight.transpose(-2, -1), offs=routing.offsets)
            if experts[0].bias is not None:
                bias = torch.stack([e.bias for e in experts]).to(dtype)  # (M, out)
                y = y + bias.index_select(0, routing.sorted_modality)
        return y


def project(proj: nn.Module, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Apply a projection that is either shared (``nn.Linear``) or routed (`RoutedLinear`)."""
    if isinstance(proj, RoutedLinear):
        return proj(x, routing)
    return proj(x)

