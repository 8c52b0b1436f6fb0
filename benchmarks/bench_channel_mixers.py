"""Benchmark a MoM LM training step with channel mixing (EinFFT, the selective channel mixer, layer averaging) against
the plain MoM of the same size (AdamW, bf16 autocast, one GPU).

    python benchmarks/bench_channel_mixers.py                          # 768x24, batch 8x2048
    python benchmarks/bench_channel_mixers.py --model 1024x48 --batch 4 --length 2048

Prints, per variant, tokens/s, peak memory and analytic training FLOPs per token (`mom.model.flops`), each as a ratio
to the plain MoM; every variant is measured --rounds times, alternating, and its best round counts (as
bench_lm.py does).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import measure  # noqa: E402
from bench_lm import VOCAB_SPLIT, host_counts, make_batch, mom_forward, train_step_fn  # noqa: E402

import mom  # noqa: E402
from mom.model import flops  # noqa: E402

VARIANTS = {
    "plain": {},
    "einfft": {"channel_mixer": "einfft"},
    "selective": {"channel_mixer": "selective"},
    "averaging": {"layer_averaging": True},
    "selective+averaging": {"channel_mixer": "selective", "layer_averaging": True},
}


def bench(d_model: int, n_layer: int, batch: int, length: int, iters: int, rounds: int) -> None:
    configs = {name: mom.MoMConfig(vocab_sizes=VOCAB_SPLIT, d_model=d_model, n_layer=n_layer, **kw)
               for name, kw in VARIANTS.items()}
    ids = make_batch(configs["plain"], batch, length)
    counts = host_counts(configs["plain"], ids)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, config in configs.items():
            torch.cuda.empty_cache()
            model = mom.MoMForCausalLM(config).cuda()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            step = train_step_fn(model, ids, ids, optimizer, functools.partial(mom_forward, counts=counts))
            ms, gib, _ = measure(step, warmup=3, iters=iters)
            results[name].append((batch * length / (ms / 1e3), gib))
            del model, optimizer
    base_tps, base_mem = max(results["plain"])
    base_flops = flops.training_flops_per_token(configs["plain"])
    print(f"model d_model={d_model} n_layer={n_layer} batch={batch}x{length} "
          f"backend={mom.ops.backend.backend_name(torch.device('cuda'))} device={torch.cuda.get_device_name()}")
    print(f"{'variant':<22}{'tokens/s (k)':>14}{'x plain':>9}{'peak GiB':>10}{'x plain':>9}"
          f"{'train FLOPs/token':>19}{'x plain':>9}")
    for name, runs in results.items():
        tps, mem = max(runs)
        f = flops.training_flops_per_token(configs[name])
        print(f"{name:<22}{tps / 1e3:>14.1f}{tps / base_tps:>9.3f}{mem:>10.2f}{mem / base_mem:>9.3f}"
              f"{flops.human(f):>19}{f / base_flops:>9.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="768x24", help="D_MODELxN_LAYER")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    d_model, n_layer = (int(v) for v in args.model.lower().split("x"))
    bench(d_model, n_layer, args.batch, args.length, args.iters, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
