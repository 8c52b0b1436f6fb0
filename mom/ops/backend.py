"""Backend dispatch for the shared sequence mixer: mamba-ssm / causal-conv1d CUDA kernels or pure PyTorch.

The CUDA kernels are used for CUDA tensors when their packages import (``pip install .[cuda]``); everything else
runs the reference implementations in `mom.ops.reference` and here. ``MOM_FORCE_REFERENCE=1`` forces the reference path.
`backend_name(device)` says which backend a tensor on ``device`` gets; the model logs it once and exposes it as
``model.backend``.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mom.ops import reference as ref

logger = logging.getLogger(__name__)

FORCE_REFERENCE_ENV = "MOM_FORCE_REFERENCE"


@cache
def _mamba_ssm():
    """mamba-ssm's selective-scan ops, or None. ``import mamba_ssm`` can fail in many ways without its extension."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception as err:  # ImportError, OSError (missing .so), RuntimeError (CUDA mismatch)
        logger.debug("mamba-ssm unavailable: %s", err)
        return None
    return selective_scan_fn, selective_state_update


class Mamba2Kernels(NamedTuple):
    """mamba-ssm's SSD Triton kernels (`mom.ops.ssd` calls them): ``mamba_chunk_scan_combined`` and
    ``mamba_split_conv1d_scan_combined`` (None without causal-conv1d, whose conv it runs)."""

    chunk_scan: object
    split_conv1d_scan: object | None


@cache
def _mamba2_ssm() -> Mamba2Kernels | None:
    """mamba-ssm's SSD kernels, or None (as `_mamba_ssm`)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
    except Exception as err:
        logger.debug("mamba-ssm SSD kernels unavailable: %s", err)
        return None
    fused = mamba_split_conv1d_scan_combined if _causal_conv1d() is not None else None
    return Mamba2Kernels(mamba_chunk_scan_combined, fused)


def mamba2_kernels(t: torch.Tensor) -> Mamba2Kernels | None:
    """mamba-ssm's SSD kernels for CUDA tensors, or None (run `mom.ops.ssd`'s references)."""
    if not t.is_cuda or force_reference():
        return None
    return _mamba2_ssm()


@cache
def _causal_conv1d():
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception as err:
        logger.debug("causal-conv1d unavailable: %s", err)
        return None
    return causal_conv1d_fn, causal_conv1d_update


@cache
def _layer_norm():
    try:
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
    except Exception as err:
        logger.debug("mamba-ssm Triton layer norm unavailable: %s", err)
        return None
    return layer_norm_fn


def layer_norm_fn(t: torch.Tensor):
    """mamba-ssm's fused add + (RMS/Layer)Norm Triton function for CUDA tensors, or None (use the reference)."""
    if not t.is_cuda or force_reference():
        return None
    return _layer_norm()


def force_reference() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "0").lower() not in ("", "0", "false", "no")


def backend_name(device: torch.device) -> str:
    """'cuda' (mamba-ssm scan, plus '+causal-conv1d' when installed) or 'reference'."""
    if device.type != "cuda" or force_reference() or _mamba_ssm() is None:
        return "reference"
    return "cuda+causal-conv1d" if _causal_conv1d() is not None else "cuda"


def has_mamba_ssm_and_causal_conv1d() -> bool:
    """Whether mamba-ssm's scan and causal-conv1d both import (the fused mixer's CUDA ops need both)."""
    return _mamba_ssm() is not None and _causal_conv1d() is not None


def _use_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda and not force_reference() and _mamba_ssm() is not None


def _use_conv_kernel(t: torch.Tensor) -> bool:
    return t.is_cuda and not force_reference() and _causal_conv1d() is not None


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, reset=None
):
    """Shapes as `mom.ops.reference.selective_scan`; ``reset`` (b, l) bool zeroes the state before those positions."""
    if reset is not None:
        if u.is_cuda:
            _warn_once("document reset runs the pure-PyTorch scan (mamba-ssm's Mamba-1 kernel has no reset)")
        return ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reset=reset)
    if _use_cuda(u):
        fn = _mamba_ssm()[0]
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Shapes as `mom.ops.reference.selective_state_update`; updates ``state`` in place."""
    if _use_cuda(x):
        fn = _mamba_ssm()[1]
        if dt_bias is None:  # mamba-ssm 2.3's Triton kernel dereferences dt_bias unconditionally
            dt_bias = _zeros(x.shape[-1], x.device)
        return fn(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    return ref.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


@cache
def _zeros(n: int, device: torch.device) -> torch.Tensor:
    """(n,) fp32 zeros, made once per size and device (a decode step would otherwise allocate and fill one per
    layer); never written."""
    return torch.zeros(n, device=device, dtype=torch.float32)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reset: torch.Tensor | None = None
) -> torch.Tensor:
    """silu(depthwise causal conv). x: (b, d, l); weight: (d, w); bias: (d,). Returns (b, d, l).

    ``reset`` (b, l) bool: a document starts there, so taps reaching back before it read zeros.
    """
    if reset is not None:
        return _causal_conv1d_segmented(x, weight, bias, reset)
    if _use_conv_kernel(x):
        return _causal_conv1d()[0](x, weight, bias, activation="silu")
    return reference_causal_conv1d(x, weight, bias)


def reference_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(depthwise causal conv) in PyTorch, weights cast to x's dtype. x: (b, d, l); weight: (d, w)."""
    bias = None if bias is None else bias.to(x.dtype)
    y = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), bias, padding=weight.shape[-1] - 1, groups=weight.shape[0])
    return F.silu(y[..., : x.shape[-1]])


def _causal_conv1d_segmented(x, weight, bias, reset):
    """The causal conv with every window cut at the last document start (reference, any device)."""
    width, l = weight.shape[-1], x.shape[-1]
    segment = torch.cumsum(reset.long(), dim=-1)  # (b, l) document number within the row
    y = x * weight[:, -1, None]  # tap 0: the position itself
    for k in range(1, width):  # tap k reads position t - k if it is in the same document
        x_k = F.pad(x[..., : l - k], (k, 0))
        same = F.pad(segment[:, : l - k], (k, 0), value=-1) == segment  # (b, l)
        y = y + x_k * same.unsqueeze(1).to(x.dtype) * weight[:, -1 - k, None]
    if bias is not None:
        y = y + bias[:, None]
    return F.silu(y)


@cache
def _warn_once(message: str) -> None:
    logger.warning("mom: %s", message)


def causal_conv1d_update(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """One step: shift ``conv_state`` (b, d, w) left, append x (b, d), return silu(conv) (b, d)."""
    if _use_conv_kernel(x):
        return _causal_conv1d()[1](x, conv_state, weight, bias, activation="silu")
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    y = (conv_state * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return F.silu(y).to(x.dtype)
