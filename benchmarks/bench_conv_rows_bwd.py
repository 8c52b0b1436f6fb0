"""Would a training step pay for reading the conv's input from in_proj's sorted rows? The backward decides.

A prefill's conv already reads x straight from in_proj's modality-sorted rows (`mom.ops.triton.conv_rows`). A
training step cannot yet: its backward runs causal-conv1d's backward on x in sequence order and gathers dx back into
in_proj's sorted gradient rows. This benchmark times a candidate Triton backward that reads x from, and writes dx
into, the sorted rows, against what it would replace, on the same inputs (docs/performance.md, "Where the goals
stand"):

    python benchmarks/bench_conv_rows_bwd.py                          # 8 x 2048 tokens x 2048 features, bf16
    python benchmarks/bench_conv_rows_bwd.py --shape 8x2048x1536 --shape 16x2048x1536

Rows, each with its time per call (fastest of three alternating rounds of CUDA-event-timed calls):
  causal-conv1d backward        the backward alone, x already in sequence order
  gather + backward + gather    x gathered into sequence order, causal-conv1d's backward, dx gathered into rows:
                                what the candidate replaces
  candidate, rows               `conv_rows_bwd` below
and the candidate's ratio to the second row. Its weight and bias gradients and dx are checked against
causal-conv1d's first. The forward side: `bench_gather.py` (the conv from rows against the gather and causal-conv1d).

The candidate (a first one, with atomics, measured 4.3x: docs/performance.md): a program takes one part of a
sequence (``SPLITS`` parts) and a block of features, and walks its positions backward in chunks. Per chunk it loads
the ``w`` shifted tiles of x once, as one (w, positions, features) tile, recomputes the conv's pre-activation, turns
the output gradient into the pre-activation's (silu'), adds its weight and bias gradients to partial sums kept in
registers, and puts that gradient in a two-chunk scratch ring (L2-resident): dx at a position needs the gradient at
the next ``w - 1`` positions, which for the chunk's last positions lie in the chunk processed just before. The
partial sums go to a buffer summed by one more kernel: no atomics.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import fastest, interleaved_modalities, print_fastest  # noqa: E402

from mom.model.routing import Routing  # noqa: E402
from mom.ops.triton.launcher import triton_kernel  # noqa: E402

SPLITS = 4  # parts of a sequence, each one program's walk (more programs in flight; one look-ahead chunk each)
CHUNK, FEATURES = 32, 64  # positions x features a program holds at a time
WARPS = 4


@triton_kernel
def _kernel(triton, tl):
    @triton.jit
    def conv_rows_bwd_kernel(src, index, weight, bias, dout, dx, partial, scratch, L, F, n, span, s_src, s_dx,
                             s_w_feat, s_w_tap, W: tl.constexpr, WP: tl.constexpr, BL: tl.constexpr,
                             BF: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr):
        """For y = silu(bias + sum_k weight[:, k] * x(p - (W - 1 - k))), x(p) = src[index[seq * L + p]]: writes
        dx(p) into dx's rows at index[seq * L + p], and this program's partial weight (WP, F) and bias (F,) gradients
        into ``partial``; ``scratch``: 2 x BL x BF fp32 per program."""
        pid = tl.program_id(0)
        seq = pid // SPLITS
        lo = (pid % SPLITS) * span
        hi = tl.minimum(lo + span, L)
        feats = tl.program_id(1) * BF + tl.arange(0, BF)
        feat_ok = feats < F
        f64 = feats.to(tl.int64)
        taps = tl.arange(0, WP)
        tap_ok = taps < W
        w_ok = tap_ok[:, None] & feat_ok[None, :]
        w_k = tl.load(weight + f64[None, :] * s_w_feat + taps[:, None] * s_w_tap, mask=w_ok, other=0.0).to(tl.float32)
        w_rev = tl.load(weight + f64[None, :] * s_w_feat + (W - 1 - taps)[:, None] * s_w_tap, mask=w_ok,
                        other=0.0).to(tl.float32)  # (WP, BF): the tap that carries position p + j back to p
        if HAS_BIAS:
            bias_v = tl.load(bias + f64, mask=feat_ok, other=0.0).to(tl.float32)
        else:
            bias_v = tl.zeros((BF,), dtype=tl.float32)
        dw = tl.zeros((WP, BF), dtype=tl.float32)
        db = tl.zeros((BF,), dtype=tl.float32)
        steps = tl.arange(0, BL)
        ring = scratch + (pid * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * (2 * BL * BF)
        ring_cols = tl.arange(0, BF)
        chunks = tl.cdiv(hi - lo, BL)
        for it in range(0, chunks + 1):  # chunk `chunks` first: the look-ahead past this part's end
            i = chunks - it
            pos = lo + i * BL + steps  # (BL,)
            p3 = pos[None, :] - (W - 1 - taps)[:, None]  # (WP, BL): the position tap k reads
            ok3 = (p3 >= 0) & (p3 < L) & tap_ok[:, None]
            r3 = tl.load(index + seq * L + p3, mask=ok3, other=0).to(tl.int64)
            ok3x = ok3[:, :, None] & feat_ok[None, None, :]
            x3 = tl.load(src + r3[:, :, None] * s_src + f64[None, None, :], mask=ok3x, other=0.0).to(tl.float32)
            a = tl.sum(x3 * w_k[:, None, :], axis=0) + bias_v[None, :]  # (BL, BF) the pre-activation
            pos_ok = pos < L
            g = tl.load(dout + f64[None, :] * n + (seq * L + pos).to(tl.int64)[:, None],
                        mask=pos_ok[:, None] & feat_ok[None, :], other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp(-a))
            da = g * sig * (1.0 + a * (1.0 - sig))  # silu'(a) g; 0 past the sequence (g = 0 there)
            mine = pos_ok & (pos < hi) & (steps * 0 + i < chunks)  # (BL,) this program's, not the look-ahead's
            da_mine = tl.where(mine[:, None], da, 0.0)
            dw += tl.sum(x3 * da_mine[None, :, :], axis=1)
            db += tl.sum(da_mine, axis=0)
            slot = i % 2
            tl.store(ring + slot * (BL * BF) + steps[:, None] * BF + ring_cols[None, :], da)
            tl.debug_barrier()
            ahead = steps[None, :] + taps[:, None]  # (WP, BL): position p + j, in this chunk or the one after
            at = tl.where(ahead < BL, slot * (BL * BF) + ahead * BF, (1 - slot) * (BL * BF) + (ahead - BL) * BF)
            da3 = tl.load(ring + at[:, :, None] + ring_cols[None, None, :], mask=tap_ok[:, None, None], other=0.0)
            dx_t = tl.sum(da3 * w_rev[:, None, :], axis=0)  # (BL, BF)
            rows = tl.load(index + seq * L + pos, mask=mine, other=0).to(tl.int64)
            tl.store(dx + rows[:, None] * s_dx + f64[None, :], dx_t.to(dx.dtype.element_ty),
                     mask=mine[:, None] & feat_ok[None, :])
            tl.debug_barrier()  # the next chunk writes the slot this one read ahead in
        base = partial + pid.to(tl.int64) * ((WP + 1) * F)
        tl.store(base + taps[:, None] * F + f64[None, :], dw, mask=w_ok)
        tl.store(base + WP * F + f64, db, mask=feat_ok)

    return conv_rows_bwd_kernel


def conv_rows_bwd(rows: torch.Tensor, index: torch.Tensor, length: int, weight: torch.Tensor,
                  bias: torch.Tensor | None, dout: torch.Tensor, dx_rows: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The candidate: rows (m, f) x in sorted rows (unit feature stride), index (n,) each sequence-order token's row,
    weight (f, w), bias (f,) or None, dout (f, n) the gradient of silu(conv) in sequence order; writes dx into
    ``dx_rows`` (m, f) at the same rows -> (dweight (f, w), dbias (f,) or None), fp32."""
    n, f = index.shape[0], rows.shape[1]
    b, w = n // length, weight.shape[1]
    wp = 1 << (w - 1).bit_length()
    per_part = -(-length // SPLITS)
    span = -(-per_part // CHUNK) * CHUNK  # positions per part, in whole chunks
    grid = (b * SPLITS, -(-f // FEATURES), 1)
    partial = torch.empty(grid[0], wp + 1, f, device=rows.device, dtype=torch.float32)
    scratch = torch.empty(grid[0] * grid[1] * 2 * CHUNK * FEATURES, device=rows.device, dtype=torch.float32)
    _kernel()[grid](rows, index, weight, partial if bias is None else bias, dout, dx_rows, partial, scratch, length,
                    f, n, span, rows.stride(0), dx_rows.stride(0), *weight.stride(), W=w, WP=wp, BL=CHUNK,
                    BF=FEATURES, SPLITS=SPLITS, HAS_BIAS=bias is not None, num_warps=WARPS)
    sums = partial.sum(0)  # (wp + 1, f)
    return sums[:w].t(), (sums[wp] if bias is not None else None)


def reference(rows: torch.Tensor, index: torch.Tensor, length: int, weight: torch.Tensor, bias: torch.Tensor | None,
              dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx in rows (m, f), dweight, dbias) by autograd through the PyTorch conv, in fp32."""
    n, f = index.shape[0], rows.shape[1]
    b = n // length
    x = rows.float().index_select(0, index).t().reshape(f, b, length).permute(1, 0, 2).detach().requires_grad_()
    leaves = [weight.float().detach().requires_grad_()] + ([bias.float().detach().requires_grad_()] if bias is not None
                                                           else [])
    y = torch.nn.functional.conv1d(x, leaves[0].unsqueeze(1), leaves[1] if bias is not None else None,
                                   padding=weight.shape[1] - 1, groups=f)[..., :length]
    grads = torch.autograd.grad(torch.nn.functional.silu(y), [x, *leaves],
                                dout.float().view(f, b, length).permute(1, 0, 2))
    dx_rows = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
    dx_rows[index] = grads[0].permute(1, 0, 2).reshape(f, n).t()
    return dx_rows, grads[1], grads[2] if bias is not None else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="BATCHxLENGTHxFEATURES (repeatable; default 8x2048x2048)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_conv_rows_bwd: needs a CUDA device", file=sys.stderr)
        return 2
    try:
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function
    except ImportError:
        print("bench_conv_rows_bwd: needs causal-conv1d (pip install -e '.[cuda]')", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}  bf16 x, fp32 conv weights, width 4, runs of 64 / 256 / 128 tokens")
    for shape in args.shape or ["8x2048x2048"]:
        if _compare(*(int(v) for v in shape.split("x")), iters=args.iters, backward=causal_conv1d_bwd_function):
            return 1
    return 0


def _compare(b: int, l: int, f: int, iters: int, backward) -> int:
    """Check the candidate at (b, l, f), then time the three rows; 1 if the candidate is wrong."""
    from mom.ops.triton.gather import gather_cols_t, gather_rows_t

    n = b * l
    rows = torch.randn(n, 2 * f, device="cuda", dtype=torch.bfloat16)[:, :f]  # x's half of in_proj's rows
    routing = Routing.build(interleaved_modalities(b, l, device="cuda"), 3)  # the benchmarks' runs of modalities
    perm, index = routing.perm, routing.inv_perm  # sorted row -> token, token -> sorted row
    weight, bias = torch.randn(f, 4, device="cuda"), torch.randn(f, device="cuda")
    dout = torch.randn(f, n, device="cuda", dtype=torch.bfloat16)
    dxz = torch.zeros(n, 2 * f, device="cuda", dtype=torch.bfloat16)  # in_proj's sorted gradient rows
    x_cols = gather_rows_t(rows, index)

    def bdl(cols: torch.Tensor) -> torch.Tensor:
        return cols.view(f, b, l).permute(1, 0, 2)

    def causal_alone() -> None:
        backward(bdl(x_cols), weight, bias, bdl(dout), None, None, None, bdl(torch.empty_like(x_cols)), False, True)

    def replaced() -> None:
        x = gather_rows_t(rows, index)
        dx = torch.empty_like(x)
        backward(bdl(x), weight, bias, bdl(dout), None, None, None, bdl(dx), False, True)
        gather_cols_t(dx, perm, out=dxz[:, :f])

    def candidate() -> None:
        conv_rows_bwd(rows, index, l, weight, bias, dout, dxz[:, :f])

    dw, db = conv_rows_bwd(rows, index, l, weight, bias, dout, dxz[:, :f])
    want_dx, want_dw, want_db = reference(rows, index, l, weight, bias, dout)
    scale = want_dw.abs().max().item()
    if not (torch.allclose(dxz[:, :f].float(), want_dx, atol=5e-2, rtol=2e-2)
            and torch.allclose(dw, want_dw, atol=1e-3 * scale, rtol=1e-3)
            and torch.allclose(db, want_db, atol=1e-3 * scale, rtol=1e-3)):
        print(f"({b}, {l}, {f}): candidate WRONG RESULT")
        return 1
    times = fastest({"causal-conv1d backward": causal_alone, "gather + backward + gather": replaced,
                     "candidate, rows": candidate}, iters=iters)
    print(f"({b}, {l}, {f}):")
    print_fastest(times, "candidate, rows", "gather + backward + gather")
    return 0


if __name__ == "__main__":
    sys.exit(main())
