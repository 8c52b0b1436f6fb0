"""Benchmark the routed GEMM with its row gather / scatter fused (`mom.ops.triton.gathered_mm`) against what
`mom.ops.routed_linear` runs without it: ``torch._grouped_mm`` over the sorted rows and an ``index_select`` before
(input rows in sequence order) or after it (output rows to sequence order).

    python benchmarks/bench_gathered_mm.py                   # Mamba-2's routed GEMMs at 8 x 2048 x 1024, bf16
    python benchmarks/bench_gathered_mm.py --shape 4x4096x2048 --sweep   # and the kernel's tilings

For each GEMM of a Mamba-2 layer (sorted residual stream) whose rows change order: in_proj's output to sequence
order (forward), out_proj's input gradient to sequence order (backward), and out_proj's input from sequence order
(a forward without backward: a training forward sorts those rows for the weight gradients), it prints, in
microseconds per call (CUDA events over ``--iters`` calls, after warm-up):
  fused     `gathered_mm` at its tuned tiling (`gathered_mm.tuned`: the fastest of its candidates, picked on the
            first call)
  unfused   index_select + torch._grouped_mm (routed_linear's path without the kernel), and the two parts alone
and the ratio fused / unfused. Modalities in runs of 64 / 256 / 128 tokens, three experts. ``--sweep`` also times
each of `SWEEP`'s tilings (one Triton compilation each) and prints the best. Every output is checked against the
unfused one first.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mom.ops.triton.gathered_mm import Tiles, gathered_mm

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_common import interleaved_modalities, measure  # noqa: E402

EXPERTS = 3
# --sweep's grid: (rows, outputs, k) per program x (warps, stages)
SWEEP = [Tiles(128, 128, 64, 8, 4, 4), Tiles(128, 128, 64, 8, 8, 3), Tiles(128, 128, 64, 8, 8, 4),
         Tiles(128, 256, 64, 8, 8, 3), Tiles(128, 256, 64, 8, 8, 4), Tiles(64, 128, 64, 8, 4, 4),
         Tiles(64, 256, 64, 8, 8, 3), Tiles(128, 64, 64, 8, 4, 4), Tiles(128, 128, 32, 8, 4, 5)]


def time_us(fn, iters: int) -> float:
    """Microseconds per call (`bench_common.measure`, 3 warm-up calls)."""
    return measure(fn, warmup=3, iters=iters)[0] * 1000


def cases(d_model: int, headdim: int = 64, d_state: int = 128):
    """(name, K, O, gather the input, scatter the output, weights stored (E, O, K) and read transposed) of a
    Mamba-2 layer's routed GEMMs that cross orders."""
    d_inner = 2 * d_model
    d_in_proj = 2 * d_inner + 2 * d_state + d_inner // headdim
    return [
        ("in_proj fwd (scatter out)", d_model, d_in_proj, False, True, True),
        ("out_proj fwd (gather in)", d_inner, d_model, True, False, True),
        ("out_proj dx (scatter out)", d_model, d_inner, False, True, False),
    ]


def bench_case(name, K, O, gather, scatter, transposed, perm, inv_perm, ends, iters, sweep) -> bool:
    """Print one GEMM's fused and unfused times (and the sweep's); False if an output is wrong."""
    n = perm.numel()
    a = torch.randn(n, K, device="cuda", dtype=torch.bfloat16)
    if transposed:  # nn.Linear weights (E, O, K), read as (E, K, O)
        w = (torch.randn(EXPERTS, O, K, device="cuda", dtype=torch.bfloat16) / K**0.5).transpose(1, 2)
    else:
        w = torch.randn(EXPERTS, K, O, device="cuda", dtype=torch.bfloat16) / K**0.5
    moved = a if gather else torch.empty(n, O, device="cuda", dtype=torch.bfloat16)  # what the row gather moves

    def unfused():
        rows = a.index_select(0, perm) if gather else a
        out = torch._grouped_mm(rows, w, offs=ends)
        return out.index_select(0, inv_perm) if scatter else out

    def fused(tiles=None):
        return gathered_mm(a, w, ends, a_index=perm if gather else None, out_index=perm if scatter else None,
                           tiles=tiles)

    want = unfused().float()
    scale = want.abs().max().item()
    err = (fused().float() - want).abs().max().item() / scale
    if err > 2e-2:
        print(f"{name}: fused output differs from the unfused one (max error {err:.3g} of the largest entry)")
        return False
    t_unfused = time_us(unfused, iters)
    t_gemm = time_us(lambda: torch._grouped_mm(a, w, offs=ends), iters)
    t_gather = time_us(lambda: moved.index_select(0, perm), iters)
    t_fused = time_us(fused, iters)
    print(f"{name:<28} K {K:5d} O {O:5d}  fused {t_fused:8.1f} us  unfused {t_unfused:8.1f} us "
          f"(grouped GEMM {t_gemm:7.1f}, row gather {t_gather:6.1f})  ratio {t_fused / t_unfused:.3f}")
    if not sweep:
        return True
    best = None
    for tiles in SWEEP:
        try:
            out = fused(tiles)
        except Exception as exc:  # noqa: BLE001 - a tiling this GPU cannot compile (shared memory)
            print(f"    {tiles}: {type(exc).__name__}")
            continue
        if (out.float() - want).abs().max().item() / scale > 2e-2:
            print(f"    {tiles}: WRONG")
            return False
        t = time_us(lambda tiles=tiles: fused(tiles), iters)
        print(f"    m {tiles.m:3d} n {tiles.n:3d} k {tiles.k:3d} warps {tiles.warps} stages {tiles.stages}: "
              f"{t:8.1f} us  ratio {t / t_unfused:.3f}")
        best = min(best or (t, tiles), (t, tiles), key=lambda p: p[0])
    if best:
        print(f"    best {best[1]}: {best[0]:.1f} us, ratio {best[0] / t_unfused:.3f}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8x2048x1024", help="batch x length x d_model")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time SWEEP's tilings")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    batch, length, d_model = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    ids = interleaved_modalities(batch, length).reshape(-1)
    n = ids.numel()
    perm = torch.sort(ids, stable=True).indices  # sorted row j is token perm[j]
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(n, device=perm.device)
    ends = torch.bincount(ids, minlength=EXPERTS).cumsum(0).to(torch.int32)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {n} tokens, d_model {d_model}")
    for case in cases(d_model):
        if not bench_case(*case, perm, inv_perm, ends, args.iters, args.sweep):
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
