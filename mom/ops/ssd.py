"""The SSD scan of Mamba-2 (Dao & Gu 2024): pure-PyTorch references, and dispatch to mamba-ssm's Triton kernels.

Per head h (``nheads = d_inner / headdim``; heads share B and C within each of ``ngroups`` groups), with
Δ = softplus(dt + dt_bias) (b, l, h) and a scalar decay A[h] < 0 per head::

    state_t = exp(Δ_t A) state_{t-1} + Δ_t x_t B_tᵀ       # (headdim, d_state) per head
    y_t     = state_t C_t + D x_t

`ssd_chunked` computes it in chunks of ``chunk_size`` (mamba-ssm's ``ssd_minimal_discrete``: quadratic within a
chunk, the state passed between chunks); `ssd_sequential` is the loop above, the tests' oracle; `ssd_step` is one
recurrent step (decoding). ``reset`` (b, l) bool starts a document: the state before it is dropped (mamba-ssm's
``seq_idx`` does the same in its kernels, `seq_idx_of`).

`ssd_scan`, `ssd_state_update` and `split_conv1d_scan` run mamba-ssm's kernels on CUDA when they import
(`mom.ops.backend.mamba2_kernels`), the references otherwise. The two scans call copies of mamba-ssm's functions
that launch its autotuned Triton kernels directly once tuned (`mom.ops.triton.rebind`: the same kernels and configs,
less host time per launch; about twenty launches in a layer's training step); ``MOM_DIRECT_LAUNCH=0`` calls
mamba-ssm's functions as it ships them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mom.ops import backend
from mom.ops.triton.rebind import launched


def _prepare(x, dt, A, B, C, dt_bias, dt_softplus):
    """fp32 copies, Δ activated, B and C repeated to every head: x (b, l, h, p), Δ (b, l, h), B, C (b, l, h, n)."""
    h, g = x.shape[2], B.shape[2]
    if h % g:
        raise ValueError(f"ssd: {h} heads cannot be split into {g} groups")
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    B = B.float().repeat_interleave(h // g, dim=2)
    C = C.float().repeat_interleave(h // g, dim=2)
    return x.float(), dt, A.float(), B, C


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> (..., T, T): out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the diagonal (the stable
    form of ``ssd_minimal.segsum``: sums of the terms themselves, not differences of a cumulative sum)."""
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # (..., T, T): column j holds a
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(a.masked_fill(~strict, 0), dim=-2)
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~lower, float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False, reset=None, initial_state=None):
    """The chunked SSD scan in PyTorch. x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,);
    dt_bias: (h,); reset: (b, l) bool; initial_state: (b, h, p, n). -> (y (b, l, h, p) in x's dtype, final state
    (b, h, p, n) fp32). Computed in fp32."""
    dtype = x.dtype
    b, l, h, p = x.shape
    xf, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)
    n = B.shape[-1]
    segment = torch.zeros(b, l, dtype=torch.long, device=x.device) if reset is None else reset.long().cumsum(-1)
    Q = chunk_size
    pad = (-l) % Q
    if pad:  # Δ = 0 on padding: the state passes through unchanged, nothing is added
        xf, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xf, dt, B, C))
        segment = torch.cat([segment, segment[:, -1:].expand(b, pad)], dim=1)
    c = (l + pad) // Q
    xc, Bc, Cc = (t.reshape(b, c, Q, h, -1) for t in (xf, B, C))  # (b, c, Q, h, .)
    dA = (dt * A).reshape(b, c, Q, h).permute(0, 3, 1, 2)  # (b, h, c, Q), <= 0
    dtc = dt.reshape(b, c, Q, h)
    seg = segment.reshape(b, c, Q)
    A_cum = torch.cumsum(dA, dim=-1)  # (b, h, c, Q)
    # 1. within each chunk: y_t += sum_{s <= t, same document} C_t.B_s exp(sum_{s < k <= t} dA_k) Δ_s x_s
    same = (seg[..., :, None] == seg[..., None, :]).unsqueeze(1)  # (b, 1, c, Q, Q)
    L = torch.exp(_segsum(dA)) * same
    y = torch.einsum("bclhn,bcshn,bhcls,bcsh,bcshp->bclhp", Cc, Bc, L, dtc, xc)
    # 2. each chunk's own contribution to the state at its end (inputs of the chunk's last document only)
    last = seg[..., -1:]  # (b, c, 1)
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum) * (seg == last).unsqueeze(1)  # (b, h, c, Q)
    chunk_states = torch.einsum("bclhn,bhcl,bclh,bclhp->bchpn", Bc, decay_to_end, dtc, xc)
    # 3. pass the state from chunk to chunk; it reaches a position only within the document it was in
    state = x.new_zeros(b, h, p, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    prev_seg = torch.zeros(b, dtype=torch.long, device=x.device)  # the document the incoming state belongs to
    y_off = []
    for k in range(c):
        reach = (seg[:, k] == prev_seg[:, None]).float()  # (b, Q)
        decay_in = torch.exp(A_cum[:, :, k]) * reach[:, None]  # (b, h, Q)
        y_off.append(torch.einsum("blhn,bhpn,bhl->blhp", Cc[:, k], state, decay_in))
        keep = decay_in[..., -1]  # (b, h): the incoming state's decay to the chunk's end, 0 after a reset
        state = state * keep[..., None, None] + chunk_states[:, k]
        prev_seg = seg[:, k, -1]
    y = (y + torch.stack(y_off, dim=1)).reshape(b, c * Q, h, p)[:, :l]
    if D is not None:
        y = y + D.float()[:, None] * xf[:, :l]
    return y.to(dtype), state


def ssd_sequential(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, reset=None, initial_state=None):
    """The same scan one position at a time (the tests' oracle); arguments and result as `ssd_chunked`."""
    dtype = x.dtype
    b, l, h, p = x.shape
    xf, dt, A, B, C = _prepare(x, dt, A, B, C, dt_bias, dt_softplus)
    state = x.new_zeros(b, h, p, B.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        if reset is not None:
            decay = decay * (~reset[:, t]).float()[:, None]
        state = state * decay[..., None, None] + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], xf[:, t], B[:, t])
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        if D is not None:
            y = y + D.float()[:, None] * xf[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1).to(dtype), state


