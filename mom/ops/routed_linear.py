"""One routed projection as an autograd Function over modality-sorted rows: each row through its modality's expert.

What a `mom.model.routing.RoutedLinear` computes, from tensors (the experts' weights and biases, the routing's
`mom.ops.fused.Routes`), the way the Mamba-1 fast path (`mom.ops.fused`) runs its routed in_proj and out_proj:

* ONE grouped GEMM over the rows sorted by modality (`Routes.perm`), each expert's block ending at `Routes.offsets`
  on the device (`mom.ops.grouped.grouped_rows`: ``torch._grouped_mm``; one cuBLAS GEMM per expert where the counts are
  known on the host and the GEMM is large, `mom.ops.grouped.PER_EXPERT_MACS`), instead of a module call per expert,
  a concatenation and a permutation each way.
* The input rows and the output rows are each in sequence order or in the sorted order (``x_sorted``,
  ``out_sorted``: a residual stream the model keeps sorted, `mom.model.mixer.sorted_stream`). Where the operands are
  bf16 / fp16 on CUDA, a GEMM whose output goes to sequence order writes its rows there itself (forward and input
  gradient), and a forward without a backward reads its input rows from sequence order itself
  (`mom.ops.triton.gathered_mm`): no (n, f) copy between the orders. Otherwise one row gather (``index_select``, as
  the Mamba-1 Function's `_reorder`) crosses: the input rows are sorted in the forward when a backward will need
  them (the weight gradients' cuBLAS GEMMs read sorted rows; a kernel computing them from gathered rows measured
  slower than the gather and cuBLAS: docs/performance.md), the output gradient is sorted once in the backward.
* Every expert's weight and bias is cast to the compute dtype (autocast's, `mom.ops.fused.compute_dtype`) in one
  kernel (`mom.ops.triton.flatcast`), once per call.
* Backward: the output gradient to sorted rows, one grouped GEMM for the input gradient (back to the input's order,
  in its dtype), the weight gradients grouped along the tokens, or per expert where the counts are known
  (`mom.ops.grouped.grouped_weight_grads`), written in the parameters' dtype. An absent modality's expert gets zero
  gradients. Saved for the backward: the sorted input rows (in the compute dtype) and the cast weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mom.ops.fused import Routes, compute_dtype
from mom.ops.grouped import HostCounts, grouped_rows, grouped_weight_grads
from mom.ops.triton import gathered_mm as gmm
from mom.ops.triton.flatcast import flat_cast


def routed_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None,
                  routes: Routes, x_sorted: bool = False, out_sorted: bool = False) -> torch.Tensor:
    """x (..., i) with ``n = x[..., 0].numel()`` rows -> (..., o): row t through ``weights[m] (o, i)`` (+
    ``biases[m] (o,)``) of its expert m, one per modality (`Routes.num_experts`).

    ``x_sorted`` / ``out_sorted``: x's rows / the output's are in the routes' sorted order (``Routes.perm``) instead
    of sequence order. The GEMMs run in `mom.ops.fused.compute_dtype` (autocast's, else x's); the output is in it."""
    k = len(weights)
    if k != routes.num_experts or k < 2:
        raise ValueError(f"routed_linear: {k} experts but routes for {routes.num_experts} (at least 2)")
    o, i = weights[0].shape
    if any(w.shape != weights[0].shape for w in weights):
        raise ValueError(f"routed_linear: the experts' weights differ in shape: {[tuple(w.shape) for w in weights]}")
    if biases is not None and (len(biases) != k or any(b.shape != (o,) for b in biases)):
        raise ValueError(f"routed_linear: {k} experts of {o} outputs but biases of shapes "
                         f"{[tuple(b.shape) for b in biases]}")
    if x.shape[-1] != i or x.numel() != i * routes.perm.shape[0]:
        raise ValueError(f"routed_linear: input {tuple(x.shape)} for experts of {i} inputs and routes for "
                         f"{routes.perm.numel()} rows")
    params = (*weights, *(biases or ()))
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
    layout = _Layout(k, o, i, biases is not None, routes.counts, x_sorted, out_sorted, backward)
    return _RoutedLinear.apply(x, routes.perm, routes.inv_perm, routes.offsets, compute_dtype(x), layout, *params)


class _Layout(NamedTuple):
    """What the Function needs beside tensors: experts, sizes, bias, the host counts, the rows' orders. (A named
    tuple: built at every call, where a frozen dataclass's constructor costs several times its host time.)"""

    experts: int
    out_features: int
    in_features: int
    has_bias: bool
    counts: HostCounts  # tokens per expert on the host, once known: the per-expert GEMMs' blocks
    x_sorted: bool  # the input rows are in the routes' sorted order (else sequence order)
    out_sorted: bool  # the output rows are
    backward: bool  # a backward may follow (grad mode on, something requires grad): keep the input rows sorted


