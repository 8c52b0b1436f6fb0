"""A grouped GEMM over rows sorted by expert that gathers its input rows or scatters its output rows on the way.

A routed projection on token-major rows (`mom.ops.routed_linear`: the Mamba-2 mixer's in_proj and out_proj) runs
one grouped GEMM over the rows sorted by modality, each expert's block of rows through its weight. When the rows
come in sequence order, or must leave in it, a row gather (``index_select``) crosses between the orders: a full
read and write of the (n, f) activation, about a third of the GEMM's own time at Mamba-2's shapes
(docs/performance.md). This kernel does the crossing inside the GEMM, as fused mixture-of-experts kernels do:

    out[dst(j)] = a[src(j)] @ w[e(j)] (+ bias[e(j)])   for each sorted row j, e(j) its expert

with ``src(j) = a_index[j]`` or ``j``, and ``dst(j) = out_index[j]`` or ``j``. Rows are token-major, so a gathered
row is still one contiguous load along the contraction and a scattered one a contiguous store: only the row
addresses come from the index. On an H100 at Mamba-2's shapes the fused GEMM took 0.65-0.83x the time of the gather
and ``torch._grouped_mm`` together, though 1.03-1.25x the grouped GEMM's alone (docs/performance.md); weight
gradients computed from gathered rows the same way were slower than the gather and cuBLAS, so there is no kernel
for them.

A program computes one (``BM`` rows, ``BN`` outputs) tile of the sorted rows (`Tiles`; `tuned` picks them per
shape). A tile that straddles the end of an
expert's block computes once per expert present, each time with the other experts' rows masked (zero on load,
skipped on store): at most ``experts - 1`` such tiles per call. The blocks' ends are read on the device (``ends``,
`mom.ops.fused.Routes.offsets`): no host sync, so nothing waits on the routing.

Off CUDA, or without Triton, `gathered_mm` is the same maths in PyTorch ops (an ``index_select``, one GEMM per
expert, a scatter), which the tests use as the oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mom.ops.triton.launcher import launch, triton_kernel


@dataclass(frozen=True)
class Tiles:
    """One call's tiling: ``m`` sorted rows x ``n`` outputs per program, ``k`` contraction elements per step,
    ``group`` row tiles visited together (L2 reuse of the weight tiles), Triton's ``warps`` and ``stages``."""

    m: int = 128
    n: int = 128
    k: int = 64
    group: int = 8
    warps: int = 8
    stages: int = 3


DEFAULT_TILES = Tiles()
# The tilings `tuned` tries on a shape's first call (None's tiles): 128 x 128 and 128 x 256 output tiles are the usual
# fast ones of a bf16 GEMM on Hopper; smaller ones fit GPUs with less shared memory and short blocks of rows.
CANDIDATES = (Tiles(128, 128, 64, 8, 4, 4), Tiles(128, 128, 64, 8, 8, 3), Tiles(128, 256, 64, 8, 8, 3),
              Tiles(64, 128, 64, 8, 4, 4), Tiles(128, 64, 64, 8, 4, 4))
_tuned: dict[tuple, Tiles] = {}


