"""Benchmark a hybrid MoM LM's training step (attention blocks among the Mamba ones) against the pure-Mamba MoM LM of
the same width and depth (AdamW, bf16 autocast).

    python benchmarks/bench_hybrid.py                              # 1024x24, blocks 18 and 21 attention, batch 8x2048
    python benchmarks/bench_hybrid.py --model 1024x24 --attention 18,21 --batch 8 --length 2048 --decouple dense

Both sides are given the batch's tokens per modality, counted on the host (`modality_counts`, as `mom.train` does).
Prints tokens/s, peak memory and MFU (each at its own FLOPs per token: attention's depend on the length) for the
hybrid and the pure model and their ratio (hybrid / pure), same process, same data; each side is measured --rounds
times, alternating (a fresh model each time), and its best round is compared, as benchmarks/bench_lm.py does.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import measure  # noqa: E402
from bench_lm import VOCAB_SPLIT, host_counts, make_batch, train_step_fn  # noqa: E402

import mom  # noqa: E402
from mom.model import flops  # noqa: E402
from mom.model.config import PROJECTIONS  # noqa: E402


def config_for(d_model: int, n_layer: int, attention: tuple[int, ...], decouple) -> mom.MoMConfig:
    return mom.MoMConfig(vocab_sizes=VOCAB_SPLIT, d_model=d_model, n_layer=n_layer, decouple=decouple,
                         attention_layers=attention)


def loss_fn(counts: tuple[int, ...]):
    def forward(model, ids, labels) -> torch.Tensor:
        return model(ids, labels=labels, modality_counts=counts).loss

    return forward


def hybrid_row(name: str, hybrid: float, pure: float, unit: str) -> str:
    ratio = hybrid / pure if pure else float("nan")
    return f"{name:<16} hybrid {hybrid:10.3f} {unit:<4} pure {pure:10.3f} {unit:<4} ratio {ratio:6.3f}"


def bench(d_model: int, n_layer: int, attention: tuple[int, ...], decouple, batch: int, length: int, iters: int,
          rounds: int, device: str = "cuda") -> dict[str, tuple[float, float, int]]:
    """-> {"hybrid" | "pure": (best tokens/s, its peak GiB, parameters)}; each side measured ``rounds`` times,
    alternating, a fresh model each time."""
    configs = {"hybrid": config_for(d_model, n_layer, attention, decouple), "pure": config_for(d_model, n_layer, (),
                                                                                             decouple)}
    ids = make_batch(configs["pure"], batch, length, device)
    counts = host_counts(configs["pure"], ids)  # counted once, off the timed steps
    results: dict[str, list[tuple[float, float, int]]] = {"hybrid": [], "pure": []}
    for _ in range(rounds):
        for name, config in configs.items():
            torch.cuda.empty_cache()
            model = mom.MoMForCausalLM(config).to(device)
            params = sum(p.numel() for p in model.parameters())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            ms, gib, _ = measure(train_step_fn(model, ids, ids, optimizer, loss_fn(counts)), warmup=3, iters=iters)
            results[name].append((batch * length / (ms / 1e3), gib, params))
            del model, optimizer
    for name, runs in results.items():
        print(f"  {name} tokens/s per round (k): " + ", ".join(f"{tps / 1e3:.1f}" for tps, _, _ in runs))
    best = {name: max(runs) for name, runs in results.items()}
    (tps_h, mem_h, p_h), (tps_p, mem_p, p_p) = best["hybrid"], best["pure"]
    mfu_h = flops.mfu(tps_h, configs["hybrid"], torch.device(device), seq_len=length)
    mfu_p = flops.mfu(tps_p, configs["pure"], torch.device(device), seq_len=length)
    print(f"model d_model={d_model} n_layer={n_layer} attention_layers={list(attention)} "
          f"decouple={list(decouple) or '[] (dense)'} batch={batch}x{length} params hybrid {p_h / 1e6:.1f}M "
          f"pure {p_p / 1e6:.1f}M backend={mom.ops.backend.backend_name(torch.device(device))}")
    print(hybrid_row("tokens/s (k)", tps_h / 1e3, tps_p / 1e3, "k/s"))
    print(hybrid_row("peak memory", mem_h, mem_p, "GiB"))
    if mfu_h is not None and mfu_p is not None:
        print(hybrid_row("MFU", mfu_h, mfu_p, ""))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1024x24", help="D_MODELxN_LAYER; default 1024x24")
    parser.add_argument("--attention", default="18,21", help="comma-separated attention block indices")
    parser.add_argument("--decouple", choices=("mom", "dense"), default="mom",
                        help="mom: every projection per modality (q/k/v/o included); dense: decouple []")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="measurements per side, alternating; the best counts")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_hybrid: needs a CUDA device", file=sys.stderr)
        return 2
    d, n = (int(v) for v in args.model.split("x"))
    attention = tuple(int(i) for i in args.attention.split(",") if i)
    decouple = PROJECTIONS if args.decouple == "mom" else ()
    print("device:", torch.cuda.get_device_name())
    bench(d, n, attention, decouple, args.batch, args.length, args.iters, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
