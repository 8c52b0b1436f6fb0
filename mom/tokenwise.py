"""Each token through its own expert's weight, in sequence order: ``out[:, t] = W[ids[t]] @ x[:, t] (+ b[ids[t]])``.

The fast path's small routed projections (x_proj and dt_proj, and their input gradients) run on feature-major
``(features, tokens)`` activations in sequence order, where tokens of one modality are not contiguous. Sorting them
would mean gathering a ``(d_inner, n)`` matrix; running every expert on every token costs M times the FLOPs of a
GEMM whose cost is mostly FLOPs (at d_model 2048, x_proj's M-fold GEMM is ~64 GFLOP against ~21). Here one Triton
kernel tiles the output by (features x 64-128 tokens) and multiplies each tile by the expert of its tokens: modalities
come in runs, so a tile almost always holds one modality; a tile across a boundary runs once per modality it holds
and keeps each token's columns from its own expert's product. Off CUDA (or without Triton): the same sum, one
masked GEMM per expert.
"""

from __future__ import annotations

from functools import cache

import torch


@cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def tokenwise_kernel(w, x, ids, bias, out, O, K, N, s_wm, s_wo, s_wk, s_xk, s_xn, s_oo, s_on, s_bm,
                         BO: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr,
                         ACCUMULATE: tl.constexpr):
        """out[o, t] (+)= sum_k w[ids[t], o, k] x[k, t] (+ bias[ids[t], o]) for the (BO, BN) tile of this program."""
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        offs_o = tl.program_id(1) * BO + tl.arange(0, BO)
        n_ok, o_ok = offs_n < N, offs_o < O
        expert = tl.load(ids + offs_n, mask=n_ok, other=0).to(tl.int32)
        first = tl.min(tl.where(n_ok, expert, 2**30))
        last = tl.max(tl.where(n_ok, expert, -1))
        result = tl.zeros((BO, BN), dtype=tl.float32)
        x_cols = x + offs_n.to(tl.int64)[None, :] * s_xn
        for m in range(first, last + 1):  # the experts of this tile's tokens: one, unless it spans a boundary
            mine = (expert == m) & n_ok
            if tl.max(mine.to(tl.int32)) > 0:
                acc = tl.zeros((BO, BN), dtype=tl.float32)
                w_rows = w + m * s_wm + offs_o.to(tl.int64)[:, None] * s_wo
                for k0 in range(0, K, BK):
                    offs_k = k0 + tl.arange(0, BK)
                    k_ok = offs_k < K
                    a = tl.load(w_rows + offs_k[None, :] * s_wk, mask=o_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(x_cols + offs_k.to(tl.int64)[:, None] * s_xk, mask=k_ok[:, None] & n_ok[None, :],
                                other=0.0)
                    acc = tl.dot(a, b, acc)
                if HAS_BIAS:
                    acc += tl.load(bias + m * s_bm + offs_o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
                result = tl.where(mine[None, :], acc, result)
        ptrs = out + offs_o.to(tl.int64)[:, None] * s_oo + offs_n.to(tl.int64)[None, :] * s_on
        mask = o_ok[:, None] & n_ok[None, :]
        if ACCUMULATE:
            result += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, result.to(out.dtype.element_ty), mask=mask)

    return tokenwise_kernel


def tokenwise_linear(w: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """w (M, O, K), x (K, n), ids (n,) in [0, M), bias (M, O) or None -> (O, n) with column t = w[ids[t]] @ x[:, t]
    (+ bias[ids[t]]), written into ``out`` if given (added to it with ``accumulate``). Any strides; fp32 accumulation.
    """
    M, O, K = w.shape
    n = x.shape[1]
    if x.shape[0] != K or ids.shape != (n,) or (bias is not None and bias.shape != (M, O)):
        raise ValueError(f"tokenwise_linear: w {tuple(w.shape)}, x {tuple(x.shape)}, ids {tuple(ids.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)} do not fit")
    if out is None:
        if accumulate:
            raise ValueError("tokenwise_linear: accumulate needs out")
        out = x.new_empty(O, n)
    if not (x.is_cuda and _kernel() is not None):
        return _reference(w, x, ids, bias, out, accumulate)
    _launch(w, x, ids, bias, out, accumulate)
    return out


def _launch(w, x, ids, bias, out, accumulate: bool) -> None:
    M, O, K = w.shape
    n = x.shape[1]
    if not (n and O):
        return
    if O <= 256:  # few outputs, long K (x_proj, dt_proj's input gradient): the tile holds all O, x is read once
        BO, BN, BK = max(16, 1 << (O - 1).bit_length()), 64, 64
    else:  # many outputs, short K (dt_proj, x_proj's input gradient): bound by writing the output
        BO, BN, BK = 128, 128, 32
    bias = w if bias is None else bias.contiguous()  # (a pointer the kernel does not read without HAS_BIAS)
    grid = (-(-n // BN), -(-O // BO))
    _kernel()[grid](w, x, ids, bias, out, O, K, n, *w.stride(), *x.stride(), *out.stride(), bias.stride(0),
                    BO=BO, BN=BN, BK=BK, HAS_BIAS=bias is not w, ACCUMULATE=accumulate, num_warps=8, num_stages=3)


def _reference(w, x, ids, bias, out, accumulate: bool) -> torch.Tensor:
    """The same, one GEMM per expert on its tokens' columns (CPU, tests)."""
    result = torch.zeros(w.shape[1], x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    for m in range(w.shape[0]):
        cols = (ids == m).nonzero().squeeze(1)
        part = w[m].to(result.dtype) @ x[:, cols].to(result.dtype)
        result[:, cols] = part if bias is None else part + bias[m].to(result.dtype)[:, None]
    if accumulate:
        result += out
    return out.copy_(result)
