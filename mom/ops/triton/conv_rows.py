"""The causal depthwise conv read straight from a routed in_proj's sorted rows: gather and conv in one pass.

A forward without backward (generation's prefill) with a routed in_proj has x in in_proj's token-major rows, sorted
by modality; the conv and the scan read feature-major ``(f, n)`` columns in sequence order. `conv_rows_t` loads
each output tile's window of rows through the routing's inverse permutation and writes ``silu(conv(x) + bias)``
feature-major: one read and one write of x, where a gather into sequence order followed by causal-conv1d read and
wrote it twice each (and took two launches). It also writes the conv's window, the recurrent state a decode step
reads, when given one. A training forward keeps the gather: its backward reads x in sequence order.

A program computes a tile of 32 positions of one sequence x 128 features: for each of the conv's ``w`` taps it loads
the 32 rows that tap reads (contiguous features, so each row's load is coalesced; neighbouring taps' rows hit the
cache), accumulates in fp32 as causal-conv1d does, adds the bias, applies silu and stores the tile transposed
(Triton goes through shared memory), so the output's stores run along its contiguous tokens. The window is written
by one more program per sequence (and tile of features) of the same launch, so that the conv's tiles carry no code
for it (a masked store in every tile cost a fifth of the kernel's time: docs/performance.md). Elsewhere (CPU, no
Triton) it is a gather and `mom.ops.backend.reference_causal_conv1d`.
"""

from __future__ import annotations

import torch

from mom.ops import backend
from mom.ops.triton.launcher import launch, triton_kernel

