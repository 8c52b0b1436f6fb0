"""Routed GEMMs over rows sorted by expert: each expert's block of rows through its own weight.

The fused mixer (`mom.ops.fused`) and the routed linear (`mom.ops.routed_linear`) run their routed projections, and
the projections' weight gradients, here. Where the blocks' sizes are not known on the host, ONE ``torch._grouped_mm``
groups the rows by the blocks' ends on the device (nothing waits to read them); where they are known (`HostCounts`),
large GEMMs (`PER_EXPERT_MACS`) and weight gradients run one cuBLAS GEMM per expert, which writes an fp32 result from
its accumulator (no cast kernel). The measurements behind the choices: docs/performance.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch


class HostCounts:
    """Tokens per expert on the host (the sizes of the experts' blocks of sorted tokens), once known.

    The fused mixer runs without them: its routed GEMMs group the rows by the blocks' ends on the device
    (`mom.ops.fused.Routes.offsets`, ``torch._grouped_mm``) where that applies. The GEMMs that run per expert where
    the counts are known (`PER_EXPERT_MACS`, the weight gradients) or must (dtypes and layouts ``torch._grouped_mm``
    does not take) read them here. They are known once given (`set`: counted on the host by the caller) or read
    (`read`: ``reader``, a host sync, called the first time only): a backward finds them known when its forward's
    caller read them after the forward was enqueued (the model's deferred input checks read them in their one sync).
    """

    def __init__(self, reader: Callable[[], Sequence[int]] | None = None, counts: Sequence[int] | None = None) -> None:
        if reader is None and counts is None:
            raise ValueError("HostCounts: give the counts or a reader of them")
        self.reader = reader
        self._counts = None if counts is None else tuple(int(c) for c in counts)
        self._blocks: tuple[tuple[int, int], ...] | None = None  # from _counts, built once (read at every GEMM)

    @property
    def known(self) -> tuple[int, ...] | None:
        """The counts if known, without reading them."""
        return self._counts

    def set(self, counts: Sequence[int]) -> None:
        self._counts = tuple(int(c) for c in counts)
        self._blocks = None

    def read(self) -> tuple[int, ...]:
        """The counts; the first time, unless given, from ``reader`` (then dropped, with what it holds)."""
        if self._counts is None:
            self.set(self.reader())
            self.reader = None
        return self._counts

    def blocks(self, read: bool = False) -> tuple[tuple[int, int], ...] | None:
        """(start, end) of each expert's block of sorted tokens; None while unknown unless ``read``."""
        counts = self.read() if read else self._counts
        if counts is None:
            return None
        if self._blocks is None:
            ends = [sum(counts[: m + 1]) for m in range(len(counts))]
            self._blocks = tuple((end - c, end) for end, c in zip(ends, counts))
        return self._blocks


def grouped_gemm(rows: torch.Tensor, w: torch.Tensor | Sequence[torch.Tensor],
                 b: torch.Tensor | Sequence[torch.Tensor] | None, blocks, offsets: torch.Tensor,
                 out_dtype: torch.dtype | None = None):
    """Each expert's block of (sorted) rows through its weight: ``out[s] = rows[s] @ w[m] (+ b[m])`` for block s of
    expert m, in ``out_dtype`` (default rows'). rows (n, i), w (k, i, o) stacked or a sequence of k (i, o) matrices
    (the experts' own weights: per-expert GEMMs only), b (k, o) or k (o,) or None, any strides -> (n, o); a shared
    projection (k = 1, one block) is one GEMM. ``blocks``: each expert's (start, end) on the host, or None where they
    are not known there.

    ONE launch for routed ones, ``torch._grouped_mm`` with the blocks' ends on the device (``offsets``), where it
    applies (`grouped_mm_applies`: stacked weights) and either the blocks are unknown (whatever the size: a bias is
    then added by a GEMM with the rows' one-hot, another ``out_dtype`` by a cast) or the GEMM does not run per expert
    (`per_expert`); else one cuBLAS GEMM per expert over ``blocks``, which writes an fp32 ``out_dtype`` from its
    accumulator (no cast kernel)."""
    out_dtype = out_dtype or rows.dtype
    n, i = rows.shape
    o = w[0].shape[-1]
    stacked = isinstance(w, torch.Tensor)
    alone = not per_expert(n * i * o, b is not None, out_dtype != rows.dtype)
    if len(w) > 1 and (blocks is None or alone) and stacked and grouped_mm_applies(rows, w):
        out = torch._grouped_mm(rows, w, offs=offsets)
        if b is not None:
            out.addmm_(sorted_onehot(offsets, n, out.dtype), b)
        return out.to(out_dtype)
    if blocks is None:
        raise ValueError("grouped_gemm: the experts' blocks are unknown on the host and torch._grouped_mm does not "
                         f"take these operands (rows {tuple(rows.stride())} {rows.dtype}, weights "
                         f"{w.dtype if stacked else 'per expert'})")
    out = rows.new_empty(n, o, dtype=out_dtype)
    for m, (lo, hi) in enumerate(blocks):
        if hi > lo:
            if b is None:
                mm_as(rows[lo:hi], w[m], out_dtype, out=out[lo:hi])
            else:
                torch.addmm(b[m], rows[lo:hi], w[m], out=out[lo:hi])
    return out


def grouped_rows(rows: torch.Tensor, w: torch.Tensor | Sequence[torch.Tensor],
                 b: torch.Tensor | Sequence[torch.Tensor] | None, counts: HostCounts,
                 offsets: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A routed projection's GEMM on rows sorted by expert (`grouped_gemm`): rows (n, i), w (k, i, o), b (k, o) or None
    -> (n, o), with the blocks ``counts`` knows; unknown ones are read (a host sync) only where ``torch._grouped_mm``
    cannot group the rows on the device. (Also the GEMMs of `mom.ops.routed_linear`.)"""
    on_device = counts.known is None and isinstance(w, torch.Tensor) and grouped_mm_applies(rows, w)
    return grouped_gemm(rows, w, b, counts.blocks(read=not on_device), offsets, out_dtype)


def sorted_onehot(offsets: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, k) in ``dtype``: a one in each sorted row's expert's column, from the blocks' ends on the device."""
    pos = torch.arange(n, device=offsets.device)[:, None]
    ends = offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    return ((pos >= starts) & (pos < ends)).to(dtype)


# Multiply-adds of a routed GEMM from which its experts run as one cuBLAS GEMM each instead of one grouped GEMM
# (CUTLASS) where the counts are known: per-expert GEMMs were faster for a prefill's in_proj and out_proj at d_model
# 768 (2^35.2 to 2^38.2 multiply-adds) and d_model 2048's training shapes, and the same for the layer and the LM
# steps at d_model 768-1024 (2^34 to 2^36); the measurements: docs/performance.md.
PER_EXPERT_MACS = 2**35


def per_expert(macs: int, has_bias: bool, casts: bool) -> bool:
    """Whether a routed GEMM of ``macs`` multiply-adds runs one cuBLAS GEMM per expert where the blocks are known:
    large ones (`PER_EXPERT_MACS`), and those ``torch._grouped_mm`` cannot finish alone (a bias, an output dtype
    other than the rows')."""
    return has_bias or casts or macs >= PER_EXPERT_MACS


def grouped_mm_applies(rows: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands without a host sync (`grouped_mm_supported`): bases 16-byte
    aligned, one unit stride in the last two dimensions and the other a multiple of 16 bytes, inner and output sizes
    multiples of 16 bytes; rows (n, i) row-major (with transposed rows, CUDA's version device-asserts unless every
    block is a multiple of 8 rows), w (k, i, o). (Asked at every routed GEMM: plain arithmetic, no helpers.)"""
    (row_stride, unit), (w_a, w_b) = rows.stride(), w.stride()[1:]
    size, w_size = rows.element_size(), w.element_size()
    if unit != 1 or (w_a != 1 and w_b != 1) or rows.data_ptr() % 16 or w.data_ptr() % 16:
        return False
    if (rows.shape[1] * size) % 16 or (w.shape[2] * size) % 16 or (row_stride * size) % 16:
        return False
    return (max(w_a, w_b) * w_size) % 16 == 0 and grouped_mm_supported(rows.device, rows.dtype, w.dtype)


def grouped_mm_k_applies(d_cols: torch.Tensor, x_rows: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes d_cols (o, n) and x_rows (n, i) grouped along the n tokens, the contraction
    (a weight gradient per expert), without a host sync: each with the tokens as its strided dimension (so that every
    block starts on a 16-byte boundary) and the other unit-strided, strides, sizes and bases 16-byte aligned."""
    if d_cols.stride(0) != 1 or x_rows.stride(1) != 1:
        return False
    o, i = d_cols.shape[0], x_rows.shape[1]
    aligned = _aligned(d_cols, d_cols.stride(1), o) and _aligned(x_rows, x_rows.stride(0), i)
    return aligned and grouped_mm_supported(d_cols.device, d_cols.dtype, x_rows.dtype)


def _aligned(t: torch.Tensor, *sizes: int) -> bool:
    """Whether ``t``'s base and every one of ``sizes`` (elements) are multiples of 16 bytes."""
    return t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in sizes)


@functools.cache
def grouped_mm_supported(device: torch.device, dtype: torch.dtype, other: torch.dtype) -> bool:
    """Whether this torch has ``torch._grouped_mm`` for ``dtype`` on this device without a host sync: on CUDA bf16
    only (its CUTLASS kernels; other dtypes fall back to a loop over the groups that reads their ends on the host),
    elsewhere what it accepts (the CPU's loop reads memory it already holds). Builds differ by version and GPU
    architecture: tried once on tiny operands, per device and dtype."""
    if not hasattr(torch, "_grouped_mm") or other != dtype or (device.type == "cuda" and dtype != torch.bfloat16):
        return False
    rows = torch.zeros(8, 8, dtype=dtype, device=device)
    offs = torch.full((1,), 8, dtype=torch.int32, device=device)
    try:
        torch._grouped_mm(rows, torch.zeros(1, 8, 8, dtype=dtype, device=device), offs=offs)
        torch._grouped_mm(rows.t(), rows, offs=offs)  # grouped along the contraction (weight gradients)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def weight_grads(d_cols, x_cols, blocks, has_bias: bool, dtype: torch.dtype, offsets: torch.Tensor | None = None):
    """Per expert block s: dW_m = d[:, s] @ x[:, s]^T, db_m = d[:, s].sum(1) (zero for an empty block), stacked, in
    ``dtype``: -> (dW (k, o, i), db (k, o) or None). d_cols (o, n), x_cols (i, n). ``blocks``: each expert's
    (start, end) on the host, one GEMM each (cuBLAS writes an fp32 ``dtype`` from its accumulator); None where they
    are not known there: ONE ``torch._grouped_mm`` grouped along the tokens by the blocks' ends on the device
    (``offsets``; `grouped_mm_k_applies`), in the operands' dtype then cast, db by a GEMM with the rows' one-hot."""
    if blocks is None:
        g_w = torch._grouped_mm(d_cols, x_cols.t(), offs=offsets)  # (k, o, i)
        # an empty block's gradient is zero, whatever a kernel leaves there (its output is not initialised)
        starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])
        g_w.masked_fill_((offsets == starts).view(-1, 1, 1), 0)
        g_b = mm_as(d_cols, sorted_onehot(offsets, d_cols.shape[1], d_cols.dtype), dtype).t() if has_bias else None
        return contiguous_as(g_w, dtype), None if g_b is None else contiguous_as(g_b, dtype)
    g_w = d_cols.new_empty(len(blocks), d_cols.shape[0], x_cols.shape[0], dtype=dtype)
    g_b = d_cols.new_empty(len(blocks), d_cols.shape[0], dtype=dtype) if has_bias else None
    for m, (lo, hi) in enumerate(blocks):
        d = d_cols[:, lo:hi]
        mm_as(d, x_cols[:, lo:hi].t(), dtype, out=g_w[m])
        if g_b is not None:
            torch.sum(d, 1, dtype=dtype, out=g_b[m])
    return g_w, g_b


def grouped_weight_grads(d_cols: torch.Tensor, x_rows: torch.Tensor, has_bias: bool, counts: HostCounts,
                         dtype: torch.dtype, offsets: torch.Tensor):
    """A routed projection's (dW (k, o, i), db (k, o) or None) in ``dtype`` (`weight_grads`): d_cols (o, n) and its
    input x_rows (n, i), both over rows sorted by expert, with the blocks ``counts`` knows; unknown ones are read (a
    host sync) only where ``torch._grouped_mm`` cannot group the tokens on the device. (Also the weight gradients of
    `mom.ops.routed_linear`.)"""
    on_device = counts.known is None and grouped_mm_k_applies(d_cols, x_rows)
    return weight_grads(d_cols, x_rows.t(), counts.blocks(read=not on_device), has_bias, dtype, offsets)


def mm_as(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` in ``dtype`` (into ``out`` if given). For fp32 weight gradients of bf16/fp16 operands on CUDA,
    cuBLAS writes its fp32 accumulator directly: no rounding to bf16 and no cast kernel. Otherwise a cast."""
    if dtype == a.dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=dtype) if out is None else torch.mm(a, b, out_dtype=dtype, out=out)
    result = torch.mm(a, b).to(dtype)
    return result if out is None else out.copy_(result)


def contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, contiguous (a parameter's gradient must match its layout), in one copy at most. (``to``
    with a memory format returns ``t`` itself, whatever its strides, when the dtype is already ``dtype``.)"""
    return t.contiguous() if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)