def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False) -> torch.Tensor:
    """One recurrent step in PyTorch. state: (b, h, p, n) fp32, updated in place; x: (b, h, p); dt: (b, h);
    B, C: (b, g, n). -> y (b, h, p) in x's dtype."""
    y, new_state = ssd_sequential(x[:, None], dt[:, None], A, B[:, None], C[:, None], D, dt_bias, dt_softplus,
                                  initial_state=state)
    state.copy_(new_state)
    return y[:, 0]


def seq_idx_of(reset: torch.Tensor) -> torch.Tensor:
    """reset (b, l) bool -> mamba-ssm's ``seq_idx`` (b, l) int32: the document number of each position."""
    return reset.to(torch.int32).cumsum(-1, dtype=torch.int32)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=True, reset=None, initial_state=None,
             return_final_state=False):
    """The SSD scan (shapes as `ssd_chunked`): mamba-ssm's ``mamba_chunk_scan_combined`` on CUDA (document resets
    through its ``seq_idx``), `ssd_chunked` otherwise. -> y, or (y, final state (b, h, p, n) fp32)."""
    kernels = backend.mamba2_kernels(x)
    if kernels is not None:
        scan = launched(kernels.chunk_scan)
        result = scan(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state,
                      seq_idx=None if reset is None else seq_idx_of(reset), dt_softplus=dt_softplus,
                      return_final_states=return_final_state)
        if return_final_state:
            y, state = result
            return y, state.float()
        return result
    y, state = ssd_chunked(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, reset, initial_state)
    return (y, state) if return_final_state else y


def ssd_state_update(state, x, dt, A, B, C, D, dt_bias, dt_softplus=True) -> torch.Tensor:
    """One decode step (shapes as `ssd_step`; D, dt_bias (h,)): mamba-ssm's Triton ``selective_state_update`` on
    CUDA, in its per-head layout (A, Δ, dt_bias and D broadcast over headdim, as mamba-ssm's ``Mamba2.step``), no
    host sync; `ssd_step` otherwise."""
    if backend.backend_name(x.device) == "reference":
        return ssd_step(state, x, dt, A, B, C, D, dt_bias, dt_softplus)
    h, p, n = state.shape[1:]
    A = A.float()[:, None, None].expand(h, p, n)
    return backend.selective_state_update(state, x, dt[..., None].expand(-1, h, p), A, B, C,
                                          D[:, None].expand(h, p), dt_bias=dt_bias[:, None].expand(h, p),
                                          dt_softplus=dt_softplus)


def split_conv1d_scan(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size, headdim, ngroups, norm_weight,
                      norm_eps, reset=None) -> torch.Tensor:
    """mamba-ssm's fused ``mamba_split_conv1d_scan_combined`` (CUDA with causal-conv1d only): zxbcdt (b, l,
    2 d_inner + 2 ngroups d_state + nheads) -> rmsnorm(y * silu(z)) (b, l, d_inner), with the conv (weight (c, w))
    and the scan on xBC and document resets through ``seq_idx``; no output projection (the caller routes it)."""
    kernels = backend.mamba2_kernels(zxbcdt)
    if kernels is None or kernels.split_conv1d_scan is None:
        raise ValueError("split_conv1d_scan needs CUDA tensors with mamba-ssm and causal-conv1d installed")
    return launched(kernels.split_conv1d_scan)(
        zxbcdt, conv_weight, conv_bias, dt_bias, A, D, chunk_size,
        seq_idx=None if reset is None else seq_idx_of(reset), activation="silu", rmsnorm_weight=norm_weight,
        rmsnorm_eps=norm_eps, outproj_weight=None, outproj_bias=None, headdim=headdim, ngroups=ngroups,
        norm_before_gate=False,
    )
