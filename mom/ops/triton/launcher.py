"""Launching our Triton kernels with less host time than ``kernel[grid](...)``.

A small LM's training step can be bound by the host's kernel-launch rate (docs/performance.md), and Triton's JIT
launch does per call what only matters once: it binds the arguments, computes their specialisation (each integer's
divisibility by 16 and whether it is 1, each pointer's 16-byte alignment, the dtypes), hashes that into a cache
key and checks the kernel's globals: a JIT launch costs about twice the host time of the compiled kernel's own
launcher (the figures: docs/performance.md).

`launch` calls the JIT once per distinct key, keeps the compiled kernel it returns, and launches that directly
afterwards. The key holds every integer argument's value and every tensor's dtype and alignment, so every
specialisation Triton could make is a function of it, and so is the compiled kernel. Where this Triton's
compiled-kernel launcher takes its arguments differently (it is not a public API), the first direct launch raises
before anything runs and every launch goes through the JIT from then on.

`triton_kernel` builds a module's kernel on first use, so that Triton is imported only where it runs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

_compiled: dict[tuple, object] = {}
_MAX_KEYS = 4096  # distinct (kernel, shapes, strides) seen; a bound for runs whose shapes keep changing
_direct = True  # False once this Triton's compiled-kernel launcher rejected a call
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the tests), chosen at start


def launch(kernel, grid: tuple[int, int, int], args: tuple, options: dict | None = None, **constexprs) -> None:
    """``kernel[grid](*args, **constexprs, **options)``; ``args``: tensors and ints (the kernel's leading parameters,
    in order), ``constexprs``: its trailing ``tl.constexpr`` parameters, in order; ``options``: Triton's compile
    options (``num_warps``, ``num_stages``), part of the key. Under Triton's interpreter every launch goes through
    the JIT."""
    launch_values(kernel, grid, (*args, *constexprs.values()), options)


def launch_values(kernel, grid: tuple[int, int, int], values: tuple, options: dict | None = None) -> None:
    """``kernel[grid](*values, **options)`` with ``values`` every parameter of the kernel, in order: tensors, ints,
    floats, None and ``tl.constexpr`` values (the form `mom.ops.triton.rebind` launches a library's kernels in)."""
    global _direct
    options = options or {}
    if not _direct or _INTERPRETED:
        kernel[grid](*values, **options)
        return
    key = (kernel, torch.cuda.current_device(), *sorted(options.items()),
           *[v if type(v) is int else _specialisation(v) for v in values])  # ints, most values, inline: less time
    compiled = _compiled.get(key)
    if compiled is not None:
        try:
            compiled[grid](*values)
            return
        except TypeError:  # an argument convention this version's launcher does not take: checked before launching
            _direct = False
    if len(_compiled) >= _MAX_KEYS:
        _compiled.clear()
    _compiled[key] = kernel[grid](*values, **options)


def _specialisation(value) -> object:
    """What of an argument Triton may compile into its kernel: a tensor's dtype and alignment, an integer's value
    (covering its divisibility by 16 and whether it is 1; `launch_values` keeps plain ints as they are), a
    constexpr's value; a float is passed, not specialised."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16
    return float if isinstance(value, float) else value


def triton_kernel(build: Callable) -> Callable[[], object]:
    """Decorates ``build(triton, tl)``, which defines and returns a module's ``@triton.jit`` kernel, into a cached
    ``() -> kernel``, or ``() -> None`` where Triton is not installed (the module then runs its PyTorch ops). Triton
    is imported on the first call only, so that importing ``mom`` never needs it."""

    @functools.cache
    def kernel():
        try:
            import triton
            import triton.language as tl
        except ImportError:
            return None
        return build(triton, tl)

    return kernel
