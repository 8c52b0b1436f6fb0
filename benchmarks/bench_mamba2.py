"""Benchmark the MoM Mamba-2 (SSD) mixer layer against mamba-ssm's dense `Mamba2` layer (bf16 autocast, fwd+bwd).

    python benchmarks/bench_mamba2.py                                  # (8, 2048, 1024), the issue's shape
    python benchmarks/bench_mamba2.py --shape 4x4096x2048 --rounds 5
    python benchmarks/bench_mamba2.py --counts device                  # the default call: counts not read on the host

Every variant runs in the same process on the same inputs, in alternating rounds (``--rounds``, best time kept), as
benchmarks/bench_layer.py does for Mamba-1; prints time and peak memory with their ratio to mamba-ssm's ``Mamba2``
(``use_mem_eff_path=True``: in_proj, then its fused conv + SSD scan + gated norm + out_proj Function). The goal for
MoM is at most 1.10x. "mom dense" is `mom.model.mamba2.Mamba2Mixer` with ``decouple=()``; "MoM, fast path" the same
mixer with in_proj and out_proj routed per modality on its fast path (each routed projection ONE grouped GEMM over
the modality-sorted rows, `mom.ops.routed_linear`, with the row permutations around it; mamba-ssm's
``mamba_split_conv1d_scan_combined`` without its out_proj between them), called alone on rows in sequence order;
"MoM, fast, sorted stream" the same as the LM runs it (`mom.model.mixer.sorted_stream`: its input and output rows in
the sorted order, so in_proj reads and out_proj writes without a permutation); "..., mamba-ssm's launches" the same
with ``MOM_DIRECT_LAUNCH=0``: mamba-ssm's SSD function as it ships, its Triton kernels launched through Triton's
autotuner and JIT, where mom's rebound copy launches them directly once tuned (`mom.ops.triton.rebind`; the same
kernels, so the difference is host time); "MoM, module path" calls every expert
as a module (``use_fast_path=False``: the reference, what LoRA-wrapped or ZeRO-3-partitioned experts take).
``--counts host`` (default): the tokens per modality are known on the host, as when the trainer passes
``modality_counts`` (large GEMMs then run per expert); ``device``: unknown, every routed GEMM grouped on the device's
offsets. Routing is built once per model forward and shared by all layers (not timed here; benchmarks/bench_layer.py
prints its cost).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import DEFAULT_RUNS, interleaved_modalities, launches, layer_inputs, measure  # noqa: E402

import mom  # noqa: E402
from mom.model.routing import Routing  # noqa: E402

D_STATE, HEADDIM, NGROUPS, CHUNK_SIZE, D_CONV, EXPAND = 128, 64, 1, 256, 4, 2  # mamba-ssm Mamba2's defaults


def mom_mamba2(num_modalities: int, d_model: int, decouple, fast: bool = True, device: str = "cuda"):
    """One MoM Mamba-2 mixer with mamba-ssm Mamba2's initialisation (built through the LM, which initialises it)."""
    config = mom.MoMConfig(modalities=("text", "image", "speech")[:num_modalities], vocab_sizes=(16,) * num_modalities,
                           d_model=d_model, n_layer=1, decouple=decouple, use_fast_path=fast, mixer="mamba2",
                           d_state=D_STATE, headdim=HEADDIM, ngroups=NGROUPS, chunk_size=CHUNK_SIZE, d_conv=D_CONV,
                           expand=EXPAND)
    return mom.MoMForCausalLM(config).backbone.layers[0].mixer.to(device)


def dense_mamba2(d_model: int, device: str = "cuda"):
    """mamba-ssm's dense `Mamba2` at the same sizes, on its memory-efficient (fused) path."""
    from mamba_ssm.modules.mamba2 import Mamba2

    return Mamba2(d_model, d_state=D_STATE, d_conv=D_CONV, expand=EXPAND, headdim=HEADDIM, ngroups=NGROUPS,
                  chunk_size=CHUNK_SIZE, use_mem_eff_path=True).to(device)


def train_step(layer, routing, x, grad, sorted_tokens=False):
    """A training step's fwd + bwd of ``layer`` (bf16 autocast), gradients dropped after it."""

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x) if routing is None else layer(x, routing, sorted_tokens=sorted_tokens)
        y.backward(grad)
        layer.zero_grad(set_to_none=True)  # a training step: the optimizer consumes the gradients
        x.grad = None

    return step


