"""Flatten and cast many tensors in one pass: ``torch.cat([t.reshape(-1) for t in tensors]).to(dtype)``.

The fast path casts all of a mixer's expert weights to the compute dtype at every forward (`mom.ops.fused`). With
PyTorch ops that is a concatenation in the parameters' dtype and then a cast: for fp32 weights cast to bf16, 14 bytes
moved per weight (read 4 + write 4, read 4 + write 2). This Triton kernel reads each tensor where it lives and writes
the cast result into the flat buffer: 6 bytes, and one launch (`python benchmarks/bench_flatcast.py`; the figures:
docs/performance.md). Elsewhere (CPU, no Triton, mixed dtypes or non-contiguous tensors) it is PyTorch ops.

The kernel reads the tensors through their addresses, kept on the device in a small table that is built once per set
of addresses (copying it there waits for the device, once; the parameters of a model keep their addresses).

A tensor can also go into the buffer as the columns of a matrix (`Place`): the fused path writes dt_proj's experts
and biases side by side as the one (d_inner, k) matrix its GEMM reads, so that this matrix costs no concatenation
(no launch) of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from mom.ops.triton.launcher import launch, triton_kernel

BLOCK = 4096  # elements per program: 16 KiB of fp32 read, 8 KiB of bf16 written


class Place(NamedTuple):
    """Where a tensor goes in the buffer, as rows of ``cols`` elements in its own row-major order: its row i at
    ``start + i * stride``. One run (`flat_cast`'s default) has ``cols`` the tensor's size and ``stride`` 0. (A named
    tuple: the places are part of a cached table's key, hashed at every call.)"""

    start: int
    cols: int
    stride: int


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def flat_cast_kernel(table, out, SRC: tl.constexpr, BLOCK: tl.constexpr):
        """table (5, k) int64: each of the k tensors' address, size, start, columns and row stride (`Place`)."""
        k, j, n = tl.program_id(0), tl.program_id(1), tl.num_programs(1)  # block k of tensor j of n
        size = tl.load(table + n + j)
        if k * BLOCK < size:
            src = tl.load(table + j).to(tl.pointer_type(SRC))
            start, stride = tl.load(table + 2 * n + j), tl.load(table + 4 * n + j)
            offs = k * BLOCK + tl.arange(0, BLOCK)
            ok = offs < size
            values = tl.load(src + offs, mask=ok).to(out.dtype.element_ty)
            if stride == 0:  # one run (the weights): no division per element
                tl.store(out + start + offs, values, mask=ok)
            else:  # rows of cols elements, `stride` apart (dt_proj's columns: small tensors)
                cols = tl.load(table + 3 * n + j).to(tl.int32)
                tl.store(out + start + (offs // cols) * stride + offs % cols, values, mask=ok)

    return flat_cast_kernel


_TRITON_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}  # triton.language


@functools.lru_cache(maxsize=1024)
def _table(addresses: tuple[int, ...], sizes: tuple[int, ...], places: tuple[Place, ...],
           device: torch.device) -> torch.Tensor:
    """(5, k) int64 on the device: addresses, sizes, starts, columns and row strides; built (and the places checked)
    once per set of tensors."""
    _check(sizes, places)
    columns = [addresses, sizes, *zip(*((p.start, p.cols, p.stride) for p in places))]
    return torch.tensor(columns, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=1024)
def runs(sizes: tuple[int, ...]) -> tuple[tuple[Place, ...], int]:
    """The places of tensors of these sizes one after another, and the buffer's size (`flat_cast`'s default); built
    once per set of sizes (a call per forward and layer would loop over them in Python each time)."""
    places, start = [], 0
    for s in sizes:
        places.append(Place(start, max(s, 1), 0))
        start += s
    return tuple(places), start


def flat_cast(tensors: Sequence[torch.Tensor], dtype: torch.dtype, places: Sequence[Place] | None = None,
              size: int | None = None) -> torch.Tensor:
    """The tensors flattened, concatenated and cast to ``dtype``: a new (sum of numels,) tensor. With ``places``
    (one `Place` per tensor) they go where those say in a new (``size``,) tensor; the places must not overlap, and
    elements that none covers are left uninitialised."""
    first = tensors[0]
    sizes = tuple(t.numel() for t in tensors)
    if places is None:
        places, size = runs(sizes)
    elif len(places) != len(tensors) or size is None:
        raise ValueError(f"flat_cast: {len(tensors)} tensors need as many places and a size, got {len(places)} "
                         f"places and size {size}")
    kernel = _kernel() if first.is_cuda else None
    usable = (kernel is not None and first.dtype in _TRITON_DTYPES and dtype in _TRITON_DTYPES and max(sizes) > 0
              and all(t.dtype == first.dtype and t.device == first.device and t.is_contiguous() for t in tensors))
    if not usable:
        return _placed(tensors, dtype, tuple(places), size)
    import triton.language as tl

    table = _table(tuple(t.data_ptr() for t in tensors), sizes, tuple(places), first.device)
    out = torch.empty(size, dtype=dtype, device=first.device)
    grid = (-(-max(sizes) // BLOCK), len(tensors), 1)
    launch(kernel, grid, (table, out), SRC=getattr(tl, _TRITON_DTYPES[first.dtype]), BLOCK=BLOCK)
    return out


def _check(sizes: Sequence[int], places: Sequence[Place]) -> None:
    for i, (s, p) in enumerate(zip(sizes, places)):
        whole_rows = p.cols > 0 and s % p.cols == 0 and (p.stride >= p.cols or (p.stride == 0 and p.cols >= s))
        if not whole_rows:
            raise ValueError(f"flat_cast: tensor {i} of {s} elements cannot go at {p}: rows of cols elements, a stride "
                             f"of at least cols between them (0: one run)")


def _placed(tensors: Sequence[torch.Tensor], dtype: torch.dtype, places: tuple[Place, ...], size: int) -> torch.Tensor:
    """`flat_cast` in PyTorch ops: a cat and a cast where the places are one run after another, else a copy per
    tensor."""
    sizes = tuple(t.numel() for t in tensors)
    _check(sizes, places)
    if (places, size) == runs(sizes):
        return torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
    out = torch.empty(size, dtype=dtype, device=tensors[0].device)
    for t, p, s in zip(tensors, places, sizes):
        if s:
            out.as_strided((s // p.cols, p.cols), (p.stride, 1), p.start).copy_(t.reshape(-1, p.cols))
    return out