def tuned(key: tuple, run: Callable[[Tiles], object]) -> Tiles:
    """The fastest of `CANDIDATES` for ``key`` (a call's shapes, dtypes and flags), timed on the device the first time
    a key is seen (each candidate compiled, then 3 timed runs of ``run(tiles)``, which must be idempotent: it writes
    the same outputs each time; a host sync, once per key). During CUDA-graph capture, or when no candidate
    compiles, `DEFAULT_TILES` (not stored). The pick comes from timings, so two processes may pick differently, and
    results then differ in their last bits (bf16 sums in another order)."""
    tiles = _tuned.get(key)
    if tiles is not None:
        return tiles
    if torch.cuda.is_current_stream_capturing():
        return DEFAULT_TILES
    best = None
    for candidate in CANDIDATES:
        try:
            run(candidate)  # compiles
        except Exception:  # noqa: BLE001 - a tiling this GPU cannot run (shared memory, registers): skip it
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            run(candidate)
        end.record()
        end.synchronize()
        if best is None or start.elapsed_time(end) < best[0]:
            best = (start.elapsed_time(end), candidate)
    if best is None:
        return DEFAULT_TILES
    _tuned[key] = best[1]
    return best[1]


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def gathered_mm_kernel(a, w, bias, ends, a_index, out_index, out, N, K, O, s_a_row, s_a_k, s_w_e, s_w_k, s_w_o,
                           s_b_e, s_out_row, s_out_o, E: tl.constexpr, HAS_BIAS: tl.constexpr,
                           GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, EVEN_K: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
        """out[dst(j), o] = sum_k a[src(j), k] w[e(j), k, o] (+ bias[e(j), o]) for the N sorted rows j, e(j) the
        expert whose block (ends on the device) holds j."""
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(N, BM)
        tiles_n = tl.cdiv(O, BN)
        per_group = GROUP * tiles_n  # GROUP row tiles sweep the output tiles together: weight tiles stay in L2
        first_m = (pid // per_group) * GROUP
        size_m = min(tiles_m - first_m, GROUP)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        row0 = pid_m * BM
        rows = row0 + tl.arange(0, BM)
        row_ok = rows < N
        cols = pid_n * BN + tl.arange(0, BN)
        col_ok = cols < O
        if GATHER_A:
            src = tl.load(a_index + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        if SCATTER_OUT:
            dst = tl.load(out_index + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            dst = rows.to(tl.int64)
        a_rows = a + src[:, None] * s_a_row
        out_at = out + dst[:, None] * s_out_row + cols[None, :].to(tl.int64) * s_out_o
        start = 0
        for e in tl.static_range(E):
            end = tl.load(ends + e)
            if (start < end) & (start < row0 + BM) & (end > row0):  # expert e has rows in this tile
                in_e = row_ok & (rows >= start) & (rows < end)
                w_e = w + e * s_w_e + cols[None, :].to(tl.int64) * s_w_o
                acc = tl.zeros((BM, BN), dtype=tl.float32)
                for k0 in range(0, K, BK):
                    ks = k0 + tl.arange(0, BK)
                    if EVEN_K:
                        a_t = tl.load(a_rows + ks[None, :] * s_a_k, mask=in_e[:, None], other=0.0)
                        w_t = tl.load(w_e + ks[:, None] * s_w_k, mask=col_ok[None, :], other=0.0)
                    else:
                        k_ok = ks < K
                        a_t = tl.load(a_rows + ks[None, :] * s_a_k, mask=in_e[:, None] & k_ok[None, :], other=0.0)
                        w_t = tl.load(w_e + ks[:, None] * s_w_k, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                    acc = tl.dot(a_t, w_t, acc)
                if HAS_BIAS:
                    acc += tl.load(bias + e * s_b_e + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(out_at, acc.to(out.dtype.element_ty), mask=in_e[:, None] & col_ok[None, :])
            start = end

    return gathered_mm_kernel


def kernel_applies(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `gathered_mm` runs the Triton kernel on these operands: CUDA, Triton present, one dtype of 16 bits
    (tl.dot's fast path; other dtypes take the PyTorch ops)."""
    return (a.is_cuda and w.device == a.device and a.dtype == w.dtype
            and a.dtype in (torch.bfloat16, torch.float16) and _kernel() is not None)


def gathered_mm(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, bias: torch.Tensor | None = None,
                a_index: torch.Tensor | None = None, out_index: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, tiles: Tiles | None = None,
                use_kernel: bool | None = None) -> torch.Tensor:
    """A grouped GEMM over ``n`` rows sorted by expert, gathering its input rows and / or scattering its output rows.

    a: (n_a, K) rows (any strides); w: (E, K, O) the experts' weights as ``a @ w[e]`` (any strides: a view of
    stacked (E, O, K) ``nn.Linear`` weights transposed is one); ends: (E,) int32 on a's device, where each expert's
    block of sorted rows ends; bias: (E, O) or None. ``a_index`` (n,) int64: sorted row j reads ``a[a_index[j]]``
    (else ``a[j]``, n_a = n); ``out_index`` (n,) int64: it writes ``out[out_index[j]]`` (else ``out[j]``), a
    permutation of the n rows. -> out (n, O) in ``out_dtype`` (default a's), accumulated in fp32 or wider.

    ``use_kernel``: None runs the Triton kernel where `kernel_applies`, False the PyTorch ops, True requires the
    kernel (Triton's interpreter runs it on CPU tensors). ``tiles``: the kernel's tiling; None: `tuned` per shape
    on CUDA (`DEFAULT_TILES` elsewhere)."""
    E, K, O = w.shape
    n = a_index.shape[0] if a_index is not None else a.shape[0]
    if a.dim() != 2 or a.shape[1] != K:
        raise ValueError(f"gathered_mm: input {tuple(a.shape)} for experts of {K} inputs")
    if tuple(ends.shape) != (E,):
        raise ValueError(f"gathered_mm: ends {tuple(ends.shape)} for {E} experts")
    if bias is not None and tuple(bias.shape) != (E, O):
        raise ValueError(f"gathered_mm: bias {tuple(bias.shape)}, expected {(E, O)}")
    if out_index is not None and out_index.shape[0] != n:
        raise ValueError(f"gathered_mm: out_index of {out_index.shape[0]} rows for {n} sorted rows")
    out_dtype = out_dtype or a.dtype
    if use_kernel is None:
        use_kernel = kernel_applies(a, w)
    if not use_kernel:
        return _reference(a, w, ends, bias, a_index, out_index, out_dtype)
    out = torch.empty(n, O, dtype=out_dtype, device=a.device)
    if n == 0 or O == 0:
        return out
    if K == 0:  # nothing to contract: the bias alone (an empty contraction's sum)
        return out.copy_(_reference(a, w, ends, bias, a_index, out_index, out_dtype))

    def run(t: Tiles) -> None:
        launch(_kernel(), (-(-n // t.m) * -(-O // t.n), 1, 1),
               (a, w, bias if bias is not None else a, ends, a_index if a_index is not None else ends,
                out_index if out_index is not None else ends, out, n, K, O, *a.stride(), *w.stride(),
                bias.stride(0) if bias is not None else 0, *out.stride()),
               {"num_warps": t.warps, "num_stages": t.stages},
               E=E, HAS_BIAS=bias is not None, GATHER_A=a_index is not None, SCATTER_OUT=out_index is not None,
               EVEN_K=K % t.k == 0, BM=t.m, BN=t.n, BK=t.k, GROUP=t.group)

    if tiles is None and a.is_cuda:
        tiles = tuned(("mm", a.device, _bucket(n), K, O, E, a.dtype, out_dtype, bias is not None, a_index is not None,
                       out_index is not None), run)
    run(tiles or DEFAULT_TILES)
    return out


def _bucket(n: int) -> int:
    """Rows rounded up to a power of two: the tuning key's size (the best tiling changes with the order of n)."""
    return 1 << max(n - 1, 0).bit_length()


def _reference(a, w, ends, bias, a_index, out_index, out_dtype) -> torch.Tensor:
    """The same in PyTorch ops (reads ``ends`` on the host): gather, one GEMM per expert in fp32 (or wider), scatter."""
    wide = torch.promote_types(a.dtype, torch.float32)
    rows = a if a_index is None else a.index_select(0, a_index)
    sorted_out = torch.empty(rows.shape[0], w.shape[2], dtype=wide, device=a.device)
    start = 0
    for e, end in enumerate(ends.tolist()):
        block = rows[start:end].to(wide) @ w[e].to(wide)
        sorted_out[start:end] = block if bias is None else block + bias[e].to(wide)
        start = end
    if out_index is None:
        return sorted_out.to(out_dtype)
    out = torch.empty_like(sorted_out, dtype=out_dtype)
    out[out_index] = sorted_out.to(out_dtype)
    return out