def bench_shape(batch: int, length: int, d_model: int, runs: tuple[int, ...], iters: int, rounds: int,
                counts: str = "host") -> None:
    device = "cuda"
    modality_ids = interleaved_modalities(batch, length, runs, device)
    routing = Routing.build(modality_ids, len(runs))
    if counts == "host":  # as a forward given modality_counts: read once, not timed
        routing.set_counts(tuple(routing.device_counts.tolist()))
    x, grad = layer_inputs(batch, length, d_model, device)

    routed = ("in_proj", "out_proj")
    variants = {  # name: (layer factory, routing or None, sorted_tokens, direct launches (`bench_common.launches`))
        "mamba-ssm Mamba2 (dense)": (lambda: dense_mamba2(d_model, device), None, False, True),
        "mom dense (decouple=())": (lambda: mom_mamba2(len(runs), d_model, ()), routing, False, True),
        "MoM, fast path": (lambda: mom_mamba2(len(runs), d_model, routed), routing, False, True),
        "MoM, fast, sorted stream": (lambda: mom_mamba2(len(runs), d_model, routed), routing, True, True),
        "..., mamba-ssm's launches": (lambda: mom_mamba2(len(runs), d_model, routed), routing, True, False),
        "MoM, module path": (lambda: mom_mamba2(len(runs), d_model, routed, fast=False), routing, False, True),
    }
    print(f"shape b={batch} l={length} d_model={d_model} d_state={D_STATE} headdim={HEADDIM} runs={runs} "
          f"counts={counts} rounds={rounds} (best time of each)")
    times = {name: [] for name in variants}
    memory = {}
    for _ in range(rounds):  # alternating rounds: a slow spell of the GPU hits every variant, not one
        for name, (factory, r, sorted_tokens, direct) in variants.items():
            with launches(direct):
                layer = factory()
                if r is not None and layer.fast_path_applies(x) != layer.use_fast_path:
                    raise RuntimeError(f"{name}: use_fast_path={layer.use_fast_path} but the fast path applies: "
                                       f"{layer.fast_path_applies(x)}")
                ms, gib, _ = measure(train_step(layer, r, x, grad, sorted_tokens), iters=iters)
            times[name].append(ms)
            memory[name] = gib
            torch.cuda.empty_cache()
    base_ms, base_gib = min(times["mamba-ssm Mamba2 (dense)"]), memory["mamba-ssm Mamba2 (dense)"]
    for name in variants:
        ms, gib = min(times[name]), memory[name]
        print(f"  {name:<27} {ms:8.3f} ms ({ms / base_ms:5.3f}x)   peak {gib:6.3f} GiB ({gib / base_gib:5.3f}x)"
              f"   rounds: {' '.join(f'{t:.3f}' for t in times[name])}")
    for name in ("MoM, fast path", "MoM, fast, sorted stream", "..., mamba-ssm's launches"):
        print(f"  {name} / mamba-ssm Mamba2: time {min(times[name]) / base_ms:.3f}x (goal <= 1.10x), "
              f"peak memory {memory[name] / base_gib:.3f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="BATCHxLENGTHxD_MODEL (repeatable); default 8x2048x1024")
    parser.add_argument("--runs", default=",".join(map(str, DEFAULT_RUNS)), help="modality run lengths")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the variants; best time kept")
    parser.add_argument("--counts", choices=("host", "device"), default="host",
                        help="tokens per modality known on the host (as mom-train passes them) or not (default call)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_mamba2: needs a CUDA device", file=sys.stderr)
        return 2
    if mom.ops.backend.mamba2_kernels(torch.empty(1, device="cuda")) is None:
        print("bench_mamba2: needs mamba-ssm's SSD kernels (pip install -e '.[cuda]')", file=sys.stderr)
        return 2
    print("device:", torch.cuda.get_device_name())
    for s in args.shape or ["8x2048x1024"]:
        b, l, d = (int(v) for v in s.split("x"))
        bench_shape(b, l, d, tuple(int(v) for v in args.runs.split(",")), args.iters, args.rounds, args.counts)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
