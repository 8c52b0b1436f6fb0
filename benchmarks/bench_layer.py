"""Benchmark one MoM mixer layer against mamba-ssm's fused dense `Mamba` layer (bf16 autocast, fwd+bwd).

    python benchmarks/bench_layer.py                     # the two default shapes
    python benchmarks/bench_layer.py --shape 8x2048x1024 --runs 64,256,128
    python benchmarks/bench_layer.py --rounds 5 --accumulate
    python benchmarks/bench_layer.py --layout balanced --layout skewed --layout single   # MoM vs its balanced time

Every variant runs in the same process on the same inputs, in alternating rounds (``--rounds``, best time kept);
prints time, peak memory and the peak above what stays resident between steps (parameters, the inputs, and with
``--accumulate`` the gradients: MoM has M times the projection weights), each with its ratio to mamba-ssm's fused
dense layer (the target). Each step is a training step's fwd+bwd: the gradients are dropped after it, as
``optimizer.zero_grad()`` drops them (``--accumulate`` keeps them, so that each backward adds into ``.grad``, as a
micro-batch of gradient accumulation does). The other rows attribute the gap: mamba-ssm without its fused path,
our mixer with ``decouple=()`` (no routing), and each of ours on the module path (``use_fast_path=False``:
per-expert module calls, the reference the fast path is tested against).
"sorted stream" is the fast path as the LM runs it (`mom.model.mixer.sorted_stream`): its input and output rows are in
the routing's sorted order, so the row gathers around in_proj and out_proj are not needed (the model permutes its
stream once per forward instead). Routing is built once per model forward and shared by all layers, so its cost is
printed separately.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import LAYOUTS, layer_inputs, layout_modalities, measure, mom_mixer, shares  # noqa: E402

import mom  # noqa: E402
from mom.model.config import PROJECTIONS  # noqa: E402
from mom.model.routing import Routing  # noqa: E402


def _step(layer, routing, x, grad, sorted_tokens=False, accumulate=False):
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x) if routing is None else layer(x, routing, sorted_tokens=sorted_tokens)
        y.backward(grad)
        if not accumulate:  # a training step: the optimizer consumes the gradients, zero_grad() drops them
            layer.zero_grad(set_to_none=True)
            x.grad = None

    return step


def _build_routing(modality_ids, num_modalities):
    """What one model forward computes of its routing for the fast path (`Routing.routes`): permutation, inverse,
    group offsets, expert ids, one-hot; and the counts on the host, as a forward given them has them."""
    routing = Routing.build(modality_ids, num_modalities)
    routing.routes(torch.bfloat16)
    routing.host_counts.read()
    return routing


def bench_shape(batch: int, length: int, d_model: int, runs: tuple[int, ...], iters: int,
                accumulate: bool = False, rounds: int = 3, layout: str = "balanced") -> dict[str, float]:
    """Print the variants' times and memory at one shape and layout; -> best ms of each variant."""
    from mamba_ssm.modules.mamba_simple import Mamba

    device = "cuda"
    modality_ids = layout_modalities(layout, batch, length, runs, device)
    x, grad = layer_inputs(batch, length, d_model, device)

    routing = Routing.build(modality_ids, len(runs))

    def mamba(fast: bool):
        return Mamba(d_model, d_state=16, d_conv=4, expand=2, use_fast_path=fast).to(device)

    variants = {  # name: (layer factory, routing or None)
        "mamba-ssm fused (dense)": (lambda: mamba(True), None),
        "mamba-ssm unfused (dense)": (lambda: mamba(False), None),
        "mom dense, module path": (lambda: mom_mixer(len(runs), d_model, (), fast=False), routing),
        "mom dense, fast path": (lambda: mom_mixer(len(runs), d_model, ()), routing),
        "MoM, module path": (lambda: mom_mixer(len(runs), d_model, PROJECTIONS, fast=False), routing),
        "MoM, fast path": (lambda: mom_mixer(len(runs), d_model, PROJECTIONS), routing),
        "MoM, fast, sorted stream": (lambda: mom_mixer(len(runs), d_model, PROJECTIONS), routing),
    }
    print(f"shape b={batch} l={length} d_model={d_model} layout={layout} ({shares(modality_ids, len(runs))}) "
          f"backend={mom.ops.backend.backend_name(x.device)}"
          f" gradients={'accumulated into .grad' if accumulate else 'dropped after each step'}"
          f" rounds={rounds} (best time of each)")
    times = {name: [] for name in variants}
    memory = {}
    for _ in range(rounds):  # alternating rounds: a slow spell of the GPU hits every variant, not one
        for name, (factory, r) in variants.items():
            ms, gib, resident = measure(_step(factory(), r, x, grad, "sorted" in name, accumulate), iters=iters)
            times[name].append(ms)
            memory[name] = (gib, gib - resident)  # the same every round; above resident: activations, temporaries
            x.grad = None
            torch.cuda.empty_cache()
    base = (min(times["mamba-ssm fused (dense)"]), *memory["mamba-ssm fused (dense)"])
    for name in variants:
        ms, (gib, added) = min(times[name]), memory[name]
        rounds_ms = " ".join(f"{t:.3f}" for t in times[name]) if rounds > 1 else ""
        print(f"  {name:<26} {ms:8.3f} ms ({ms / base[0]:5.3f}x)   peak {gib:6.3f} GiB ({gib / base[1]:5.3f}x)"
              f"   above resident {added:6.3f} GiB ({added / base[2]:5.3f}x)   {rounds_ms}")
    t_route, _, _ = measure(lambda: _build_routing(modality_ids, len(runs)), iters=iters)
    print(f"  routing build (once per model forward): {t_route:.3f} ms")
    return {name: min(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="BATCHxLENGTHxD_MODEL (repeatable)")
    parser.add_argument("--runs", default="64,256,128", help="modality run lengths of the balanced layout")
    parser.add_argument("--layout", action="append", choices=LAYOUTS,
                        help="batch layout (repeatable; default balanced): skewed = 90%% text, 10%% image, speech "
                        "in half the rows; single = text only. With several, MoM's time on each is compared with "
                        "its time on the first")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the variants; best time kept")
    parser.add_argument("--accumulate", action="store_true",
                        help="keep the parameters' .grad between steps, so that each backward adds into them (as a "
                             "micro-batch of gradient accumulation does); default: dropped after each step, as "
                             "optimizer.zero_grad() drops them")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_layer: needs a CUDA device", file=sys.stderr)
        return 2
    shapes = args.shape or ["8x2048x1024", "4x4096x2048"]
    print("device:", torch.cuda.get_device_name())
    layouts = args.layout or ["balanced"]
    for s in shapes:
        b, l, d = (int(v) for v in s.split("x"))
        best = {}
        for layout in layouts:
            best[layout] = bench_shape(b, l, d, tuple(int(v) for v in args.runs.split(",")), args.iters,
                                       args.accumulate, args.rounds, layout)
            torch.cuda.empty_cache()
        for layout in layouts[1:]:
            for name in ("MoM, fast path", "MoM, fast, sorted stream"):
                print(f"  {name} on {layout} / on {layouts[0]}: {best[layout][name] / best[layouts[0]][name]:.3f}x "
                      f"time ({best[layout][name]:.3f} vs {best[layouts[0]][name]:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
