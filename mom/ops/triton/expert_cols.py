"""Each token's columns to or from the block of its expert: x_proj's output split into dt_proj's input and B, C.

The fast path runs every x_proj expert on every token in one GEMM (`mom.ops.fused`), giving ``(M_x (r + 2N), n)``
rows: per expert its Δ-rank features, B and C for all tokens. Each token then needs its own expert's part:

* its r Δ-rank features in the block of its dt_proj expert of dt_proj's expanded input ``(M_dt r, n)`` (zeros in
  the other experts' blocks), so that one GEMM with the experts side by side gives each token its own Δ;
* its B and C, ``(b, 2N, l)``: the layout the scan reads fastest.

In PyTorch (`route_cols`, which the backward also uses to route gradients back into the experts' blocks) that is
a multiply by the one-hot (reading every expert's features) and a gather: two launches with strided reads.
`split_x_proj` is one Triton kernel that reads only each token's own expert's rows (the tokens of a routing's run
are contiguous, so the loads stay coalesced) and writes both outputs. Elsewhere (CPU, no Triton) it runs
`route_cols`.
"""

from __future__ import annotations

import torch

from mom.ops.triton.launcher import launch, triton_kernel

TILE_T, TILE_R = 128, 16  # tokens x rows of x_proj's output per program: a first choice for a copy, not tuned


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def split_x_proj_kernel(x, ids, dt, bc, n, L, R, RANK, M_DT, s_x, s_dt, ROUTED_X: tl.constexpr,
                            BT: tl.constexpr, BR: tl.constexpr):
        """For token t (expert e = ids[t]) and row k < R of x's block s = (e if ROUTED_X else 0):
        dt[m * RANK + k, t] = x[s * R + k, t] if k < RANK and (m == e or M_DT == 1), 0 for the other m;
        bc[t // L, k - RANK, t % L] = x[s * R + k, t] if k >= RANK."""
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        rows = tl.program_id(1) * BR + tl.arange(0, BR)
        tok_ok, row_ok = toks < n, rows < R
        e = tl.load(ids + toks, mask=tok_ok, other=0)
        toks64, rows64 = toks.to(tl.int64), rows.to(tl.int64)
        if ROUTED_X:
            src_rows = e.to(tl.int64)[None, :] * R + rows64[:, None]
        else:
            src_rows = rows64[:, None] + toks64[None, :] * 0
        values = tl.load(x + src_rows * s_x + toks64[None, :], mask=row_ok[:, None] & tok_ok[None, :], other=0.0)
        is_dt = (rows < RANK)[:, None] & tok_ok[None, :]
        for m in range(M_DT):
            mine = (e == m) | (M_DT == 1)
            at = dt + (m * RANK + rows64)[:, None] * s_dt + toks64[None, :]
            tl.store(at, tl.where(mine[None, :], values, tl.zeros_like(values)), mask=is_dt)
        two_n = R - RANK
        seq, pos = toks64 // L, toks64 % L
        at = bc + (seq * two_n * L + pos)[None, :] + ((rows64 - RANK) * L)[:, None]
        tl.store(at, values, mask=((rows >= RANK) & row_ok)[:, None] & tok_ok[None, :])

    return split_x_proj_kernel


def split_x_proj(x_all: torch.Tensor, experts: int, ids: torch.Tensor, select: torch.Tensor, rank: int,
                 dt_out: torch.Tensor, bc_out: torch.Tensor) -> None:
    """x_all (M_x (r + 2N), n): x_proj's output, ``experts`` (M_x) blocks of r + 2N rows, tokens contiguous; ids (n,)
    int64: each token's expert; select (M, n): their one-hot in x_all's dtype (the PyTorch ops' multiplier); writes
    dt_out (M_dt r, n) (M_dt = 1: each token's own Δ-rank features; M_dt = M: those in its expert's block, zeros in
    the others'; any row stride, tokens contiguous) and bc_out (b, 2N, l) contiguous (each token's own B, C)."""
    n = x_all.shape[1]
    b, two_n, l = bc_out.shape
    rows = x_all.shape[0] // experts
    m_dt = dt_out.shape[0] // rank
    if (x_all.shape[0] != experts * rows or rows != rank + two_n or b * l != n or dt_out.shape != (m_dt * rank, n)
            or ids.shape != (n,)):
        raise ValueError(f"split_x_proj: x_all {tuple(x_all.shape)} as {experts} experts' rank {rank} + 2N {two_n} "
                         f"rows, dt_out {tuple(dt_out.shape)}, bc_out {tuple(bc_out.shape)}, ids {tuple(ids.shape)} "
                         f"do not agree")
    kernel = _kernel() if x_all.is_cuda else None
    if kernel is None or x_all.stride(1) != 1 or dt_out.stride(1) != 1 or not bc_out.is_contiguous():
        x = x_all.view(experts, rows, b, l)
        route_cols(x[:, :rank], select, ids, dt_out.view(m_dt, rank, b, l))
        route_cols(x[:, rank:], select, ids, bc_out.permute(1, 0, 2)[None])
        return
    _launch(x_all, experts, ids, rank, dt_out, bc_out)


def _launch(x_all: torch.Tensor, experts: int, ids: torch.Tensor, rank: int, dt_out: torch.Tensor,
            bc_out: torch.Tensor) -> None:
    """`split_x_proj`'s kernel on checked arguments (also in Triton's interpreter, on CPU tensors: the tests)."""
    n, rows = x_all.shape[1], x_all.shape[0] // experts
    if not n:
        return
    grid = (-(-n // TILE_T), -(-rows // TILE_R), 1)
    launch(_kernel(), grid, (x_all, ids, dt_out, bc_out, n, bc_out.shape[2], rows, rank, dt_out.shape[0] // rank,
                             x_all.stride(0), dt_out.stride(0)),
           ROUTED_X=experts > 1, BT=TILE_T, BR=TILE_R)


def route_cols(src: torch.Tensor, select: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Each token's rows to or from the block of its expert, into ``out``: src (Ms, f, b, l), out (Mo, f, b, l), any
    strides, Ms and Mo each 1 (a shared projection) or M. Mo = M: block m holds src's columns of modality m's tokens
    and zeros elsewhere (a multiply by the one-hot ``select`` (M, n); a shared src is broadcast); Mo = 1 from Ms = M:
    each token's column from its expert's block (a gather by ``ids`` (n,)); both 1: a copy."""
    m_out, f, b, l = out.shape
    if m_out > 1:
        return torch.mul(src, select.view(m_out, 1, b, l), out=out)
    if src.shape[0] > 1:
        return torch.gather(src, 0, ids.view(1, 1, b, l).expand(1, f, b, l), out=out)
    return out.copy_(src)
