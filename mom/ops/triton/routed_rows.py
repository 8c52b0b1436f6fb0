"""A decode step's routed projection in one kernel: ``y[i] = x[i] @ W[e_i].T + b[e_i]``, each row through its own
expert's weights, the experts picked on the device.

A decode step has one token per row, and each row's modality picks its expert. Done with PyTorch ops that is one GEMM
per expert over all rows, a stack and a gather (five launches for three experts); a captured decode step is a few
hundred such small launches, and their count, not the bytes they move, sets its time (docs/performance.md). Here one
program per (tile of output features, expert) loads that expert's weight tile once and multiplies it with the rows,
keeping only the rows routed to it: every weight is read at most once, whatever the mix of modalities across rows
(the other rows' products are computed and dropped: a decode step's FLOPs are not what it waits for), and an
expert no row of the block is routed to is not read at all (its programs skip their loop): at batch 1 a step reads one
expert's weights, as a dense model reads its one, instead of all of them. No host sync, fixed shapes:
a CUDA graph replays it for any routing.

The weights are read where they are (the experts' own ``nn.Linear`` parameters, no stacked copy), so in-place
changes are seen; the caller decides that the experts are plain linears (a wrapped one, e.g. LoRA, is called as a
module instead). Off CUDA, or without Triton, `routed_rows_linear` is the same maths in PyTorch ops.

In_proj's kernel can also run the step's causal conv on its x half (`ConvStep`): the programs of those output tiles
shift each row's conv window, append the new x and write silu(conv) instead, so the conv costs no launch of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mom.ops import backend
from mom.ops.triton.launcher import launch, triton_kernel

MAX_EXPERTS = 4  # the kernel takes one weight (and bias) pointer per expert; more experts take the PyTorch ops
ROWS = 16  # rows per block: tl.dot's smallest tile side


@dataclass(frozen=True)
class Blocks:
    """How the kernel tiles one call: ``out`` output features per program, ``k`` input features per step of its loop,
    and Triton's ``warps`` / ``stages`` (None: Triton's defaults)."""

    out: int
    k: int = 64
    warps: int | None = None
    stages: int | None = None


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def routed_rows_kernel(x, expert, y, w0, w1, w2, w3, b0, b1, b2, b3, cs, cw, cb, B, OUT, CONV_C, s_x, s_y, s_cs,
                           IN: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, CONV: tl.constexpr,
                           W: tl.constexpr, HAS_CBIAS: tl.constexpr, BB: tl.constexpr, BO: tl.constexpr,
                           BK: tl.constexpr):
        """y[i, o] = sum_k x[i, k] w_e[o, k] (+ b_e[o]) for the rows i with expert[i] == e, e = program_id(1), i in
        the block of rows program_id(2), o in the tile program_id(0); x (B, IN) and y (B, OUT) with row strides
        s_x / s_y, unit column stride; each w (OUT, IN) contiguous. CONV: outputs o < CONV_C (a multiple of BO) then
        go through one causal conv step (`ConvStep`): the window cs[i, o] (W taps, contiguous, row stride s_cs)
        shifts left and takes y[i, o] (rounded to y's dtype, as a separate step would store it), and y[i, o]
        becomes silu(window . cw[o] (+ cb[o]))."""
        e = tl.program_id(1)
        w, b = w0, b0
        if e == 1:
            w, b = w1, b1
        if e == 2:
            w, b = w2, b2
        if e == 3:
            w, b = w3, b3
        outs = tl.program_id(0) * BO + tl.arange(0, BO)
        out_ok = outs < OUT
        rows = tl.program_id(2) * BB + tl.arange(0, BB)
        mine = (rows < B) & (tl.load(expert + rows, mask=rows < B, other=-1) == e)
        acc = tl.zeros((BB, BO), dtype=tl.float32)
        if tl.max(mine.to(tl.int32), axis=0) > 0:  # some row of this block is routed to e: else e's weights unread
            for k0 in range(0, IN, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < IN
                xt = tl.load(x + rows.to(tl.int64)[:, None] * s_x + ks[None, :], mask=mine[:, None] & k_ok[None, :],
                             other=0.0)  # (BB, BK); other rows read as zeros
                wt = tl.load(w + outs.to(tl.int64)[:, None] * IN + ks[None, :], mask=out_ok[:, None] & k_ok[None, :],
                             other=0.0)  # (BO, BK)
                if IEEE:  # fp32 operands: full-precision products, as torch's fp32 GEMM (not TF32)
                    acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
                else:
                    acc += tl.dot(xt, tl.trans(wt))
        if HAS_BIAS:
            acc += tl.load(b + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        if CONV:
            if tl.program_id(0) * BO < CONV_C:  # a tile of the conv's channels
                taps = tl.arange(0, W)[None, None, :]
                at = cs + rows.to(tl.int64)[:, None, None] * s_cs + outs[:, None] * W + taps  # (BB, BO, W)
                ok = mine[:, None, None] & out_ok[None, :, None]
                older = tl.load(at + 1, mask=ok & (taps < W - 1), other=0.0).to(tl.float32)  # the window, shifted
                newest = acc.to(y.dtype.element_ty).to(tl.float32)[:, :, None]
                window = tl.where(taps == W - 1, newest, older)
                tl.store(at, window.to(cs.dtype.element_ty), mask=ok)
                cwt = tl.load(cw + outs[:, None] * W + tl.arange(0, W)[None, :], mask=out_ok[:, None], other=0.0)
                acc = tl.sum(window * cwt.to(tl.float32)[None, :, :], axis=2)  # (BB, BO)
                if HAS_CBIAS:
                    acc += tl.load(cb + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
                acc = acc * tl.sigmoid(acc)
        tl.store(y + rows.to(tl.int64)[:, None] * s_y + outs[None, :], acc.to(y.dtype.element_ty),
                 mask=mine[:, None] & out_ok[None, :])

    return routed_rows_kernel


def kernel_applies(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether `routed_rows_linear` runs the Triton kernel for ``x`` (b, in) and these experts' weights: CUDA, Triton,
    at most `MAX_EXPERTS` experts, every weight (out, in) contiguous on x's device in x's dtype (not offloaded to
    another device, nor left empty by a partitioning), x's columns contiguous."""
    if not (x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and 0 < len(weights) <= MAX_EXPERTS):
        return False
    shape = (weights[0].shape[0], x.shape[1])
    return (all(w.device == x.device and w.dtype == x.dtype and w.shape == shape and w.is_contiguous() for w in weights)
            and _kernel() is not None)


@dataclass(frozen=True)
class ConvStep:
    """One recurrent step of the depthwise causal conv (silu included) on a projection's first ``state.shape[1]``
    outputs (in_proj's x half): ``state`` (b, c, w) the last w inputs per row and channel, updated in place;
    ``weight`` (c, w); ``bias`` (c,) or None. What `mom.ops.backend.causal_conv1d_update` computes, here in the
    projection's epilogue: a decode step's conv costs no launch of its own."""

    state: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def applies(self, x: torch.Tensor, n_out: int, blocks: Blocks) -> bool:
        """Whether the kernel can run it: window length a power of two, channels in whole output tiles, the state's
        taps contiguous and each row's (c, w) contiguous, the weights (c, w) contiguous, all on x's device."""
        b, c, w = self.state.shape
        tensors = (self.state, self.weight, *((self.bias,) if self.bias is not None else ()))
        return (b == x.shape[0] and c <= n_out and c % blocks.out == 0 and w & (w - 1) == 0
                and self.state[0].is_contiguous() and tuple(self.weight.shape) == (c, w)
                and self.weight.is_contiguous() and all(t.device == x.device for t in tensors))

    def reference(self, y: torch.Tensor) -> torch.Tensor:
        """The step on y (b, out) in PyTorch ops: y with its first c columns replaced by the conv's output."""
        c = self.state.shape[1]
        conv = backend.causal_conv1d_update(y[:, :c], self.state, self.weight, self.bias)  # (b, c)
        return torch.cat([conv.to(y.dtype), y[:, c:]], dim=1)


def expert_slots(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None):
    """The kernels' `MAX_EXPERTS` weight and bias pointers: the experts', then the first expert's in the unused slots
    (never selected by a routed call; every row's for a shared projection of one expert); biases: the weights when
    there are none (never read)."""
    ws = (*weights, *(weights[:1] * (MAX_EXPERTS - len(weights))))
    bs = ws if biases is None else (*biases, *(biases[:1] * (MAX_EXPERTS - len(biases))))
    return ws, bs


def default_blocks(n_in: int, n_out: int, rows: int = 1) -> Blocks:
    """The kernel's tiling for a projection n_in -> n_out of ``rows`` rows, from `benchmarks/bench_routed_rows.py
    --sweep` on an H100 at Mamba's decode shapes, uniform and mixed rows (docs/performance.md): wide outputs (in_proj)
    in tiles of 64, of 32 up to `ROWS` rows; a short input (dt_proj: one step of k) in tiles of 32; few outputs over a
    long input (x_proj, out_proj) in tiles of 16 with steps of 128, so that more programs share the weights and each
    walks fewer steps, except out_proj's hundreds of outputs above `ROWS` rows: tiles of 32, steps of 256."""
    if n_out >= 2048:
        return Blocks(out=32 if rows <= ROWS else 64)
    if n_in <= 128:
        return Blocks(out=32)
    if n_out >= 256 and rows > ROWS:
        return Blocks(out=32, k=256)
    return Blocks(out=16, k=128)


def routed_rows_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None,
                       expert_ids: torch.Tensor, use_kernel: bool | None = None,
                       blocks: Blocks | None = None, conv: ConvStep | None = None) -> torch.Tensor:
    """x (b, in), ``weights[e]`` (out, in), ``biases[e]`` (out,) or None, ``expert_ids`` (b,) int -> (b, out): row i
    through expert ``expert_ids[i]``. ``use_kernel`` defaults to `kernel_applies`; False runs the PyTorch ops (every
    expert over every row, each row keeping its own expert's output). ``blocks``: the kernel's tiling (default
    `default_blocks`; benchmarks sweep it). ``conv``: the first outputs then go through a conv step (`ConvStep`; the
    kernel requires `ConvStep.applies`)."""
    if use_kernel is None:
        use_kernel = kernel_applies(x, weights)
    b, n_in = x.shape
    n_out = weights[0].shape[0]
    blocks = blocks or default_blocks(n_in, n_out, b)
    if not use_kernel:
        ys = torch.stack([torch.nn.functional.linear(x, w, None if biases is None else biases[e])
                          for e, w in enumerate(weights)], dim=1)  # (b, M, out)
        y = ys.gather(1, expert_ids.view(-1, 1, 1).expand(-1, 1, ys.shape[-1])).squeeze(1)
        return y if conv is None else conv.reference(y)
    if conv is not None and not conv.applies(x, n_out, blocks):
        raise ValueError(f"routed_rows_linear: the kernel cannot run this conv step (state {tuple(conv.state.shape)}, "
                         f"weight {tuple(conv.weight.shape)}, tiles of {blocks.out} outputs)")
    y = x.new_empty(b, n_out)
    if b == 0:
        return y
    ws, bs = expert_slots(weights, biases)
    block_rows = min(64, max(ROWS, 1 << (b - 1).bit_length()))  # a decode batch of up to 64 rows: one block
    grid = (-(-n_out // blocks.out), len(weights), -(-b // block_rows))
    cs, cw, cb = (x, x, x) if conv is None else (conv.state, conv.weight, conv.bias if conv.bias is not None else x)
    args = (x, expert_ids, y, *ws, *bs, cs, cw, cb, b, n_out, 0 if conv is None else conv.state.shape[1],
            x.stride(0), y.stride(0), 0 if conv is None else conv.state.stride(0))
    constexprs = dict(IN=n_in, HAS_BIAS=biases is not None, IEEE=x.dtype == torch.float32, CONV=conv is not None,
                      W=1 if conv is None else conv.state.shape[2],
                      HAS_CBIAS=conv is not None and conv.bias is not None, BB=block_rows, BO=blocks.out, BK=blocks.k)
    options = {k: v for k, v in (("num_warps", blocks.warps), ("num_stages", blocks.stages)) if v is not None}
    launch(_kernel(), grid, args, options=options, **constexprs)
    return y
