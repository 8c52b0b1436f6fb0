"""A decode step's Δ projection and selective state update in one kernel, each row's Δ expert picked on the device.

Mamba-1's recurrent step, after x_proj, is three launches and more: dt_proj (each row through its modality's expert,
`mom.ops.triton.routed_rows`), ``A = -exp(A_log)`` (two elementwise kernels) and the state update (mamba-ssm's
``selective_state_update``). A captured decode step replays its kernels one after the other and most of them are a
few microseconds of work each, so their number sets much of its time (docs/performance.md). Here one program per
(block of channels, row) computes, for its channels d and row i of expert e = ``expert_ids[i]``::

    Δ[d]      = softplus(dt_in[i] · W_e[d] + b_e[d])             # dt_proj, r = dt_rank inputs: the row's own expert
    state[d]  = state[d] * exp(Δ[d] * A[d]) + Δ[d] x[d] B[i]    # A = -exp(A_log), (d_state,) per channel
    y[d]      = (state[d] · C[i] + D[d] x[d]) * silu(z[d])

``routed_state_update`` is that maths; off CUDA or without Triton it runs as PyTorch ops (the reference the kernel is
tested against). The weights are read where they are (the experts' own parameters), so in-place changes are seen and
a CUDA graph replays it for any routing. The caller decides that the Δ experts are plain linears (LoRA-wrapped ones
are called as modules, `mom.model.routing.project_rows`, and the state update runs apart).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mom.ops import reference
from mom.ops.triton.launcher import launch, triton_kernel
from mom.ops.triton.routed_rows import MAX_EXPERTS, expert_slots, routed_rows_linear


def tiling(rows: int) -> tuple[int, int]:
    """(channels per program, warps) for a step of ``rows`` rows, from an H100 sweep at d_inner 1536, d_state 16
    (docs/performance.md): small programs for one or a few rows; at 64 rows one warp per 32 channels."""
    return (16, 2) if rows <= 16 else (32, 1)


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def state_update_kernel(state, x, z, dt_in, expert, w0, w1, w2, w3, b0, b1, b2, b3, A_log, B, C, D, y, DI,
                            s_state, s_x, s_z, s_dt, s_B, s_C, s_y, N: tl.constexpr, R: tl.constexpr,
                            HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                            BR: tl.constexpr):
        """Channels program_id(0) * BD + [0, BD) of row program_id(1); state (b, DI, N) with row stride s_state and
        contiguous (DI, N) per row; w_e (DI, R) contiguous; A_log (DI, N) contiguous; D, b_e (DI,)."""
        row = tl.program_id(1)
        ds = tl.program_id(0) * BD + tl.arange(0, BD)
        d_ok = ds < DI
        e = tl.load(expert + row)
        w, b = w0, b0
        if e == 1:
            w, b = w1, b1
        if e == 2:
            w, b = w2, b2
        if e == 3:
            w, b = w3, b3
        rs = tl.arange(0, BR)
        r_ok = rs < R
        low = tl.load(dt_in + row * s_dt + rs, mask=r_ok, other=0.0).to(tl.float32)  # (BR,)
        wt = tl.load(w + ds[:, None] * R + rs[None, :], mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        dt = tl.sum(wt.to(tl.float32) * low[None, :], axis=1)  # (BD,)
        if HAS_BIAS:
            dt += tl.load(b + ds, mask=d_ok, other=0.0).to(tl.float32)
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)  # softplus, linear above 20 (as torch's)
        ns = tl.arange(0, BN)
        n_ok = ns < N
        dn_ok = d_ok[:, None] & n_ok[None, :]
        A = -tl.exp(tl.load(A_log + ds[:, None] * N + ns[None, :], mask=dn_ok, other=0.0).to(tl.float32))
        s_ptr = state + row.to(tl.int64) * s_state + ds[:, None] * N + ns[None, :]
        s = tl.load(s_ptr, mask=dn_ok, other=0.0).to(tl.float32)  # (BD, BN)
        xv = tl.load(x + row * s_x + ds, mask=d_ok, other=0.0).to(tl.float32)
        Bv = tl.load(B + row * s_B + ns, mask=n_ok, other=0.0).to(tl.float32)
        Cv = tl.load(C + row * s_C + ns, mask=n_ok, other=0.0).to(tl.float32)
        s = s * tl.exp(dt[:, None] * A) + (dt * xv)[:, None] * Bv[None, :]
        tl.store(s_ptr, s.to(state.dtype.element_ty), mask=dn_ok)
        out = tl.sum(s * Cv[None, :], axis=1) + tl.load(D + ds, mask=d_ok, other=0.0).to(tl.float32) * xv
        if HAS_Z:
            zv = tl.load(z + row * s_z + ds, mask=d_ok, other=0.0).to(tl.float32)
            out = out * zv * tl.sigmoid(zv)
        tl.store(y + row * s_y + ds, out.to(y.dtype.element_ty), mask=d_ok)

    return state_update_kernel


def kernel_applies(state: torch.Tensor, x: torch.Tensor, dt_in: torch.Tensor, weights: Sequence[torch.Tensor],
                   A_log: torch.Tensor, D: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   z: torch.Tensor | None) -> bool:
    """Whether `routed_state_update` runs the Triton kernel: CUDA, Triton, at most `MAX_EXPERTS` experts of contiguous
    (d_inner, r) weights, a state (b, d_inner, d_state) contiguous per row, A_log (d_inner, d_state) and D (d_inner,)
    contiguous, all on x's device (none offloaded); x, z, dt_in, B and C each (rows, features) with contiguous
    features."""
    if not (x.is_cuda and x.dim() == 2 and 0 < len(weights) <= MAX_EXPERTS):
        return False
    rows = (x, dt_in, B, C, *((z,) if z is not None else ()))
    if not all(t.dim() == 2 and t.stride(1) == 1 and t.device == x.device for t in rows):
        return False
    b, di = x.shape
    shape = (di, weights[0].shape[1])
    return (state.shape[:2] == (b, di) and state[0].is_contiguous() and tuple(A_log.shape) == tuple(state.shape[1:])
            and tuple(D.shape) == (di,)
            and all(t.device == x.device and t.is_contiguous() for t in (state, A_log, D, *weights))
            and all(tuple(w.shape) == shape for w in weights) and _kernel() is not None)


def routed_state_update(state: torch.Tensor, x: torch.Tensor, dt_in: torch.Tensor, weights: Sequence[torch.Tensor],
                        biases: Sequence[torch.Tensor] | None, expert_ids: torch.Tensor, A_log: torch.Tensor,
                        B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, z: torch.Tensor | None,
                        use_kernel: bool | None = None) -> torch.Tensor:
    """One recurrent step (module docstring), ``state`` (b, d_inner, d_state) updated in place: x, z (b, d_inner);
    dt_in (b, r): x_proj's Δ-rank features; ``weights[e]`` (d_inner, r), ``biases[e]`` (d_inner,) or None: dt_proj's
    experts (one for a shared dt_proj: every row uses it); expert_ids (b,) int; A_log (d_inner, d_state); B, C (b,
    d_state); D (d_inner,). -> y (b, d_inner) in x's dtype. ``use_kernel`` defaults to `kernel_applies`."""
    if use_kernel is None:
        use_kernel = kernel_applies(state, x, dt_in, weights, A_log, D, B, C, z)
    if not use_kernel:
        return _reference(state, x, dt_in, weights, biases, expert_ids, A_log, B, C, D, z)
    b, di = x.shape
    n, r = state.shape[2], weights[0].shape[1]
    y = torch.empty_like(x)
    if b == 0:
        return y
    ws, bs = expert_slots(weights, biases)
    zz = x if z is None else z
    args = (state, x, zz, dt_in, expert_ids, *ws, *bs, A_log, B, C, D, y, di, state.stride(0), x.stride(0),
            zz.stride(0), dt_in.stride(0), B.stride(0), C.stride(0), y.stride(0))
    block_d, warps = tiling(b)
    constexprs = dict(N=n, R=r, HAS_BIAS=biases is not None, HAS_Z=z is not None, BD=block_d, BN=_pow2(n),
                      BR=_pow2(r))
    grid = (-(-di // block_d), b, 1)
    launch(_kernel(), grid, args, options=dict(num_warps=warps), **constexprs)
    return y


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _reference(state, x, dt_in, weights, biases, expert_ids, A_log, B, C, D, z) -> torch.Tensor:
    """`routed_state_update` in PyTorch ops: Δ through each row's expert in fp32 (`routed_rows_linear`'s PyTorch
    ops), then the reference state update."""
    f32 = torch.float32
    pick = expert_ids.clamp(0, len(weights) - 1)  # a shared dt_proj: every row through the one expert
    dt = routed_rows_linear(dt_in.to(f32), [w.to(f32) for w in weights],
                            None if biases is None else [b.to(f32) for b in biases], pick, use_kernel=False)
    return reference.selective_state_update(state, x, dt, -torch.exp(A_log.to(f32)), B, C, D, z, dt_softplus=True)
