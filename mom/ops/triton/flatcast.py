"""Flatten and cast many tensors in one pass: ``torch.cat([t.reshape(-1) for t in tensors]).to(dtype)``.

The fast path casts all of a mixer's expert weights to the compute dtype at every forward (`mom.ops.fused`). With
PyTorch ops that is a concatenation in the parameters' dtype and then a cast: for fp32 weights cast to bf16, 14 bytes
moved per weight (read 4 + write 4, read 4 + write 2). This Triton kernel reads each tensor where it lives and writes
the cast result into the flat buffer: 6 bytes, and one launch (`python benchmarks/bench_flatcast.py`; the figures:
docs/performance.md). Elsewhere (CPU, no Triton, mixed dtypes or non-contiguous tensors) it is cat + cast.

The kernel reads the tensors through their addresses, kept on the device in a small table that is built once per set
of addresses (copying it there waits for the device, once; the parameters of a model keep their addresses).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from mom.ops.triton.launcher import launch, triton_kernel

BLOCK = 4096  # elements per program: 16 KiB of fp32 read, 8 KiB of bf16 written


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def flat_cast_kernel(addresses, starts, out, SRC: tl.constexpr, BLOCK: tl.constexpr):
        k, j = tl.program_id(0), tl.program_id(1)  # block k of tensor j
        start = tl.load(starts + j)
        size = tl.load(starts + j + 1) - start
        if k * BLOCK < size:
            src = tl.load(addresses + j).to(tl.pointer_type(SRC))
            offs = k * BLOCK + tl.arange(0, BLOCK)
            ok = offs < size
            values = tl.load(src + offs, mask=ok)
            tl.store(out + start + offs, values.to(out.dtype.element_ty), mask=ok)

    return flat_cast_kernel


_TRITON_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}  # triton.language


@functools.lru_cache(maxsize=1024)
def _table(addresses: tuple[int, ...], sizes: tuple[int, ...], device: torch.device):
    """(addresses (k,) int64, starts (k + 1,) int64) on the device, built once per set of tensors."""
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    return (torch.tensor(addresses, dtype=torch.int64, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device))


def flat_cast(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tensors flattened, concatenated and cast to ``dtype``: a new (sum of numels,) tensor."""
    first = tensors[0]
    kernel = _kernel() if first.is_cuda else None
    sizes = tuple(t.numel() for t in tensors)
    usable = (kernel is not None and first.dtype in _TRITON_DTYPES and dtype in _TRITON_DTYPES and max(sizes) > 0
              and all(t.dtype == first.dtype and t.device == first.device and t.is_contiguous() for t in tensors))
    if not usable:
        return torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
    import triton.language as tl

    addresses, starts = _table(tuple(t.data_ptr() for t in tensors), sizes, first.device)
    out = torch.empty(sum(sizes), dtype=dtype, device=first.device)
    grid = (-(-max(sizes) // BLOCK), len(tensors), 1)
    launch(kernel, grid, (addresses, starts, out), SRC=getattr(tl, _TRITON_DTYPES[first.dtype]), BLOCK=BLOCK)
    return out
