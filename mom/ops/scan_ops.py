"""The conv and the selective scan that the fused mixer (`mom.ops.fused`) runs, forward and backward, as plain ops on
tensors (`ScanOps`): causal-conv1d's and mamba-ssm's CUDA kernels called directly, as ``mamba_inner_fn`` calls them
(`cuda_ops`), or the pure-PyTorch conv and scan (`REFERENCE_OPS`, any device), so that the Function's routing,
layouts and backward are tested on CPU. `runs_on` says whether the CUDA ops serve a tensor."""

from __future__ import annotations

import functools
from typing import Protocol

import torch

from mom.ops import backend
from mom.ops import reference as ref_scan
from mom.ops.triton.gather import silu_gated


class ScanOps(Protocol):
    """The conv and the selective scan, forward and backward, on ``(b, f, l)`` views of feature-major activations."""

    def conv_fwd(self, x, weight, bias):
        """silu(depthwise causal conv): x (b, di, l), weight (di, w), bias (di,) or None -> (b, di, l)."""

    def conv_bwd(self, x, weight, bias, dout, dx):
        """Writes the input gradient into ``dx``; -> (dx, dweight, dbias)."""

    def scan_fwd(self, u, delta, A, B, C, D, z):
        """-> (out, checkpoints, out_z: the gated output, None without z; last_state: the state after the last
        position (b, di, n) fp32, a view of what the scan keeps anyway); B, C: (b, 1, n, l)."""

    def scan_bwd(self, u, delta, A, B, C, D, z, dout, checkpoints, out, dz, recompute_out_z):
        """Writes dz in place; -> (du, ddelta, dA, dB, dC, dD, out_z: the gated output if asked, else None)."""


class CudaScanOps:
    """causal-conv1d and mamba-ssm's selective scan, called directly (as ``mamba_inner_fn`` does)."""

    def __init__(self) -> None:
        import selective_scan_cuda
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function

        self._scan = selective_scan_cuda
        self._conv_fwd, self._conv_bwd = causal_conv1d_fwd_function, causal_conv1d_bwd_function

    def conv_fwd(self, x, weight, bias):
        return self._conv_fwd(x, weight, bias, None, None, None, True)

    def conv_bwd(self, x, weight, bias, dout, dx):
        dx, dweight, dbias, *_ = self._conv_bwd(x, weight, bias, dout, None, None, None, dx, False, True)
        return dx, dweight, dbias

    def scan_fwd(self, u, delta, A, B, C, D, z):
        out, checkpoints, *out_z = self._scan.fwd(u, delta, A, B, C, D, z, None, True)
        # checkpoints (b, di, chunks, 2n): each chunk's end state, interleaved as pairs; the last chunk's odd entries
        # are the final state (as mamba-ssm's selective_scan_fn reads it for return_last_state)
        return out, checkpoints, out_z[0] if z is not None else None, checkpoints[:, :, -1, 1::2]

    def scan_bwd(self, u, delta, A, B, C, D, z, dout, checkpoints, out, dz, recompute_out_z):
        du, ddelta, dA, dB, dC, dD, _, _, *out_z = self._scan.bwd(
            u, delta, A, B, C, D, z, None, dout, checkpoints, out, dz, True, recompute_out_z
        )
        return du, ddelta, dA, dB, dC, dD, out_z[0] if recompute_out_z else None


class ReferenceScanOps:
    """The same ops on the pure-PyTorch conv and scan (any device; backward by autograd on a recompute)."""

    def conv_fwd(self, x, weight, bias):
        return backend.reference_causal_conv1d(x, weight, bias)

    def conv_bwd(self, x, weight, bias, dout, dx):
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        with torch.enable_grad():
            y = backend.reference_causal_conv1d(*leaves)
            grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dout)
        dx.copy_(grads[0])
        return dx, grads[1], grads[2] if bias is not None else None

    @staticmethod
    def _scan(u, delta, A, B, C, D, z, return_last_state=False):
        return ref_scan.selective_scan(u, delta, A, B[:, 0], C[:, 0], D, z, delta_softplus=True,
                                       return_last_state=return_last_state)

    def scan_fwd(self, u, delta, A, B, C, D, z):
        """The ungated output too (as the CUDA scan's), gated as `mom.ops.triton.gather.gather_cols_t` gates it."""
        out, last_state = self._scan(u, delta, A, B, C, D, None, return_last_state=True)
        return out, None, silu_gated(out, z) if z is not None else None, last_state

    def scan_bwd(self, u, delta, A, B, C, D, z, dout, checkpoints, out, dz, recompute_out_z):
        leaves = [t.detach().requires_grad_() for t in (u, delta, A, B, C, D, z)]
        with torch.enable_grad():
            out_z = self._scan(*leaves)
            du, ddelta, dA, dB, dC, dD, dz_ = torch.autograd.grad(out_z, leaves, dout)
        dz.copy_(dz_)
        return du, ddelta, dA, dB, dC, dD, out_z.detach() if recompute_out_z else None


REFERENCE_OPS = ReferenceScanOps()


@functools.cache
def cuda_ops() -> CudaScanOps | None:
    """The CUDA ops when both packages import (the fast path needs causal-conv1d's backward too), else None."""
    if not backend.has_mamba_ssm_and_causal_conv1d():
        return None
    try:
        return CudaScanOps()
    except Exception:  # an extension that does not load (missing .so, CUDA mismatch)
        return None


def runs_on(t: torch.Tensor) -> bool:
    """Whether the CUDA ops serve tensors like ``t``: on CUDA, both packages load and the reference is not forced
    (``MOM_FORCE_REFERENCE``). The caller decides the rest (which mixers, which forwards)."""
    return t.is_cuda and not backend.force_reference() and cuda_ops() is not None
