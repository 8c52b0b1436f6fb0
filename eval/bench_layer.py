"""Benchmark one MoM mixer layer against mamba-ssm's fused dense `Mamba` layer (bf16 autocast, fwd+bwd).

    python eval/bench_layer.py                     # the two default shapes
    python eval/bench_layer.py --shape 8x2048x1024 --runs 64,256,128

Both sides run in the same process on the same inputs; prints time, peak memory and their ratio (MoM / dense).
Routing is built once per model forward and shared by all layers, so its cost is printed separately.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import interleaved_modalities, measure, row  # noqa: E402

import mom  # noqa: E402
from mom.mixer import MoMMixer  # noqa: E402
from mom.routing import Routing  # noqa: E402


def bench_shape(batch: int, length: int, d_model: int, runs: tuple[int, ...], iters: int) -> None:
    from mamba_ssm.modules.mamba_simple import Mamba

    device = "cuda"
    modality_ids = interleaved_modalities(batch, length, runs, device)
    config = mom.MoMConfig(vocab_sizes=(16, 16, 16)[: len(runs)], modalities=("text", "image", "speech")[: len(runs)],
                           d_model=d_model, n_layer=1)
    model = mom.MoMForCausalLM(config)  # for Mamba's initialisation of the mixer
    mixer: MoMMixer = model.backbone.layers[0].mixer.to(device)
    dense = Mamba(d_model, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand).to(device)
    x = torch.randn(batch, length, d_model, device=device, requires_grad=True)
    grad = torch.randn(batch, length, d_model, device=device, dtype=torch.bfloat16)

    def routing() -> Routing:
        return Routing.build(modality_ids, config.num_modalities)

    r = routing()

    def step_mom() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mixer(x, r)
        y.backward(grad)

    def step_dense() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = dense(x)
        y.backward(grad)

    t_mom, m_mom = measure(step_mom, iters=iters)
    mixer.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.empty_cache()
    t_dense, m_dense = measure(step_dense, iters=iters)
    t_route, _ = measure(routing, iters=iters)
    print(f"shape b={batch} l={length} d_model={d_model} runs={runs} backend={mom.kernels.backend_name(x.device)}")
    print(row("fwd+bwd time", t_mom, t_dense, "ms"))
    print(row("peak memory", m_mom, m_dense, "GiB"))
    print(f"{'routing build (per forward)':<28} {t_route:.3f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", help="BATCHxLENGTHxD_MODEL (repeatable)")
    parser.add_argument("--runs", default="64,256,128", help="modality run lengths")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_layer: needs a CUDA device", file=sys.stderr)
        return 2
    shapes = args.shape or ["8x2048x1024", "4x4096x2048"]
    print("device:", torch.cuda.get_device_name())
    for s in shapes:
        b, l, d = (int(v) for v in s.split("x"))
        bench_shape(b, l, d, tuple(int(v) for v in args.runs.split(",")), args.iters)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
