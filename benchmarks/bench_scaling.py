"""Scaling of `mom-train` over the GPUs of one host under ZeRO stages, MoM against its dense twin.

    python benchmarks/bench_scaling.py                                       # 160M t2i, 1/2/4/8 GPUs, ZeRO-1/2/3
    python benchmarks/bench_scaling.py --recipe recipes/t2i_760m_mom.yaml --gpus 1,8 --stages 1
    python benchmarks/bench_scaling.py --recipe recipes/t2i_1b4_mom.yaml --gpus 8 --stages 3 --only mom   # memory

For every stage, GPU count and side (MoM, dense), runs ``deepspeed --num_gpus N --module mom.train`` for --steps
steps at --batch rows of --length tokens per GPU (grad_accum 1; benchmarks/bench_trainer.py's settings: no
evaluation, no saves) and reads from the run's metrics.jsonl the token-weighted tokens/s of the log windows after
--warmup steps and rank 0's peak GPU memory (``peak_gib``). Prints per row: tokens/s of all GPUs, per GPU, scaling
efficiency (tokens/s per GPU against one GPU at the same stage and side) and MoM / dense. Issue goals: efficiency at
least 0.90 at 2 GPUs and 0.85 at 8 for ZeRO-1/2; MoM at least 0.90x of dense under the same stage.

NCCL's NVLink multicast (NVLS) is switched off (``NCCL_NVLS_ENABLE=0``) unless the environment sets it. The corpus
is chosen as in bench_trainer (--corpus, the recipe's, the bundled one if its vocabulary fits, else synthetic).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_trainer import ROOT, choose_corpus, dense_twin, run_trainer  # noqa: E402

from mom.train.metrics import read_jsonl  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "t2i_160m_mom.yaml")
    parser.add_argument("--dense", type=Path, help="the dense twin's recipe (default: the name with _dense)")
    parser.add_argument("--only", choices=("mom", "dense"))
    parser.add_argument("--gpus", type=ints, default=[1, 2, 4, 8], help="GPU counts, e.g. 1,2,8")
    parser.add_argument("--stages", type=ints, default=[1, 2, 3], help="ZeRO stages, e.g. 1,3")
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="rows per GPU")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_scaling"))
    parser.add_argument("--master-port", type=int, default=29617)
    parser.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    args = parser.parse_args(argv)
    args.eval_every, args.profile = 0, False  # what bench_trainer's run_trainer reads
    available = torch.cuda.device_count()
    if max(args.gpus) > available:
        print(f"bench_scaling: --gpus asks for {max(args.gpus)} GPUs, this machine has {available}", file=sys.stderr)
        return 2
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    sides = {"mom": args.recipe, "dense": args.dense or dense_twin(args.recipe)}
    if args.only:
        sides = {args.only: sides[args.only]}
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = choose_corpus(args)
    print("device:", torch.cuda.get_device_name(), "x", available, "| torch", torch.__version__, flush=True)

    rows = {}  # (stage, gpus, side) -> (tokens/s of all GPUs, peak GiB)
    for stage in args.stages:
        for gpus in args.gpus:
            for side, recipe in sides.items():
                out = args.work / f"z{stage}_g{gpus}_{side}"
                tps, _, _ = run_trainer(recipe, corpus, out, args, gpus=gpus,
                                        extra=(f"deepspeed.zero_stage={stage}",))
                peak = read_jsonl(out / "metrics.jsonl")[-1].get("peak_gib")
                rows[stage, gpus, side] = (tps, peak)

    print(f"\nbatch {args.batch} x {args.length} per GPU, {args.steps} steps ({args.warmup} not counted)")
    print(f"{'ZeRO':>4} {'GPUs':>4} {'side':<6} {'tokens/s':>12} {'per GPU':>10} {'efficiency':>10} "
          f"{'MoM/dense':>9} {'peak GiB':>8}")
    for (stage, gpus, side), (tps, peak) in rows.items():
        base = rows.get((stage, min(args.gpus), side))
        efficiency = (tps / gpus) / (base[0] / min(args.gpus)) if base else float("nan")
        dense = rows.get((stage, gpus, "dense"))
        ratio = f"{tps / dense[0]:9.3f}" if side == "mom" and dense else f"{'':9}"
        print(f"{stage:>4} {gpus:>4} {side:<6} {tps:>12,.0f} {tps / gpus:>10,.0f} {efficiency:>10.3f} {ratio} "
              f"{peak if peak is None else round(peak, 2):>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
