"""The fast path of `MoMMixer`: one autograd Function over the whole mixer, in the scan's layout.

Same maths as the mixer's module path (`MoMMixer.forward`, which stays the reference it is tested against), organised
the way mamba-ssm's ``mamba_inner_fn`` organises a dense Mamba. It takes tensors, never modules: the mixer decides
when this path applies and gathers its parameters (`MixerWeights`); the model's routing gives where each token goes
(`Routes`).

* The conv and the scan read activations **feature-major**: a ``(f, n)`` matrix with ``n = b * l`` tokens in
  sequence order, viewed as ``(b, f, l)`` with strides ``(l, n, 1)``. A shared projection is one GEMM ``W @ X`` on
  it, so no activation is transposed by a copy (the module path's transposing copies were a large share of its GPU
  time: docs/performance.md).
* Routed in_proj and out_proj run on token-major ``(n, f)`` rows sorted by modality (`Routes.perm`: the permutation
  is built once per model forward): ONE ``torch._grouped_mm`` per GEMM gives each expert's block of rows its weight
  (group ends on the device, `Routes.offsets`). Where the tokens per expert are known on the host (`HostCounts`),
  large GEMMs (`mom.ops.grouped.PER_EXPERT_MACS`) run one cuBLAS GEMM per expert instead (faster there, measured),
  and so do the weight gradients, written in fp32 by cuBLAS (``torch._grouped_mm`` would write bf16 and need a
  cast, slower: docs/performance.md), and the input gradient of an fp32 input (no cast kernel after the Function).
  Where they are not known, nothing waits to read them: every routed GEMM is grouped on the device's offsets, the
  weight gradients too (grouped along the tokens), in bf16 then cast (`mom.ops.grouped`). One gather that also
  transposes
  (`mom.ops.triton.gather.gather_rows_t` / `gather_cols_t`) crosses between the two layouts.
* x_proj and dt_proj are small (a few percent of the projections' FLOPs), so they route without any gather of a
  (d_inner, n) matrix: x_proj runs every expert on every token in ONE GEMM with the experts' weights stacked;
  dt_proj's input is expanded to ``(M * r + M, n)``, token ``t``'s Δ-rank features (from its own x_proj expert) in
  the block of its modality and a one in the row of its modality's bias, zeros elsewhere, so that ONE GEMM with the
  experts side by side gives each token ``W_m @ dt + b_m``; B and C are each token's rows of its own expert. One
  kernel writes both from x_proj's output (`mom.ops.triton.expert_cols.split_x_proj`, reading each token's own
  expert's rows). Both are exact (the zeros add nothing) and cost ``M`` times a small GEMM.
* The scan gates its output only for a shared out_proj; a routed one's gather computes ``out * silu(z)`` on the way
  (the scan then neither reads z nor writes a second (d_inner, n) output).
* Backward recomputes the conv output and Δ instead of storing them (as ``mamba_inner_fn`` does with
  ``checkpoint_lvl=1``); stored: the in_proj input, xz, B and C, dt_proj's expanded input, the scan's output and
  checkpoints, and a routed out_proj's input (the gated output in sorted rows: recomputing it for the weight
  gradient would cost a gated gather per step; it is freed before the scan's backward, the peak, so the layer's
  peak does not grow, but a model holds one (d_inner, n) matrix more per layer until its backward). A shared
  out_proj's gated output is recomputed by the scan's backward. xz, the scan's output and the gated rows are freed
  as soon as the backward is done with them (so a retained graph cannot be differentiated twice through this
  Function: it says so), except under saved-tensor hooks (activation checkpointing, offloading), which see them as
  saved tensors. For a routed in_proj, dz and dx are two matrices (each gathered into half of in_proj's sorted
  gradient rows), so that dx is allocated only after the scan's backward. The backward runs as named steps
  (`_FusedMixer._backward`), each freeing what it was the last to read.
* Generation's prefill (a forward from a fresh recurrent state) takes the same forward: `fused_mixer`'s
  ``states_out`` receive the conv's last ``d_conv`` inputs (copied from in_proj's output, in sequence order whatever
  the rows' layout) and the scan's final state (from the scan's own checkpoints, as mamba-ssm's ``selective_scan_fn``
  returns it): no extra pass. Without gradients to compute (generation runs under ``no_grad``) the forward runs
  outside autograd, saving nothing for a backward; with a routed in_proj the conv reads x straight from in_proj's
  sorted rows (`mom.ops.triton.conv_rows.conv_rows_t`: one pass for the gather into sequence order and the conv,
  writing the conv window too), and with a routed out_proj z stays in those rows, which are the order of out_proj's
  input, and the gated gather reads it there (`mom.ops.triton.gather.gather_cols_t`'s ``gate_rows``): nothing of
  in_proj's output is gathered into sequence order. A routed in_proj / out_proj that runs per expert on weights
  already in the compute dtype (bf16 weights in generation) reads the experts' own weights there (`_own_weights`):
  the weight cast copies none of them.
* Few launches and little host time per launch: a whole LM step can be bound by the host (docs/performance.md), so
  routed GEMMs below `mom.ops.grouped.PER_EXPERT_MACS` are grouped, the Triton kernels go through their compiled
  launcher (`mom.ops.triton.launcher`), the mixer gathers its `MixerWeights` once and reuses them,
  ``A = -exp(A_log)`` is computed for all of a model's layers in two launches (`negative_exp`, given as ``A``;
  else inside the Function) and its gradient inside the Function, every expert weight is cast in one kernel (but
  those a forward without backward reads as they are, `_own_weights`) (`_cast_params`, `mom.ops.triton.flatcast`:
  the experts of a projection become stacked views of the one buffer,
  and dt_proj's experts and biases its expanded GEMM's matrix), dt_proj's expanded input is built once per forward
  (`Routes.dt_input`), each projection's weight gradients are written stacked in the parameters' dtype by cuBLAS,
  and constants are cached.

The Function runs ops on the conv and the scan (`mom.ops.scan_ops.ScanOps`): mamba-ssm's and causal-conv1d's CUDA
kernels (`scan_ops.cuda_ops`), or the pure-PyTorch ones (`scan_ops.REFERENCE_OPS`, any device), so that its routing,
layouts and backward are tested on CPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from mom.ops import grouped, scan_ops
from mom.ops.grouped import HostCounts
from mom.ops.projections import Projection
from mom.ops.triton.conv_rows import conv_rows_t, write_window
from mom.ops.triton.expert_cols import route_cols, split_x_proj
from mom.ops.triton.flatcast import Place, flat_cast
from mom.ops.triton.gather import gather_cols_t, gather_rows_t
from mom.utils.errors import MissingDependencyError


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the Function's GEMMs run in for this input: autocast's, else the input's."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype


# ---- what the Function reads: plain data, tensors gathered by the mixer and the model -------------------------------
@dataclass(frozen=True, eq=False)
class MixerWeights:
    """A mixer's parameters as `fused_mixer` reads them; the mixer gathers them from its modules.

    ``weights[p]``, ``biases[p]``: projection ``p``'s (a `Projection`) experts, one if the projection is shared, one
    per modality (in modality order) if it is routed; weights (out, in), biases (out,), ``biases[p]`` None without.
    """

    weights: tuple[tuple[torch.Tensor, ...], ...]
    biases: tuple[tuple[torch.Tensor, ...] | None, ...]
    conv_weight: torch.Tensor  # (d_inner, 1, d_conv)
    conv_bias: torch.Tensor | None  # (d_inner,)
    A_log: torch.Tensor  # (d_inner, d_state)
    D: torch.Tensor  # (d_inner,)

    def __post_init__(self) -> None:
        if len(self.weights) != len(Projection) or len(self.biases) != len(Projection):
            raise ValueError(f"MixerWeights: one tuple of weights and one of biases (or None) per projection "
                             f"({len(Projection)}), got {len(self.weights)} and {len(self.biases)}")
        for p in Projection:
            if not self.weights[p]:
                raise ValueError(f"MixerWeights: {p.name} has no weight")
            if self.biases[p] is not None and len(self.biases[p]) != len(self.weights[p]):
                raise ValueError(f"MixerWeights: {p.name} has {len(self.weights[p])} weights but "
                                 f"{len(self.biases[p])} biases")

    @cached_property
    def params(self) -> list[torch.Tensor]:
        """Every projection parameter, in the Function's order: per projection its experts' weights, then biases."""
        out = []
        for w, b in zip(self.weights, self.biases):
            out += list(w) + (list(b) if b is not None else [])
        return out

    @cached_property
    def experts(self) -> tuple[int, ...]:
        """Experts per projection (1: shared)."""
        return tuple(len(w) for w in self.weights)

    def routed(self, p: Projection) -> bool:
        return self.experts[p] > 1

    @cached_property
    def routes_rows(self) -> bool:
        """Whether in_proj or out_proj routes: the Function then reads and writes token-major rows, in sorted order
        when asked (``sorted_tokens``), without row gathers."""
        return self.routed(Projection.in_proj) or self.routed(Projection.out_proj)

    @cached_property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """(out, in) features per projection (read when the weights are present, so not ZeRO-3's empty ones)."""
        return tuple(tuple(w[0].shape) for w in self.weights)

    @cached_property
    def has_bias(self) -> tuple[bool, ...]:
        return tuple(b is not None for b in self.biases)

    @cached_property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor: the projections' `params`, then the conv's weight (and bias), A_log and D."""
        shared = (self.conv_weight, self.conv_bias, self.A_log, self.D)
        return (*self.params, *(t for t in shared if t is not None))

    def present(self) -> bool:
        """Whether every weight holds its values: ZeRO-3 leaves a module's weights empty until the module itself is
        called, and the Function reads them without calling any module. (Read at every forward: one C call each.)"""
        return min(map(torch.Tensor.numel, self.tensors)) > 0


@dataclass(frozen=True, eq=False)
class Routes:
    """Where each of the ``n = b * l`` tokens goes, as `fused_mixer` reads it: the tokens sorted by expert (stable),
    each expert's tokens one block. ``M`` experts (modalities) per routed projection."""

    perm: torch.Tensor  # (n,) int64: the token at each sorted position
    inv_perm: torch.Tensor  # (n,) int64: each token's sorted position
    offsets: torch.Tensor  # (M,) int32 on the device: where each expert's block ends (torch._grouped_mm's groups)
    counts: HostCounts  # tokens per expert on the host, once known (the per-expert GEMMs' blocks)
    expert_ids: torch.Tensor  # (n,) int64: each token's expert
    onehot: torch.Tensor  # (M, n): one where token t goes to expert m; in `compute_dtype` it spares a cast per layer
    _dt_inputs: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # `dt_input`'s, per shape

    def __post_init__(self) -> None:
        n, M = self.perm.numel(), self.num_experts
        shapes = {"inv_perm": (self.inv_perm, (n,)), "offsets": (self.offsets, (M,)),
                  "expert_ids": (self.expert_ids, (n,)), "onehot": (self.onehot, (M, n))}
        for name, (t, want) in shapes.items():
            if tuple(t.shape) != want:
                raise ValueError(f"Routes: {name} has shape {tuple(t.shape)}, expected {want} for {n} tokens and "
                                 f"{M} experts")
        known = self.counts.known
        if known is not None and (len(known) != M or sum(known) != n):
            raise ValueError(f"Routes: the experts' counts {known} do not cover the {n} tokens of {M} experts")

    @property
    def num_experts(self) -> int:
        return self.onehot.shape[0]

    def dt_input(self, select: torch.Tensor, rank: int, k_pad: int) -> torch.Tensor:
        """dt_proj's expanded input (k_pad, n) (`_FusedMixer`) with its constant rows set: after the first
        ``len(select) * rank`` rows, which each layer writes, ``select`` (the tokens' one-hot (M, n) for a routed
        dt_proj, ones (1, n) for a shared one, in the compute dtype), then zeros. Built once per forward, shape and
        dtype, and shared by the forward's layers: a layer without backward writes its rows into it (one launch
        where building it took three), a layer with one copies it first (two)."""
        key = (select.shape[0], rank, k_pad, select.dtype)
        base = self._dt_inputs.get(key)
        if base is None:
            head = select.shape[0] * rank
            base = select.new_empty(k_pad, select.shape[1])
            base[head : head + select.shape[0]].copy_(select)
            base[head + select.shape[0] :].zero_()
            self._dt_inputs[key] = base
        return base


def fused_mixer(hidden: torch.Tensor, weights: MixerWeights, routes: Routes, ops: scan_ops.ScanOps | None = None,
                sorted_tokens: bool = False, states_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, A: torch.Tensor | None = None,
                kept: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """A MoM mixer's forward through `_FusedMixer`. hidden (b, l, d_model) -> (b, l, d_model), or (m, d_model) with
    ``kept``.

    ``ops``: `scan_ops.cuda_ops()` (default) or `scan_ops.REFERENCE_OPS` (any device; what the CPU tests use).
    ``sorted_tokens``: hidden's b * l rows, and the output's, are in the routes' sorted order (``Routes.perm``)
    instead of sequence order: a residual stream kept in that order spares the row gathers around in_proj and
    out_proj (four per layer, forward and backward) when they route.
    ``states_out``: (conv_state (b, d_inner, d_conv), ssm_state (b, d_inner, d_state)), written in place (as ``out=``)
    with the recurrent states after the l tokens, for a forward from a fresh state (generation's prefill): the conv's
    last d_conv inputs per row in sequence order (x before the conv, left-padded with zeros when l < d_conv) and the
    scan's final state. No pass of their own: the window is copied from in_proj's output, the state from what the
    scan keeps. They are not part of the autograd graph (no gradient flows through them).
    ``mask`` (b, l) bool (or 0 / 1), in sequence order whatever ``sorted_tokens``: 0 (False) marks padding, which is
    zeroed on the device where the module path zeroes it (`mom.model.mixer.MoMMixer.forward`): the input before
    in_proj, and the conv's output, the scan's input u and x_proj's (so B and C are zero there too). Padding then
    leaves nothing in the real tokens' conv window or state, gets zero input gradients and out_proj's bias as output.
    Nothing is read on the host: an all-ones mask changes nothing (each product is by exactly one), at the cost of
    three elementwise products forward and three backward, each over one activation.

    ``A`` (d_inner, d_state) fp32: ``-exp(weights.A_log)``, computed by the caller for all of a model's layers in
    two multi-tensor launches (`negative_exp`), or None: computed here (two launches a layer, three for a bf16
    A_log). Not differentiated: the Function gives A_log its gradient itself.

    Without gradients to compute (``torch.no_grad()`` or ``inference_mode``, as in ``generate()``, or nothing that
    requires grad) the forward runs outside autograd: nothing is saved for a backward, and the largest activations
    are freed before out_proj's output is allocated.

    ``kept`` (tokens, rows), each (m,) int64, without gradients only: the tokens' indices in sequence order (b * l
    numbering) and their positions in the sorted order (``routes.inv_perm`` at them). out_proj runs for these tokens
    alone and the output is their m rows, in that order (a prefill's last layer, of which only the last positions'
    output is read: `mom.model.modeling.MoMModel`). The conv, the scan and ``states_out`` are as without it.
    """
    ops = ops or scan_ops.cuda_ops()
    if ops is None:
        raise MissingDependencyError("fused_mixer: mamba-ssm and causal-conv1d do not load (pip install -e '.[cuda]'); "
                                     "pass ops=scan_ops.REFERENCE_OPS for the pure-PyTorch conv and scan")
    b, l, _ = hidden.shape
    if b * l != routes.perm.numel():
        raise ValueError(f"fused_mixer: {b} x {l} tokens but routes for {routes.perm.numel()}")
    if any(k > 1 and k != routes.num_experts for k in weights.experts):
        raise ValueError(f"fused_mixer: experts per projection {weights.experts} but routes for "
                         f"{routes.num_experts} experts")
    (_, d_inner), (_, dt_rank) = weights.shapes[Projection.x_proj], weights.shapes[Projection.dt_proj]
    d_state = weights.A_log.shape[1]
    if states_out is not None:
        _check_states_out(states_out, (b, d_inner, weights.conv_weight.shape[-1]), (b, d_inner, d_state))
    if mask is not None and tuple(mask.shape) != (b, l):
        raise ValueError(f"fused_mixer: mask has shape {tuple(mask.shape)} but hidden has (batch, length) = {(b, l)}")
    layout = _Layout(b, l, d_inner, dt_rank, d_state, weights.experts, weights.shapes, weights.has_bias,
                     routes.counts, sorted_tokens, ops)
    dtype = compute_dtype(hidden)
    onehot = routes.onehot if routes.onehot.dtype == dtype else routes.onehot.to(dtype)
    keep = None if mask is None else mask.reshape(b * l).to(hidden.device, dtype)  # (n,) 1: real token, 0: padding
    dt_sel = onehot if layout.routed(Projection.dt_proj) else _const((1, b * l), 1.0, dtype, hidden.device)
    dt_base = routes.dt_input(dt_sel, dt_rank, _k_pad(layout))
    if A is not None and (tuple(A.shape) != tuple(weights.A_log.shape) or A.dtype != torch.float32):
        raise ValueError(f"fused_mixer: A has shape {tuple(A.shape)} and dtype {A.dtype}, expected A_log's "
                         f"{tuple(weights.A_log.shape)} in float32")
    args = (hidden, routes.perm, routes.inv_perm, routes.offsets, onehot, routes.expert_ids, keep, dt_base,
            weights.conv_weight, weights.conv_bias, weights.A_log, A, weights.D.float(), layout, states_out)
    if torch.is_grad_enabled() and (hidden.requires_grad or any(t.requires_grad for t in weights.tensors)):
        if kept is not None:
            raise ValueError("fused_mixer: kept tokens are for a forward without gradients (torch.no_grad())")
        return _FusedMixer.apply(*args, *weights.params)
    # as the Function's forward runs (its dtypes are chosen here); no context to enter where autocast is off, as in a
    # prefill of bf16 weights (host time, per layer)
    with torch.autocast("cuda", enabled=False) if torch.is_autocast_enabled("cuda") else contextlib.nullcontext():
        return _FusedMixer._forward(None, dtype, *args, weights.params, kept)


def negative_exp(A_logs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``-exp(A_log)`` in fp32 for each of ``A_logs`` (a model's layers), outside autograd: two multi-tensor launches
    for all of them (and a cast for each A_log not in fp32; a model keeps them in fp32), where each layer's Function
    would take two or three of its own (a small model's forward is bound by its launches, a prefill's GPU idles
    through the host's prelude: docs/performance.md). For `fused_mixer`'s ``A``."""
    with torch.no_grad():
        A = torch._foreach_exp([a if a.dtype == torch.float32 else a.float() for a in A_logs])  # no call where fp32
        torch._foreach_neg_(A)
    return A


def _check_states_out(states_out, conv_shape: tuple[int, ...], ssm_shape: tuple[int, ...]) -> None:
    if len(states_out) != 2:
        raise ValueError(f"fused_mixer: states_out must be (conv_state, ssm_state), got {len(states_out)} tensors")
    for name, t, want in (("conv_state", states_out[0], conv_shape), ("ssm_state", states_out[1], ssm_shape)):
        if tuple(t.shape) != want:
            raise ValueError(f"fused_mixer: {name} has shape {tuple(t.shape)}, expected {want} "
                             f"(batch, d_inner, {'d_conv' if name == 'conv_state' else 'd_state'})")


# ---- the Function ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """What the Function needs beside tensors: sizes, which projections route, each expert's block of tokens."""

    batch: int
    length: int
    d_inner: int
    dt_rank: int
    d_state: int
    experts: tuple[int, ...]  # experts per Projection (1 = shared)
    shapes: tuple[tuple[int, int], ...]  # (out, in) features per Projection
    has_bias: tuple[bool, ...]  # per Projection
    counts: HostCounts  # tokens per modality on the host, once known: the per-expert GEMMs' blocks
    sorted_io: bool  # the input and output rows are in the routing's sorted order (a sorted residual stream)
    ops: scan_ops.ScanOps

    def routed(self, p: Projection) -> bool:
        return self.experts[p] > 1

    def blocks(self, p: Projection, on_device: bool) -> tuple[tuple[int, int], ...] | None:
        """Projection ``p``'s blocks of rows for a GEMM: all rows for a shared one; for a routed one each expert's
        (start, end) where known on the host, else None if the GEMM groups the rows on the device (``on_device``),
        else read (`HostCounts.read`: a host sync, once per forward)."""
        if not self.routed(p):
            return ((0, self.batch * self.length),)
        return self.counts.blocks(read=not on_device)


def _cast_params(layout: _Layout, params, dtype: torch.dtype, own: tuple[bool, ...]) -> list[tuple]:
    """The parameters in ``dtype`` -> per projection (weights (k, o, i), biases (k, o) or None), the experts stacked,
    but for dt_proj (its experts and biases side by side as one matrix, None): (d_inner, k_pad) =
    [W_0 .. W_M-1 | b_0 .. b_M-1 | 0], the weight of its expanded GEMM (zeros in place of absent biases). One kernel
    (`mom.ops.triton.flatcast`) instead of a cast per weight, a cat per stacked projection and one for dt_proj's
    matrix (each launch costs host time, which can bound a small model's step); the results are views of the one
    cast buffer. A projection whose GEMM reads its experts' own weights (``own[p]``, `_own_weights`) is not copied:
    (its k weights (o, i), its k biases or None), the parameters themselves."""
    places, size, pieces, shapes, zeros = _cast_layout(layout.experts, layout.shapes, layout.has_bias,
                                                       _k_pad(layout), own)
    per_projection = [params[lo:hi] for lo, hi in _param_spans(layout.experts, layout.has_bias)]
    cast = [t for p, ts in enumerate(per_projection) if not own[p] for t in ts]
    pad = (_zeros(zeros, params[0].dtype, params[0].device),) if zeros else ()
    parts = iter(flat_cast([*cast, *pad], dtype, places, size).split_with_sizes(pieces))  # one call for every view
    out = []
    for p, ts in enumerate(per_projection):
        if own[p]:
            k = layout.experts[p]
            out.append((tuple(ts[:k]), tuple(ts[k:]) or None))
        else:
            ws, bs = shapes[p]
            out.append((next(parts).view(ws), None if bs is None else next(parts).view(bs)))
    return out


def _own_weights(layout: _Layout, params, dtype: torch.dtype, backward: bool) -> tuple[bool, ...]:
    """Per projection, whether its GEMM reads the experts' own weights rather than a stacked copy: a forward without
    backward (which saves no stacked weights), a routed in_proj or out_proj whose parameters are already in
    ``dtype`` (bf16 weights in generation), run per expert (`mom.ops.grouped.per_expert`: the blocks known, a large
    GEMM). The cast copies nothing else of the largest weights then."""
    if backward or layout.counts.known is None:
        return (False,) * len(Projection)
    n = layout.batch * layout.length
    spans = _param_spans(layout.experts, layout.has_bias)
    return tuple(p in (Projection.in_proj, Projection.out_proj) and layout.routed(p)
                 and grouped.per_expert(n * layout.shapes[p][0] * layout.shapes[p][1], layout.has_bias[p], False)
                 and all(t.dtype == dtype for t in params[spans[p][0] : spans[p][1]])
                 for p in Projection)


@functools.lru_cache(maxsize=64)
def _param_spans(experts: tuple[int, ...], has_bias: tuple[bool, ...]) -> tuple[tuple[int, int], ...]:
    """Per projection, the (start, end) of its parameters in the Function's flat order (its experts' weights, then
    their biases: `MixerWeights.params`)."""
    spans, start = [], 0
    for k, bias in zip(experts, has_bias):
        spans.append((start, start + k * (2 if bias else 1)))
        start = spans[-1][1]
    return tuple(spans)


@functools.lru_cache(maxsize=64)
def _cast_layout(experts: tuple[int, ...], shapes: tuple[tuple[int, int], ...], has_bias: tuple[bool, ...],
                 k_pad: int, own: tuple[bool, ...]) -> tuple[tuple[Place, ...], int, tuple[int, ...], list, int]:
    """`_cast_params`' layout of the buffer, built once per mixer shape: (a `Place` per parameter cast, in the
    Function's order, then one for dt_proj's zero columns; the buffer's size; the sizes of its consecutive pieces,
    each projection's weights then its biases if any (dt_proj: one matrix); per projection the shapes of its weights
    and of its biases or None, None for a projection left out (``own``); the number of zeros)."""
    places, pieces, view_shapes, start = [], [], [], 0
    for p, (k, (fo, fi), bias) in enumerate(zip(experts, shapes, has_bias)):
        if own[p]:
            view_shapes.append(None)
            continue
        if p == Projection.dt_proj:  # (fo = d_inner, k_pad): expert m's (fo, fi) at column m * fi, bias m at k * fi + m
            places += [Place(start + m * fi, fi, k_pad) for m in range(k)]
            places += [Place(start + k * fi + m, 1, k_pad) for m in range(k)] if bias else []
            first_zero = k * fi + (k if bias else 0)
            zero_cols = k_pad - first_zero
            dt_start = start
            pieces.append(fo * k_pad)
            view_shapes.append(((fo, k_pad), None))
            start += fo * k_pad
            continue
        view_shapes.append(((k, fo, fi), (k, fo) if bias else None))
        places += [Place(start + m * fo * fi, fo * fi, 0) for m in range(k)]
        pieces.append(k * fo * fi)
        start += k * fo * fi
        if bias:
            places += [Place(start + m * fo, fo, 0) for m in range(k)]
            pieces.append(k * fo)
            start += k * fo
    zeros = shapes[Projection.dt_proj][0] * zero_cols
    if zeros:
        places.append(Place(dt_start + first_zero, zero_cols, k_pad))
    return tuple(places), start, tuple(pieces), view_shapes, zeros


def _linear_cols(w: torch.Tensor, b: torch.Tensor | None, rhs: torch.Tensor) -> torch.Tensor:
    """A shared projection on feature-major columns: ``w @ rhs (+ b)``; w (o, i), rhs (i, n) -> (o, n)."""
    return torch.mm(w, rhs) if b is None else torch.addmm(b[:, None], w, rhs)


def _routed_rows(layout: _Layout, p: Projection, rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                 offsets: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Projection ``p``'s GEMM on rows (n, i) -> (n, o): one GEMM for a shared one, `grouped_rows` for a routed one."""
    if not layout.routed(p):
        return grouped.grouped_gemm(rows, w, b, layout.blocks(p, False), offsets, out_dtype)
    return grouped.grouped_rows(rows, w, b, layout.counts, offsets, out_dtype)


@functools.lru_cache(maxsize=64)
def _zeros(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size,) zeros that dt_proj's cast reads for its padding columns (`_cast_params`), made once: the flat cast's
    table of addresses is built once per set of addresses (a new one waits for the device)."""
    return torch.zeros(size, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _const(shape: tuple[int, ...], value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A constant tensor that is only ever read (padding fed to cat): filled once, not at every call."""
    return torch.full(shape, value, dtype=dtype, device=device)


class _FusedMixer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, perm, inv_perm, offsets, select, ids, keep, dt_base, conv_weight, conv_bias, A_log, A,
                D, layout: _Layout, states_out, *params):
        """hidden (b, l, d_model) -> (b, l, d_model); select (M, n): the one-hot of each token's modality, in the
        dtype the projections run in (`compute_dtype`); ids (n,): each token's expert (`Routes.expert_ids`); keep
        (n,) in that dtype, in sequence order: 1 for real tokens, 0 for padding (`fused_mixer`'s mask), or None;
        dt_base (k_pad, n): dt_proj's expanded input with its constant rows set (`Routes.dt_input`), written only by
        a forward without backward; offsets (M,) int32: the ends of the experts' blocks of sorted tokens, on the
        device (`Routes.offsets`); A: -exp(A_log) computed by the caller, or None; states_out: None, or the
        recurrent states to write (`fused_mixer`)."""
        ctx.dtype = select.dtype
        with torch.autocast("cuda", enabled=False):  # dtypes are chosen here; the GEMMs write into slices (out=)
            return _FusedMixer._forward(ctx, ctx.dtype, hidden, perm, inv_perm, offsets, select, ids, keep, dt_base,
                                        conv_weight, conv_bias, A_log, A, D, layout, states_out, params)

    @staticmethod
    def _forward(ctx, dtype, hidden, perm, inv_perm, offsets, select, ids, keep, dt_base, conv_weight, conv_bias,
                 A_log, A, D, layout, states_out, params, kept=None):
        """The forward; ``ctx`` None: no backward to come (`fused_mixer` without gradients), nothing is saved, and
        ``kept`` may give the only tokens whose output is wanted (`fused_mixer`)."""
        ops = layout.ops
        b, l, di, r, N = layout.batch, layout.length, layout.d_inner, layout.dt_rank, layout.d_state
        n = b * l
        in_routed, out_routed = layout.routed(Projection.in_proj), layout.routed(Projection.out_proj)
        if A is None:
            A = torch.exp(A_log.float()).neg_()  # (di, N); dA_log = dA * A in backward
        # weights (k, o, i) and biases (k, o) | None per projection, every expert cast in one pass (but where the
        # GEMM reads the experts' own weights: k (o, i) and k (o,) | None)
        own = _own_weights(layout, params, dtype, ctx is not None)
        (w_in, b_in), (w_x, _), (w_dt_cat, _), (w_out, b_out) = _cast_params(layout, params, dtype, own)
        # in_proj's input rows: masked, in the order in_proj reads them
        keep_io = _keep_rows(keep, layout.sorted_io, perm)  # (n,) in the input's row order, or None
        h = _masked_rows(hidden.reshape(n, -1), keep_io, dtype)  # (n, d_model), sorted rows if layout.sorted_io
        h_in = _reorder(h, layout.sorted_io, in_routed, perm, inv_perm)  # sorted iff in_proj routes
        z_rows = None  # z in in_proj's sorted rows (n, di), where a forward without backward leaves it (below)
        window = None if states_out is None else states_out[0]
        # in_proj: a routed one is one grouped GEMM on the sorted rows, a shared one a GEMM into sequence-order columns.
        # Where only the kept tokens' output is wanted and out_proj routes, z (read by their gate alone) is computed
        # for those tokens only: the GEMM over every row computes x.
        z_kept = None  # (m, di): the kept tokens' z, in their order
        kept_own = ids.index_select(0, kept[0]) if kept is not None and out_routed else None  # (m,) their experts
        if in_routed and kept_own is not None:
            w_x_in, b_x_in = _half(w_in, b_in, slice(0, di))
            xz_rows = _routed_rows(layout, Projection.in_proj, h_in, _transposed(w_x_in), b_x_in, offsets)  # (n, di)
            z_kept = _own_expert_rows(h_in.index_select(0, kept[1]), *_half(w_in, b_in, slice(di, None)), kept_own)
        else:
            xz_rows = _routed_rows(layout, Projection.in_proj, h_in, _transposed(w_in), b_in, offsets) \
                if in_routed else None  # (n, 2di)
        if xz_rows is not None and ctx is None:  # no backward: x is never gathered into sequence order; the conv
            # reads its windows from the sorted rows (`conv_rows_t`: one pass where a gather and the conv were two)
            conv_out = _bdl(conv_rows_t(xz_rows[:, :di], inv_perm, l, conv_weight.squeeze(1), conv_bias, keep,
                                        window), b, l)  # (b, di, l)
            x = xz = None
            if z_kept is not None:  # z computed for the kept tokens alone (above)
                z = None
            elif out_routed:  # z stays in these rows, the order of out_proj's input: the gated gather reads it there
                z_rows, z = xz_rows[:, di:], None  # (n, di)
            else:
                z = _bdl(gather_rows_t(xz_rows[:, di:], inv_perm), b, l)
            del xz_rows
        else:  # a backward reads x and z in sequence order: rows -> sequence-order columns
            xz = _linear_cols(w_in[0], None if b_in is None else b_in[0], h_in.t()) if xz_rows is None \
                else gather_rows_t(xz_rows, inv_perm)  # (2di, n)
            del xz_rows  # before the conv's output is allocated
            x, z = _bdl(xz[:di], b, l), _bdl(xz[di:], b, l)  # (b, di, l) views
            if window is not None:
                write_window(window, x)
            conv_out = _masked_conv(ops, x, conv_weight, conv_bias, keep)  # (b, di, l)
        # x_proj: every expert on every token (M times a small GEMM instead of column gathers of conv_out and of its
        # gradient); each token's Δ-rank features and B, C are then taken from its own expert's rows
        M_x, M_dt = layout.experts[Projection.x_proj], layout.experts[Projection.dt_proj]
        w_x_cat = w_x.view(-1, di)  # (M_x * (r + 2N), di)
        x_all = w_x_cat @ _cols(conv_out)  # (M_x * (r + 2N), n)
        # dt_proj: one GEMM over the expanded input [Δ-rank features spread to their expert's block; one-hot bias rows;
        # zero padding] (k_pad, n), biases included; the constant rows come set (dt_base), a backward keeps its own.
        # B and C in one (b, 2N, l) (the scan's fastest layout). Both each token's from its own expert: one kernel.
        dt_in = dt_base if ctx is None else dt_base.clone()
        BC = x_all.new_empty(b, 2 * N, l)
        split_x_proj(x_all, M_x, ids, select, r, dt_in[: M_dt * r], BC)
        del x_all
        delta = w_dt_cat @ dt_in  # (di, n)
        B, C = BC[:, None, :N], BC[:, None, N:]  # (b, 1, N, l) views
        # the scan gates its output for a shared out_proj; a routed one's gather gates it on the way (the scan then
        # neither reads z nor writes a second (di, n) output)
        out, checkpoints, out_z, last_state = ops.scan_fwd(conv_out, _bdl(delta, b, l), A, B, C, D,
                                                           None if out_routed else z)
        if states_out is not None:
            states_out[1].copy_(last_state)
        del conv_out, delta, last_state
        if kept is not None:
            if z_kept is None and z_rows is not None:
                z_kept = z_rows.index_select(0, kept[1])
            return _kept_out_proj(layout, kept[0], out, out_z, z, z_kept, kept_own, w_out, b_out)
        # out_proj on the gated output's rows (n, di), sorted iff out_proj routes; its output back to the stream's order
        if not out_routed:
            y_rows = _cols(out_z).t()
        elif z_rows is not None:
            y_rows = gather_cols_t(_cols(out), perm, gate_rows=z_rows)
        else:
            y_rows = gather_cols_t(_cols(out), perm, gate=_cols(z))
        del out_z
        if ctx is None:  # no backward: the activations go before out_proj's output is allocated
            del x, z, xz, z_rows, out, h, h_in, B, C, BC, dt_in, checkpoints
        o = _routed_rows(layout, Projection.out_proj, y_rows, _transposed(w_out), b_out, offsets)  # (n, d_model)
        o = _reorder(o, out_routed, layout.sorted_io, perm, inv_perm)  # a row gather (PyTorch's is fast) or none
        if ctx is None:
            return o.view(b, l, -1)
        ctx.layout, ctx.param_dtype, ctx.hidden_dtype = layout, params[0].dtype, hidden.dtype
        # The largest activations (xz, the scan's output, a routed out_proj's gated rows, kept for its weight gradient)
        # are held on ctx, so that the backward can free each after its last use (with the input and weight gradients
        # allocated, the end of the backward can be its peak), unless saved-tensor hooks (activation checkpointing,
        # offloading) are active: those must see every saved tensor.
        ctx.hooked = _saved_tensors_hooked()
        held = (xz, out, y_rows if out_routed else None)
        ctx.save_for_backward(h_in, conv_weight, conv_bias, A, B, C, D, checkpoints, perm, inv_perm, offsets, select,
                              ids, keep, keep_io, dt_in, w_x_cat, w_dt_cat, w_in, w_out,
                              *(held if ctx.hooked else ()))
        ctx.held = None if ctx.hooked else held
        return o.view(b, l, -1)

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast("cuda", enabled=False):
            return _FusedMixer._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        """The forward's steps in reverse, each a function named for what it computes. Weight gradients come out
        stacked per projection (each projection's experts), in the parameters' dtype; the largest activations are
        dropped (``del``) right after their last use, so that the next step's allocations can reuse their memory."""
        layout, dtype, ops = ctx.layout, ctx.dtype, ctx.layout.ops
        (h_in, conv_weight, conv_bias, A, B, C, D, checkpoints, perm, inv_perm, offsets, select, ids, keep, keep_io,
         dt_in, w_x_cat, w_dt_cat, w_in, w_out, *held) = ctx.saved_tensors
        xz, out, y_rows = _take_held(ctx, held)
        del held
        b, l, di = layout.batch, layout.length, layout.d_inner
        n = b * l
        pdtype = ctx.param_dtype
        in_routed, out_routed = layout.routed(Projection.in_proj), layout.routed(Projection.out_proj)
        x, z = _bdl(xz[:di], b, l), _bdl(xz[di:], b, l)
        dout_in = _reorder(dout.reshape(n, -1).to(dtype), layout.sorted_io, out_routed, perm, inv_perm)  # (n, d_model)
        del dout
        # out_proj. A routed one's weight gradient comes first, from the gated rows kept by the forward, which are
        # then freed before the scan's backward (its peak); a shared one's needs the gated output in sequence order,
        # which the scan's backward recomputes.
        g_out = _out_proj_weight_grads(layout, dout_in, y_rows, pdtype, offsets) if out_routed else None
        del y_rows
        dy = _out_proj_input_grad(layout, dout_in, w_out, inv_perm, offsets)  # (di, n) sequence order
        # the scan, on the recomputed conv output and Δ; it writes dz. A routed in_proj reads dx and dz through the
        # gathers that sort them, so they can be two matrices, and dx is allocated after the scan's backward (its
        # peak); a shared one reads them as one (2di, n) matrix, dxz.
        dxz = None if in_routed else torch.empty_like(xz)
        dz = xz.new_empty(di, n) if dxz is None else dxz[di:]
        conv_out, dconv_out, ddelta, dA, dB, dC, dD, out_z = _scan_backward(
            layout, x, z, conv_weight, conv_bias, keep, w_dt_cat, dt_in, A, B, C, D, dy, checkpoints, out, dz
        )
        del dy, out
        if not out_routed:
            g_out = _out_proj_weight_grads(layout, dout_in, _cols(out_z).t(), pdtype, offsets)
        del out_z, dout_in
        # dt_proj, then x_proj's output gradient: [dΔ-rank; dB; dC] in each token's expert's block
        ddelta = _cols(ddelta).to(dtype)  # (di, n)
        g_dt = _dt_proj_weight_grads(layout, ddelta, dt_in, pdtype)
        dx_all = _x_proj_output_grad(layout, ddelta, dB, dC, w_dt_cat, select, ids)  # (M_x * (r + 2N), n)
        del ddelta, dt_in
        # x_proj, then the conv
        g_x = _x_proj_weight_grads(layout, dx_all, conv_out, pdtype)
        del conv_out
        dconv_cols = _conv_output_grad(dconv_out, dx_all, w_x_cat, dtype, keep)  # (di, n)
        del dconv_out, dx_all
        dx = xz.new_empty(di, n) if dxz is None else dxz[:di]
        _, dconv_w, dconv_b = ops.conv_bwd(x, conv_weight.squeeze(1), conv_bias, _bdl(dconv_cols, b, l), _bdl(dx, b, l))
        del dconv_cols, x, z, xz
        # in_proj
        dxz_rows = _in_proj_output_grad_rows(layout, dx, dz, dxz, perm)  # (n, 2di), sorted iff in_proj routes
        del dxz, dx, dz
        dh, g_in = _in_proj_grads(layout, dxz_rows, h_in, w_in, offsets, ctx.hidden_dtype, pdtype)
        del dxz_rows
        dh = _reorder(dh, in_routed, layout.sorted_io, perm, inv_perm)
        if keep_io is not None:  # the input was masked: padding gets no gradient
            dh.mul_(keep_io[:, None])
        param_grads = _split_params([g_in, g_x, g_dt, g_out])
        dA_log = dA.mul_(A)  # A = -exp(A_log): dA/dA_log = A
        return (dh.view(b, l, -1), None, None, None, None, None, None, None, dconv_w.unsqueeze(1), dconv_b, dA_log,
                None, dD, None, None, *param_grads)


# ---- the backward's steps, in the order it runs them ----------------------------------------------------------------
def _take_held(ctx, saved: list) -> tuple:
    """(xz, out, y_rows): the activations the forward held on ctx (taken, so that they are freed as the backward
    goes), or saved through saved-tensor hooks (``saved``)."""
    if ctx.hooked:
        return tuple(saved)
    if ctx.held is None:
        raise RuntimeError("backward through MoM's fused mixer ran twice: it frees its activations as it goes, so a "
                           "graph kept with retain_graph=True cannot be differentiated again; set the model's "
                           "use_fast_path=False for that")
    held, ctx.held = ctx.held, None
    return held


def _out_proj_weight_grads(layout: _Layout, dout_in: torch.Tensor, y_rows: torch.Tensor, pdtype: torch.dtype,
                           offsets: torch.Tensor):
    """out_proj's (dW, db) per expert: dout_in (n, d_model) and its input y_rows (n, di), both in out_proj's order."""
    return _routed_weight_grads(layout, Projection.out_proj, dout_in.t(), y_rows, pdtype, offsets)


def _out_proj_input_grad(layout: _Layout, dout_in: torch.Tensor, w_out: torch.Tensor, inv_perm, offsets):
    """The gradient of the scan's gated output, dy (di, n) in sequence order: ``W^T dout`` per expert."""
    if layout.routed(Projection.out_proj):  # on the sorted rows, then rows -> sequence-order columns
        return gather_rows_t(_routed_rows(layout, Projection.out_proj, dout_in, w_out, None, offsets), inv_perm)
    return torch.mm(w_out[0].t(), dout_in.t())


def _scan_backward(layout: _Layout, x, z, conv_weight, conv_bias, keep, w_dt_cat, dt_in, A, B, C, D, dy, checkpoints,
                   out, dz):
    """The scan's backward on the recomputed (masked) conv output and Δ; writes dz (the gate's gradient) in place.
    -> (conv_out, dconv_out, ddelta, dA, dB, dC, dD, out_z): the recomputed conv output (x_proj's weight gradient
    reads it), the gradients, and the gated output, recomputed for a shared out_proj's weight gradient (else None)."""
    b, l = layout.batch, layout.length
    conv_out = _masked_conv(layout.ops, x, conv_weight, conv_bias, keep)  # (b, di, l)
    dconv_out, ddelta, dA, dB, dC, dD, out_z = layout.ops.scan_bwd(
        conv_out, _bdl(w_dt_cat @ dt_in, b, l), A, B, C, D, z, _bdl(dy, b, l), checkpoints, out, _bdl(dz, b, l),
        not layout.routed(Projection.out_proj),
    )
    return conv_out, dconv_out, ddelta, dA, dB, dC, dD, out_z


def _dt_proj_weight_grads(layout: _Layout, ddelta: torch.Tensor, dt_in: torch.Tensor, pdtype: torch.dtype):
    """dt_proj's (dW (M, di, r), db (M, di) or None), from the expanded GEMM's weight gradient (di, k_pad) =
    [dW_0 .. dW_M-1 | db_0 .. db_M-1 | padding]. ddelta (di, n), dt_in (k_pad, n)."""
    M, r, di = layout.experts[Projection.dt_proj], layout.dt_rank, layout.d_inner
    dw_dt_cat = grouped.mm_as(ddelta, dt_in.t(), pdtype)
    dw = grouped.contiguous_as(dw_dt_cat[:, : M * r].view(di, M, r).transpose(0, 1), pdtype)
    has_bias = layout.has_bias[Projection.dt_proj]
    db = grouped.contiguous_as(dw_dt_cat[:, M * r : M * (r + 1)].t(), pdtype) if has_bias else None
    return dw, db


def _x_proj_output_grad(layout: _Layout, ddelta: torch.Tensor, dB, dC, w_dt_cat: torch.Tensor, select, ids):
    """x_proj's output gradient in its experts' row blocks (M_x * (r + 2N), n): [dΔ-rank; dB; dC] per expert, each
    token's in its expert's block (zeros elsewhere), each part written in place (with its cast and layout change).
    The Δ-rank part is every dt_proj expert's ``W^T dΔ`` on every token, routed."""
    b, l, r, N = layout.batch, layout.length, layout.dt_rank, layout.d_state
    M_x, M_dt = layout.experts[Projection.x_proj], layout.experts[Projection.dt_proj]
    dx_all = ddelta.new_empty(M_x, r + 2 * N, b, l)
    dt_low = (w_dt_cat[:, : M_dt * r].t() @ ddelta).view(M_dt, r, b, l)
    route_cols(dt_low, select, ids, dx_all[:, :r])
    route_cols(dB[:, 0].permute(1, 0, 2)[None], select, ids, dx_all[:, r : r + N])
    route_cols(dC[:, 0].permute(1, 0, 2)[None], select, ids, dx_all[:, r + N :])
    return dx_all.view(-1, b * l)


def _x_proj_weight_grads(layout: _Layout, dx_all: torch.Tensor, conv_out: torch.Tensor, pdtype: torch.dtype):
    """x_proj's (dW (M_x, r + 2N, di), None): every expert on every token, one GEMM. conv_out (b, di, l)."""
    M_x, di = layout.experts[Projection.x_proj], layout.d_inner
    return grouped.mm_as(dx_all, _cols(conv_out).t(), pdtype).view(M_x, -1, di), None


def _conv_output_grad(dconv_out: torch.Tensor, dx_all: torch.Tensor, w_x_cat: torch.Tensor, dtype: torch.dtype,
                      keep: torch.Tensor | None):
    """The conv output's whole gradient (di, n): the scan's (through its input u) plus x_proj's, ``W_x^T dx_all``;
    zero at padding (``keep`` (n,), where the forward zeroed the output), or None."""
    dconv_cols = _cols(dconv_out).to(dtype).addmm_(w_x_cat.t(), dx_all)
    return dconv_cols if keep is None else dconv_cols.mul_(keep)


def _in_proj_output_grad_rows(layout: _Layout, dx: torch.Tensor, dz: torch.Tensor, dxz, perm) -> torch.Tensor:
    """in_proj's output gradient as rows (n, 2di): for a routed in_proj, sorted rows, each half gathered from its own
    (di, n) matrix; for a shared one, a view of the one (2di, n) matrix dxz."""
    if not layout.routed(Projection.in_proj):
        return dxz.t()
    dxz_rows = dx.new_empty(dx.shape[1], 2 * layout.d_inner)
    gather_cols_t(dx, perm, out=dxz_rows[:, : layout.d_inner])
    gather_cols_t(dz, perm, out=dxz_rows[:, layout.d_inner :])
    return dxz_rows


def _in_proj_grads(layout: _Layout, dxz_rows, h_in, w_in, offsets, hidden_dtype: torch.dtype, pdtype: torch.dtype):
    """-> (dh (n, d_model) in in_proj's row order and the input's dtype (an fp32 input's gradient is written by the
    GEMM in fp32: no cast afterwards), in_proj's (dW, db) per expert)."""
    p = Projection.in_proj
    dh = _routed_rows(layout, p, dxz_rows, w_in, None, offsets, out_dtype=hidden_dtype)
    return dh, _routed_weight_grads(layout, p, dxz_rows.t(), h_in, pdtype, offsets)


# ---- shared helpers -------------------------------------------------------------------------------------------------
def _keep_rows(keep: torch.Tensor | None, is_sorted: bool, perm: torch.Tensor) -> torch.Tensor | None:
    """The padding mask keep (n,), in sequence order, in the order of rows that are sorted or not; None: no mask."""
    if keep is None or not is_sorted:
        return keep
    return keep.index_select(0, perm)


def _masked_rows(rows: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """rows (n, f) in ``dtype``, times ``keep`` (n,) in the rows' order if given: one kernel (the cast with the
    product), as the module path's product before in_proj and the autocast cast of in_proj's input."""
    if keep is None:
        return rows.to(dtype)
    return torch.mul(rows, keep[:, None], out=rows.new_empty(rows.shape, dtype=dtype))


def _masked_conv(ops: scan_ops.ScanOps, x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                 keep: torch.Tensor | None) -> torch.Tensor:
    """silu(conv(x)) (b, di, l), zero at padding (``keep`` (n,) in sequence order, 0 there) if given."""
    conv_out = ops.conv_fwd(x, conv_weight.squeeze(1), conv_bias)
    return conv_out if keep is None else conv_out.mul_(keep.view(x.shape[0], 1, x.shape[2]))


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are active (``torch.autograd.graph.saved_tensors_hooks``: non-reentrant activation
    checkpointing, CPU offloading), which tensors held on ctx would escape. True when this torch cannot tell."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        return top is None or top(False) is not None
    except (TypeError, RuntimeError):
        return True


def _routed_weight_grads(layout: _Layout, p: Projection, d_cols: torch.Tensor, x_rows: torch.Tensor,
                         dtype: torch.dtype, offsets: torch.Tensor):
    """Projection ``p``'s (dW, db) per expert (`mom.ops.grouped.weight_grads`): d_cols (o, n), its input x_rows
    (n, i); one GEMM for a shared projection, `mom.ops.grouped.grouped_weight_grads` for a routed one."""
    if not layout.routed(p):
        return grouped.weight_grads(d_cols, x_rows.t(), layout.blocks(p, False), layout.has_bias[p], dtype, offsets)
    return grouped.grouped_weight_grads(d_cols, x_rows, layout.has_bias[p], counts=layout.counts, dtype=dtype,
                                        offsets=offsets)


def _kept_out_proj(layout: _Layout, kept: torch.Tensor, out: torch.Tensor, out_z: torch.Tensor | None,
                   z: torch.Tensor | None, z_kept: torch.Tensor | None, own: torch.Tensor | None, w_out,
                   b_out) -> torch.Tensor:
    """out_proj for the m tokens ``kept`` (sequence-order indices) only -> (m, d_model) in their order, from the scan's
    output as `_FusedMixer._forward` leaves it: gated by the scan (``out_z``) for a shared out_proj, else gated here
    by ``z_kept`` (the kept tokens' z (m, di)) or ``z`` (sequence order). A routed one runs every expert on the m rows
    (`_own_expert_rows`; ``own`` (m,): each one's expert)."""
    if not layout.routed(Projection.out_proj):
        w, b = w_out[0], None if b_out is None else b_out[0]
        return torch.nn.functional.linear(_cols(out_z).index_select(1, kept).t(), w, b)
    if z_kept is not None:
        y = gather_cols_t(_cols(out), kept, gate_rows=z_kept)
    else:
        y = gather_cols_t(_cols(out), kept, gate=_cols(z))  # (m, di)
    return _own_expert_rows(y, w_out, b_out, own)


def _own_expert_rows(rows: torch.Tensor, w, b, own: torch.Tensor) -> torch.Tensor:
    """Each of m rows through its own expert: rows (m, i), w (k, o, i) or the k experts' (o, i), b (k, o) or k (o,)
    or None, own (m,) each row's expert -> (m, o). Every expert runs on every row and each keeps its own: for a
    handful of rows (the last positions of each sequence), a few launches and no sort."""
    w = w if isinstance(w, torch.Tensor) else torch.stack(w)  # (k, o, i)
    ys = rows.expand(w.shape[0], -1, -1)  # (k, m, i)
    if b is None:
        o = torch.bmm(ys, w.transpose(1, 2))  # (k, m, o)
    else:
        bias = b if isinstance(b, torch.Tensor) else torch.stack(b)  # (k, o)
        o = torch.baddbmm(bias.unsqueeze(1), ys, w.transpose(1, 2))
    return o.gather(0, own.view(1, -1, 1).expand(1, -1, o.shape[-1])).squeeze(0)


def _half(w, b, features: slice):
    """A projection's (weights, biases) cut to its output ``features``: (k, o, i) / (k, o) or the experts' own
    (o, i) / (o,); biases None stay None."""
    if isinstance(w, torch.Tensor):
        return w[:, features], None if b is None else b[:, features]
    return [m[features] for m in w], None if b is None else [v[features] for v in b]


def _reorder(rows: torch.Tensor, is_sorted: bool, want_sorted: bool, perm, inv_perm) -> torch.Tensor:
    """rows (n, f) in sorted (``Routing.perm``) or sequence order -> the order wanted: a row gather, or ``rows``."""
    if is_sorted == want_sorted:
        return rows
    return rows.index_select(0, perm if want_sorted else inv_perm)


def _split_params(stacked) -> list[torch.Tensor]:
    """[(weights (k, o, i), biases (k, o) or None)] per projection -> one tensor per parameter, in the Function's
    order (per projection: the experts' weights, then their biases)."""
    out = []
    for w, b in stacked:
        out += list(w.unbind())
        out += list(b.unbind()) if b is not None else []
    return out


def _transposed(w):
    """Stacked weights (k, o, i) -> (k, i, o) view; the experts' own k (o, i) -> k (i, o) views."""
    return w.transpose(1, 2) if isinstance(w, torch.Tensor) else [m.t() for m in w]


def _k_pad(layout: _Layout) -> int:
    """Rows of the expanded dt_proj input, M * r + M rounded up to 8 (bf16 tensor-core alignment)."""
    k = layout.experts[Projection.dt_proj] * (layout.dt_rank + 1)
    return -(-k // 8) * 8


def _bdl(cols: torch.Tensor, b: int, l: int) -> torch.Tensor:
    """(f, n) -> (b, f, l) view, strides (l, n, 1): the layout the conv and scan kernels read."""
    return cols.view(cols.shape[0], b, l).permute(1, 0, 2)


def _cols(bdl: torch.Tensor) -> torch.Tensor:
    """(b, f, l) with strides (l, n, 1) -> (f, n) view (kernel outputs keep their input's layout)."""
    f = bdl.shape[1]
    cols = bdl.permute(1, 0, 2)
    if not cols.is_contiguous():  # a kernel gave a (b, f, l)-contiguous result: one copy
        cols = cols.contiguous()
    return cols.view(f, -1)


