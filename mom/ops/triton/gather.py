"""Routing gathers that also change layout, between the fast path's two activation layouts.

The conv and the scan read feature-major ``(f, n)`` activations in sequence order; the routed GEMMs
(``torch._grouped_mm``) read and write token-major ``(n, f)`` rows sorted by modality. Each crossing is one
gather with a transpose:

* `gather_rows_t`: ``x[index].t()``, token-major rows -> feature-major columns (a GEMM's output to the scan);
* `gather_cols_t`: ``x[:, index].t()``, feature-major columns -> token-major rows (the scan's output to a GEMM);
  with ``gate``, ``(x * silu(gate))[:, index].t()``: the scan's gated output computed from its ungated one and z on
  the way (a routed out_proj's input; the scan then does not write a gated copy); with ``gate_rows``, the gate is
  read in the output's row order instead (z left in in_proj's sorted rows: a forward without backward then gathers
  only x into sequence order).

One Triton kernel does both: a program copies a tile of 64 tokens x 64 features, loading along the source's
contiguous dimension and storing along the output's (Triton transposes the tile through shared memory); a routing
permutation is mostly long runs, so the column side stays mostly contiguous too. With the transpose it is as fast
as a plain column gather of the same bytes, and other tile shapes were no faster (`python benchmarks/bench_gather.py`;
the figures: docs/performance.md). Elsewhere (CPU, no Triton) both are ``index_select`` and a copy.
"""

from __future__ import annotations

import torch

from mom.ops.triton.launcher import launch, triton_kernel

TILE = 64  # tokens and features per program


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def gather_t_kernel(src, gate, index, out, N, F, s_src_tok, s_src_feat, s_out_tok, s_out_feat, s_gate_tok,
                        s_gate_feat, BN: tl.constexpr, BF: tl.constexpr, GATED: tl.constexpr,
                        GATE_AT_OUT: tl.constexpr):
        """out[j, f] = src[index[j], f] (times silu(gate[index[j], f]) if GATED, or silu(gate[j, f]) if also
        GATE_AT_OUT) for j < N, f < F, in either layout (token and feature strides given)."""
        toks = tl.program_id(0) * BN + tl.arange(0, BN)
        feats = tl.program_id(1) * BF + tl.arange(0, BF)
        tok_ok, feat_ok = toks < N, feats < F
        src_tok = tl.load(index + toks, mask=tok_ok, other=0).to(tl.int64)
        ok = tok_ok[:, None] & feat_ok[None, :]
        feats64 = feats.to(tl.int64)[None, :]
        at = src_tok[:, None] * s_src_tok + feats64 * s_src_feat
        values = tl.load(src + at, mask=ok)
        if GATED:  # as the scan computes its gated output: in fp32, x * g / (1 + exp(-g)), rounded once
            if GATE_AT_OUT:
                gate_tok = toks.to(tl.int64)
            else:
                gate_tok = src_tok
            g = tl.load(gate + gate_tok[:, None] * s_gate_tok + feats64 * s_gate_feat, mask=ok).to(tl.float32)
            values = (values.to(tl.float32) * (g / (1.0 + tl.exp(-g)))).to(values.dtype)
        tl.store(out + toks.to(tl.int64)[:, None] * s_out_tok + feats64 * s_out_feat, values, mask=ok)

    return gather_t_kernel


def _gather_t(src_rows: torch.Tensor, index: torch.Tensor, out_rows: torch.Tensor,
              gate_rows: torch.Tensor | None = None, gate_at_out: bool = False) -> None:
    """out_rows[j] = src_rows[index[j]] (gated: times silu(gate_rows[index[j]]), or silu(gate_rows[j]) with
    ``gate_at_out``): (n, f), (m, f) and the gate's (n or m, f) views of any strides, through the Triton kernel."""
    m, f = out_rows.shape
    if out_rows.numel():
        grid = (-(-m // TILE), -(-f // TILE), 1)
        gate = src_rows if gate_rows is None else gate_rows
        launch(_kernel(), grid, (src_rows, gate, index, out_rows, m, f, *src_rows.stride(), *out_rows.stride(),
                                 *gate.stride()),
               BN=TILE, BF=TILE, GATED=gate_rows is not None, GATE_AT_OUT=gate_at_out)


def silu_gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x * silu(gate)`` as the scan computes its gated output: in fp32 (or x's wider dtype), rounded once to x's."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return (x.to(wide) * torch.nn.functional.silu(gate.to(wide))).to(x.dtype)


def gather_rows_t(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (n, f) token-major; index: (m,) int64 -> (f, m) contiguous, ``x[index].t()``."""
    if not (x.is_cuda and _kernel() is not None):
        return x.index_select(0, index).t().contiguous()
    out = x.new_empty(x.shape[1], index.shape[0])
    _gather_t(x, index, out.t())
    return out


def gather_cols_t(x: torch.Tensor, index: torch.Tensor, gate: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, gate_rows: torch.Tensor | None = None) -> torch.Tensor:
    """x: (f, n) feature-major; index: (m,) int64 -> (m, f), ``x[:, index].t()``, into ``out`` (any strides, e.g.
    columns of wider rows) or a new contiguous tensor; with ``gate`` (f, n), the same strides as x:
    ``(x * silu(gate))[:, index].t()``, computed in fp32 (or x's wider dtype); or with ``gate_rows`` (m, f), any
    strides, the gate in the output's order: ``x[:, index].t() * silu(gate_rows)``, computed alike."""
    if gate is not None and (gate.shape != x.shape or gate.stride() != x.stride()):
        raise ValueError(f"gate {tuple(gate.shape)} with strides {gate.stride()} must match the gathered tensor's "
                         f"{tuple(x.shape)} and {x.stride()}")
    if gate is not None and gate_rows is not None:
        raise ValueError("give gate (in x's layout) or gate_rows (in the output's), not both")
    if gate_rows is not None and gate_rows.shape != (index.shape[0], x.shape[0]):
        raise ValueError(f"gate_rows {tuple(gate_rows.shape)} must be {(index.shape[0], x.shape[0])}")
    if out is not None and out.shape != (index.shape[0], x.shape[0]):
        raise ValueError(f"out {tuple(out.shape)} must be {(index.shape[0], x.shape[0])}")
    if not (x.is_cuda and _kernel() is not None):
        x = x if gate is None else silu_gated(x, gate)
        rows = x.index_select(1, index).t()
        rows = rows if gate_rows is None else silu_gated(rows, gate_rows)
        return rows.contiguous() if out is None else out.copy_(rows)
    out = x.new_empty(index.shape[0], x.shape[0]) if out is None else out
    if gate_rows is not None:
        _gather_t(x.t(), index, out, gate_rows, gate_at_out=True)
    else:
        _gather_t(x.t(), index, out, None if gate is None else gate.t())
    return out