def _cast(layout: _Layout, params, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The experts' weights and biases in ``dtype``, one cast kernel -> (w (k, o, i), b (k, o) or None), views."""
    k, o, i = layout.experts, layout.out_features, layout.in_features
    flat = flat_cast(params, dtype)
    return flat[: k * o * i].view(k, o, i), flat[k * o * i :].view(k, o) if layout.has_bias else None


class _RoutedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inv_perm, offsets, dtype, layout: _Layout, *params):
        with torch.autocast("cuda", enabled=False):  # dtypes are chosen here
            w, b = _cast(layout, params, dtype)
            rows = x.reshape(-1, layout.in_features).to(dtype)  # (n, i)
            ctx.kernel = gmm.kernel_applies(rows, w)
            # rows in sequence order are gathered here when a backward will want them sorted (the weight gradients'
            # cuBLAS GEMMs); only a forward without one lets the kernel gather them (docs/performance.md)
            gather_in_kernel = not layout.x_sorted and ctx.kernel and not layout.backward
            if not layout.x_sorted and not gather_in_kernel:
                rows = rows.index_select(0, perm)
            if ctx.kernel and (gather_in_kernel or not layout.out_sorted):
                out = gmm.gathered_mm(rows, w.transpose(1, 2), offsets, b, a_index=perm if gather_in_kernel else None,
                                      out_index=None if layout.out_sorted else perm)
            else:
                out = grouped_rows(rows, w.transpose(1, 2), b, layout.counts, offsets)  # (n, o) sorted
                if not layout.out_sorted:
                    out = out.index_select(0, inv_perm)
        ctx.layout, ctx.dtype, ctx.x_dtype, ctx.x_shape = layout, dtype, x.dtype, x.shape
        ctx.param_dtype = params[0].dtype
        ctx.save_for_backward(rows, w, perm, inv_perm, offsets)
        return out.view(*x.shape[:-1], layout.out_features)

    @staticmethod
    def backward(ctx, dout):
        layout = ctx.layout
        rows, w, perm, inv_perm, offsets = ctx.saved_tensors  # rows sorted
        with torch.autocast("cuda", enabled=False):
            d = dout.reshape(-1, layout.out_features).to(ctx.dtype)  # (n, o)
            if not layout.out_sorted:  # sorted once, for the input and the weight gradients
                d = d.index_select(0, perm)
            dx = None
            if ctx.needs_input_grad[0]:
                if ctx.kernel and not layout.x_sorted:  # written in sequence order by the GEMM
                    dx = gmm.gathered_mm(d, w, offsets, out_index=perm, out_dtype=ctx.x_dtype)
                else:
                    dx = grouped_rows(d, w, None, layout.counts, offsets, out_dtype=ctx.x_dtype)  # (n, i) sorted
                    if not layout.x_sorted:
                        dx = dx.index_select(0, inv_perm)
                dx = dx.view(ctx.x_shape)
            g_w, g_b = grouped_weight_grads(d.t(), rows, layout.has_bias, layout.counts, ctx.param_dtype, offsets)
        params = list(g_w.unbind()) + (list(g_b.unbind()) if g_b is not None else [])
        return (dx, None, None, None, None, None, *params)