# positions x features per program: the fastest of the tiles compared at 16 and 64 x 2048 tokens on an H100
# (docs/performance.md, twenty-fifth session)
TILE_L, TILE_F = 32, 128
WARPS = 4  # Triton's default
INT32_MAX = 2**31 - 1


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def conv_rows_kernel(src, index, weight, bias, keep, out, window, L, F, n, s_src, s_w_feat, s_w_tap, s_win_b,
                         s_win_feat, s_win_tap, W: tl.constexpr, BL: tl.constexpr, BF: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_WINDOW: tl.constexpr, WP: tl.constexpr,
                         EVEN_L: tl.constexpr, EVEN_F: tl.constexpr, I32: tl.constexpr):
        """out[f, r * L + p] = silu(bias[f] + sum_k weight[f, k] * src[index[r * L + p - (W - 1 - k)], f]) (taps before
        the sequence's start read zeros), times keep[r * L + p] if HAS_KEEP; window[r, f, j] = the input at position
        L - W + j if HAS_WINDOW (slots before the start are left as they are). EVEN_L / EVEN_F: L / F are multiples of
        the tile's (no bounds masks); I32: every offset fits in 32 bits (cheaper address arithmetic)."""
        tiles = tl.cdiv(L, BL)
        n_conv = (n // L) * tiles
        feats = tl.program_id(1) * BF + tl.arange(0, BF)
        feat_ok = feats < F
        if not I32:
            feats = feats.to(tl.int64)
        if tl.program_id(0) >= n_conv:  # one extra program per sequence (HAS_WINDOW only): its last W inputs
            seq = tl.program_id(0) - n_conv
            win_j = tl.arange(0, WP)
            win_p = L - W + win_j
            win_ok = (win_j < W) & (win_p >= 0)
            win_row = tl.load(index + seq * L + win_p, mask=win_ok, other=0)
            if I32:
                win_row = win_row.to(tl.int32)
            else:
                win_row = win_row.to(tl.int64)
            win_x = tl.load(src + (win_row * s_src)[:, None] + feats[None, :], mask=win_ok[:, None] & feat_ok[None, :])
            slot = window + seq * s_win_b + (feats * s_win_feat)[None, :] + (win_j * s_win_tap)[:, None]
            tl.store(slot, win_x.to(window.dtype.element_ty), mask=win_ok[:, None] & feat_ok[None, :])
        else:
            seq = tl.program_id(0) // tiles
            pos = (tl.program_id(0) % tiles) * BL + tl.arange(0, BL)
            acc = tl.zeros((BL, BF), dtype=tl.float32)
            for k in tl.static_range(W):  # tap k reads position pos - (W - 1 - k)
                p = pos - (W - 1 - k)
                ok = (p >= 0) & (p < L)
                row = tl.load(index + seq * L + p, mask=ok, other=0)
                if I32:
                    row = row.to(tl.int32)
                else:
                    row = row.to(tl.int64)
                at = src + (row * s_src)[:, None] + feats[None, :]
                if EVEN_L and k == W - 1:  # the current positions: all inside the sequence
                    if EVEN_F:
                        x = tl.load(at)
                    else:
                        x = tl.load(at, mask=feat_ok[None, :], other=0.0)
                elif EVEN_F:
                    x = tl.load(at, mask=ok[:, None], other=0.0)
                else:
                    x = tl.load(at, mask=ok[:, None] & feat_ok[None, :], other=0.0)
                if EVEN_F:
                    w_k = tl.load(weight + feats * s_w_feat + k * s_w_tap)
                else:
                    w_k = tl.load(weight + feats * s_w_feat + k * s_w_tap, mask=feat_ok, other=0.0)
                acc += x.to(tl.float32) * w_k.to(tl.float32)[None, :]
            if HAS_BIAS:
                if EVEN_F:
                    acc += tl.load(bias + feats).to(tl.float32)[None, :]
                else:
                    acc += tl.load(bias + feats, mask=feat_ok, other=0.0).to(tl.float32)[None, :]
            # silu in fp32, rounded once (as causal-conv1d): exp(-a) as exp2(-a log2(e)), the GPU's exp2 instruction,
            # and the fast division (a few ulp of fp32)
            y = tl.fdiv(acc, 1.0 + tl.exp2(acc * -1.4426950408889634), ieee_rounding=False)
            tok = seq * L + pos
            if not I32:
                tok = tok.to(tl.int64)
            pos_ok = pos < L
            if HAS_KEEP:
                if EVEN_L:
                    y = y * tl.load(keep + tok).to(tl.float32)[:, None]
                else:
                    y = y * tl.load(keep + tok, mask=pos_ok, other=0.0).to(tl.float32)[:, None]
            at = out + (feats * n)[None, :] + tok[:, None]
            if EVEN_L and EVEN_F:
                tl.store(at, y.to(out.dtype.element_ty))
            else:
                tl.store(at, y.to(out.dtype.element_ty), mask=pos_ok[:, None] & feat_ok[None, :])

    return conv_rows_kernel


def write_window(window: torch.Tensor, x: torch.Tensor) -> None:
    """window (b, f, w) <- the last w columns of x (b, f, l), left-padded with zeros when l < w: the conv's recurrent
    state, the window a decode step reads (`mom.ops.backend.causal_conv1d_update`)."""
    w, l = window.shape[-1], x.shape[-1]
    if l >= w:
        window.copy_(x[..., l - w :])
    else:
        window[..., : w - l].zero_()
        window[..., w - l :].copy_(x)


def conv_rows_t(rows: torch.Tensor, index: torch.Tensor, length: int, weight: torch.Tensor,
                bias: torch.Tensor | None, keep: torch.Tensor | None = None,
                window: torch.Tensor | None = None) -> torch.Tensor:
    """silu(depthwise causal conv) of ``rows[index]`` read as ``b = n // length`` sequences, feature-major.

    rows (m, f) token-major, any row stride (x's half of in_proj's rows); index (n,) int64: each sequence-order
    token's row; weight (f, w), bias (f,) or None; keep (n,) in sequence order (1 for real tokens, 0 for padding,
    multiplied into the output) or None; window (b, f, w) or None: written with the last w inputs of each sequence
    (`write_window`). -> (f, n) contiguous, in rows' dtype.
    """
    n, f = index.shape[0], rows.shape[1]
    if length <= 0 or n % length:
        raise ValueError(f"conv_rows_t: {n} tokens are not whole sequences of length {length}")
    if weight.shape[0] != f or weight.dim() != 2:
        raise ValueError(f"conv_rows_t: weight {tuple(weight.shape)} must be ({f}, width)")
    b, w = n // length, weight.shape[1]
    if window is not None and window.shape != (b, f, w):
        raise ValueError(f"conv_rows_t: window {tuple(window.shape)} must be {(b, f, w)}")
    if rows.stride(1) != 1 or not (rows.is_cuda and _kernel() is not None):
        x = rows.index_select(0, index).t().reshape(f, b, length).permute(1, 0, 2)  # (b, f, l)
        if window is not None:
            write_window(window, x)
        y = backend.reference_causal_conv1d(x, weight, bias)
        if keep is not None:
            y = y * keep.view(b, 1, length).to(y.dtype)
        return y.permute(1, 0, 2).reshape(f, n).contiguous()
    return _launch(rows, index, length, weight, bias, keep, window)


def _launch(rows: torch.Tensor, index: torch.Tensor, length: int, weight: torch.Tensor, bias: torch.Tensor | None,
            keep: torch.Tensor | None, window: torch.Tensor | None, i32: bool | None = None) -> torch.Tensor:
    """`conv_rows_t`'s kernel on checked arguments (also in Triton's interpreter, on CPU tensors: the tests); ``i32``:
    32-bit offsets (default: where every offset fits)."""
    n, f = index.shape[0], rows.shape[1]
    b, w = n // length, weight.shape[1]
    out = rows.new_empty(f, n)
    if not (n and f):
        return out
    if window is not None and length < w:
        window[..., : w - length].zero_()
    if i32 is None:
        extents = (rows.shape[0] * rows.stride(0), f * n, weight.shape[0] * weight.stride(0),
                   0 if window is None else window.shape[0] * window.stride(0))
        i32 = max(extents) <= INT32_MAX
    # the conv's tiles, then one program per sequence and tile of features for the window, if any
    grid = (b * -(-length // TILE_L) + (b if window is not None else 0), -(-f // TILE_F), 1)
    win_strides = (0, 0, 0) if window is None else window.stride()
    launch(_kernel(), grid, (rows, index, weight, out if bias is None else bias, out if keep is None else keep, out,
                             out if window is None else window, length, f, n, rows.stride(0), *weight.stride(),
                             *win_strides),
           {"num_warps": WARPS}, W=w, BL=TILE_L, BF=TILE_F, HAS_BIAS=bias is not None, HAS_KEEP=keep is not None,
           HAS_WINDOW=window is not None, WP=1 << (w - 1).bit_length(), EVEN_L=length % TILE_L == 0,
           EVEN_F=f % TILE_F == 0, I32=i32)
    return out
