"""Pure-PyTorch selective scan (Mamba-1), the reference backend and the CPU path.

Recurrence per channel d and state n (``A`` is negative, so every decay is in (0, 1]):

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t,        y_t = C_t · h_t + D x_t,        out_t = y_t ⊙ silu(z_t)

`selective_scan` evaluates the recurrence chunked: the sequence is cut into chunks of T ~ sqrt(L) positions; T
sequential steps run every chunk at once from a zero state, L/T steps carry the state across chunk boundaries, and
T more steps write every state from the right starting point.
The backward (a custom autograd function) runs the adjoint recurrence the same way in reverse, instead of autograd
through thousands of tiny ops. Python-level steps: about 2 sqrt(L) each way instead of L. Only products of decays
(<= 1) are formed, never their inverses, so it is as stable as the loop. Computation is in fp32 (fp64 inputs stay
fp64, for tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _up(t: torch.Tensor) -> torch.Tensor:
    """Compute in fp32 at least (fp64 inputs stay fp64, for tests)."""
    return t if t.dtype == torch.float64 else t.float()


def _chunk_size(l: int) -> int:
    """~sqrt(l) positions per chunk balances the two sequential loops (T steps inside chunks, l/T across)."""
    return max(1, min(l, math.ceil(math.sqrt(l))))


def _chunks(t: torch.Tensor, T: int, fill: float) -> torch.Tensor:
    """(b, d, l, n) -> (b, d, nc, T, n), padding the time axis with ``fill``."""
    b, d, l, n = t.shape
    nc = -(-l // T)
    if nc * T != l:
        t = F.pad(t, (0, 0, 0, nc * T - l), value=fill)
    return t.reshape(b, d, nc, T, n)


class _LinearRecurrence(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + x_t, chunked in two sweeps: (1) T steps, every chunk at once from a zero state, keeping
    only each chunk's end state and decay product; (2) nc steps carrying the state into each chunk; (3) T steps again,
    every chunk from its true entering state, writing h. The backward runs the adjoint recurrence
    g_t = dh_t + a_{t+1} g_{t+1} the same way in reverse. Python-level steps: about 3 sqrt(l) each way."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        b, d, l, n = x.shape
        T = _chunk_size(l)
        ac, xc = _chunks(a, T, 1.0), _chunks(x, T, 0.0)  # (b, d, nc, T, n)
        h, p = torch.zeros_like(xc[:, :, :, 0]), torch.ones_like(ac[:, :, :, 0])  # (b, d, nc, n)
        for t in range(T):
            h = torch.addcmul(xc[:, :, :, t], ac[:, :, :, t], h)
            p = p * ac[:, :, :, t]
        start = torch.empty_like(h)  # state entering each chunk
        c = h0 if h0 is not None else torch.zeros_like(h[:, :, 0])
        for k in range(h.shape[2]):
            start[:, :, k] = c
            c = torch.addcmul(h[:, :, k], p[:, :, k], c)
        out = torch.empty_like(xc)
        h = start
        for t in range(T):
            h = torch.addcmul(xc[:, :, :, t], ac[:, :, :, t], h)
            out[:, :, :, t] = h
        out = out.reshape(b, d, -1, n)[:, :, :l]
        ctx.save_for_backward(a, out, h0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, out, h0 = ctx.saved_tensors
        b, d, l, n = out.shape
        T = _chunk_size(l)
        # a_next_t = a_{t+1} (0 past the end), so that g_t = grad_t + a_next_t g_{t+1}.
        an = _chunks(F.pad(a[:, :, 1:], (0, 0, 0, 1), value=0.0), T, 0.0)  # (b, d, nc, T, n)
        gc = _chunks(grad, T, 0.0)
        g, s = torch.zeros_like(gc[:, :, :, 0]), torch.ones_like(an[:, :, :, 0])
        for t in reversed(range(T)):
            g = torch.addcmul(gc[:, :, :, t], an[:, :, :, t], g)
            s = s * an[:, :, :, t]
        after = torch.empty_like(g)  # adjoint arriving from the next chunk's first position
        e = torch.zeros_like(g[:, :, 0])
        for k in reversed(range(g.shape[2])):
            after[:, :, k] = e
            e = torch.addcmul(g[:, :, k], s[:, :, k], e)
        gx = torch.empty_like(gc)
        g = after
        for t in reversed(range(T)):
            g = torch.addcmul(gc[:, :, :, t], an[:, :, :, t], g)
            gx[:, :, :, t] = g
        gx = gx.reshape(b, d, -1, n)[:, :, :l]
        first = h0 if h0 is not None else torch.zeros_like(out[:, :, 0])
        h_prev = torch.cat([first.unsqueeze(2), out[:, :, :-1]], dim=2)  # h_{t-1}
        grad_h0 = a[:, :, 0] * gx[:, :, 0] if h0 is not None else None
        return gx * h_prev, gx, grad_h0


def linear_recurrence(decay: torch.Tensor, inp: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """All states of h_t = decay_t * h_{t-1} + inp_t.

    decay, inp: (b, d, l, n); h0: (b, d, n) or None (zeros). Returns h: (b, d, l, n).
    """
    return _LinearRecurrence.apply(decay.contiguous(), inp.contiguous(), h0)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l); D, delta_bias: (d,); initial_state: (b, d, n);
    reset: (b, l) bool, zero the state before these positions (a new packed document starts there).
    Returns out (b, d, l) in u's dtype, and the last state (b, d, n) fp32 if ``return_last_state``.
    """
    dtype = u.dtype
    u, delta, B, C = _up(u), _up(delta), _up(B), _up(C)
    if delta_bias is not None:
        delta = delta + _up(delta_bias)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(delta.unsqueeze(-1) * _up(A)[:, None, :])  # (b, d, l, n)
    if reset is not None:
        decay = decay * (~reset)[:, None, :, None].to(decay.dtype)
    inp = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, d, l, n)
    h = linear_recurrence(decay, inp, initial_state)
    y = torch.einsum("bdln,bnl->bdl", h, C)
    if D is not None:
        y = y + _up(D)[:, None] * u
    if z is not None:
        y = y * F.silu(_up(z))
    out = y.to(dtype)
    return (out, h[:, :, -1]) if return_last_state else out


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One recurrent step, updating ``state`` (b, d, n) in place.

    x, dt, z: (b, d); A: (d, n); B, C: (b, n); D, dt_bias: (d,). Returns out (b, d) in x's dtype.
    """
    dtype = x.dtype
    x, dt, B, C = _up(x), _up(dt), _up(B), _up(C)
    if dt_bias is not None:
        dt = dt + _up(dt_bias)
    if dt_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt.unsqueeze(-1) * _up(A))  # (b, d, n)
    new_state = _up(state) * decay + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
    state.copy_(new_state)
    y = torch.einsum("bdn,bn->bd", new_state, C)
    if D is not None:
        y = y + _up(D) * x
    if z is not None:
        y = y * F.silu(_up(z))
    return y.to(dtype)
