"""Benchmark `mom-train` under DeepSpeed on one GPU against bench_lm's raw training step at the same model, batch
and length, back to back on the same machine, for a MoM recipe and its dense twin.

    python benchmarks/bench_trainer.py                                   # t2i 160M MoM + dense twin, batch 8x2048
    python benchmarks/bench_trainer.py --recipe recipes/t2i_60m_mom.yaml --steps 60 --eval-every 20

For each model: (a) `deepspeed --num_gpus 1 --module mom.train --config RECIPE ...` for --steps steps (grad_accum 1,
logging every --log-every steps, no evaluation unless --eval-every), its tokens/s read from the run's metrics.jsonl:
the log windows after the first --warmup steps, token-weighted (each window's figure is training time only:
evaluation and saves are excluded by the trainer); (b) bench_lm's raw step (`train_step_fn`: bf16 autocast, torch's
fused AdamW, tokens per modality given) on the model the trainer built (the recipe's resolved config), same batch
and length. Prints both, each window's tokens/s (dips would show there) and the ratio trainer / raw.

The corpus: --corpus, else the recipe's data.path, else the bundled data/small where its vocabulary fits the recipe,
else a synthetic corpus written under --work: random interleaved documents in the corpus format with the recipe's
modalities and vocabulary, for measuring speed only (its losses mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import DEFAULT_RUNS, interleaved_modalities, measure  # noqa: E402
from bench_lm import host_counts, mom_forward, train_step_fn  # noqa: E402

import mom  # noqa: E402
from mom.data.kinds import KINDS  # noqa: E402
from mom.data.loader import SHARD_SCHEMA  # noqa: E402
from mom.model import flops  # noqa: E402
from mom.train.metrics import read_jsonl  # noqa: E402
from mom.train.profiling import summarize  # noqa: E402
from mom.train.recipe import load_recipe  # noqa: E402
from mom.train.resolve import check_corpus, resolve_model_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "small"
PROFILED_STEPS = 5  # steps recorded by --profile, on each side
SPEED_ONLY_NOTE = "SPEED-ONLY synthetic corpus: random token ids, written by benchmarks/bench_trainer.py"


def dense_twin(recipe: Path) -> Path:
    twin = recipe.with_name(recipe.name.replace("_mom", "_dense"))
    if twin == recipe or not twin.is_file():
        raise SystemExit(f"bench_trainer: no dense twin {twin} of {recipe} (name it with --dense)")
    return twin


def corpus_fits(recipe: Path, corpus: Path, overrides: list[str]) -> bool:
    if not (corpus / "manifest.json").is_file():
        return False
    r = load_recipe(recipe, [*overrides, f"data.path={corpus}"])
    try:
        check_corpus(resolve_model_config(r), r)
    except (ValueError, FileNotFoundError):
        return False
    return True


def synthetic_corpus(root: Path, modalities: tuple[str, ...], vocab_sizes: tuple[int, ...], tokens: int,
                     seed: int = 0) -> Path:
    """A corpus of random interleaved documents (BOS, spans of each modality, EOS) of about ``tokens`` training
    tokens, in the layout `mom-data build` writes; kinds hold only the given modalities."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    offsets = np.cumsum((0, *vocab_sizes[:-1]))
    kinds = [k for k in ("text", "image_caption", "caption_image") if k in KINDS]
    if "speech" in modalities:
        kinds += [k for k in ("speech_transcript", "transcript_speech", "mixed") if k in KINDS]
    special = 8  # text ids below this are special tokens (mom.tokenization.special)

    def document(doc_id: int) -> dict:
        ids, mods = [2], [0]  # BOS
        for _ in range(int(rng.integers(2, 6))):
            m = int(rng.integers(0, len(modalities)))
            n = int(rng.integers(64, 512))
            low = special if m == 0 else 0
            ids += (offsets[m] + rng.integers(low, vocab_sizes[m], n)).tolist()
            mods += [m] * n
        return {"input_ids": ids + [3], "modality_ids": mods + [0], "doc_id": doc_id,
                "kind": kinds[doc_id % len(kinds)], "source": "synthetic-speed-only", "meta": "{}"}

    manifest = {"format": "mom-corpus", "version": 1, "name": "synthetic-speed-only", "note": SPEED_ONLY_NOTE,
                "modalities": list(modalities), "vocab_sizes": list(vocab_sizes), "splits": {}}
    first = 0
    for split, n_tokens in (("train", tokens), ("validation", tokens // 20)):
        docs, count = [], 0
        while count < n_tokens:
            docs.append(document(first + len(docs)))
            count += len(docs[-1]["input_ids"])
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(docs, schema=SHARD_SCHEMA), root / split / "shard-00000.parquet",
                       row_group_size=256)
        manifest["splits"][split] = {"shards": [f"{split}/shard-00000.parquet"], "documents": len(docs)}
        first += len(docs)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def steady_tokens_per_s(metrics: Path, warmup: int, last: int | None = None) -> tuple[float, list[tuple[int, float]]]:
    """Token-weighted tokens/s of the log windows ending after step ``warmup`` (and at most at ``last``; each
    window's training time is its tokens / its tokens_per_s), and every window's (step, tokens/s)."""
    records = [r for r in read_jsonl(metrics) if r["split"] == "train"]
    windows, tokens, seconds, previous = [], 0.0, 0.0, 0
    for r in records:
        window_tokens = r["tokens"] - previous
        previous = r["tokens"]
        windows.append((r["step"], r["tokens_per_s"]))
        if r["step"] > warmup and (last is None or r["step"] <= last) and r["tokens_per_s"]:
            tokens += window_tokens
            seconds += window_tokens / r["tokens_per_s"]
    if seconds == 0:
        raise SystemExit(f"bench_trainer: no log window after step {warmup} in {metrics}: raise --steps")
    return tokens / seconds, windows


def run_trainer(recipe: Path, corpus: Path, out: Path, args: argparse.Namespace, gpus: int = 1,
                extra: tuple[str, ...] = ()) -> tuple[float, list, float]:
    """(steady tokens/s of all ranks, windows, wall seconds of the whole command) of ``deepspeed --num_gpus gpus``
    with ``extra`` overrides. With ``args.profile``, PROFILED_STEPS more steps run under torch.profiler after the
    measured ones (not counted in the tokens/s)."""
    steps = args.steps + (PROFILED_STEPS if args.profile else 0)
    profile = [f"train.profile_steps=[{args.steps + 1}, {steps}]"] if steps > args.steps else []
    overrides = [f"data.path={corpus}", f"data.batch_size={args.batch}", f"data.seq_len={args.length}",
                 "train.grad_accum=1", f"train.max_steps={steps}", f"train.log_every={args.log_every}",
                 f"train.eval_every={args.eval_every}", f"train.eval_batches={2 if args.eval_every else 0}",
                 "train.save_every=0", "train.export_hf=false", "train.progress=false", "train.tensorboard=false",
                 f"train.out_dir={out}", *profile, *args.override, *extra]
    command = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(args.master_port), "--module", "mom.train",
               "--config", str(recipe), *overrides, "--overwrite"]
    print("$", " ".join(command), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - start
    lines = [x for x in (done.stdout + done.stderr).splitlines() if x.startswith(("start:", "done:", "throughput:"))]
    print("\n".join(f"  {x}" for x in lines), flush=True)
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"bench_trainer: mom-train exited with {done.returncode}")
    tps, windows = steady_tokens_per_s(out / "metrics.jsonl", args.warmup, last=args.steps)
    return tps, windows, wall


def raw_batch(config: mom.MoMConfig, batch: int, length: int, device: str = "cuda") -> torch.Tensor:
    """(batch, length) token ids in runs of each of the config's modalities (bench_lm's layout, as many modalities
    as the model has), each id drawn from its modality's vocabulary."""
    modality_ids = interleaved_modalities(batch, length, DEFAULT_RUNS[: config.num_modalities], device)
    offsets = torch.tensor(config.vocab_offsets, device=device)
    sizes = torch.tensor(config.vocab_sizes, device=device)
    return offsets[modality_ids] + (torch.rand(batch, length, device=device) * sizes[modality_ids]).long()


def profile_raw(step, path: Path) -> None:
    """PROFILED_STEPS raw steps under torch.profiler, summarised to ``path`` as the trainer's profile is."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    path.write_text(summarize(prof, PROFILED_STEPS, wall, "raw step (bench_lm)"))


def raw_step(recipe: Path, corpus: Path, args: argparse.Namespace,
             profile_to: Path | None = None) -> tuple[float, mom.MoMConfig]:
    """bench_lm's training step on the trainer's model config: best of --rounds rounds, tokens/s (with --profile,
    the first round's model is also profiled into ``profile_to``)."""
    r = load_recipe(recipe, [f"data.path={corpus}", *args.override])
    config = resolve_model_config(r)
    ids = raw_batch(config, args.batch, args.length)
    counts = host_counts(config, ids)
    best = 0.0
    for _ in range(args.rounds):
        torch.cuda.empty_cache()
        model = mom.MoMForCausalLM(config).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        forward = lambda m, i, labels: mom_forward(m, i, labels, counts)  # noqa: E731
        step = train_step_fn(model, ids, ids, optimizer, forward)
        ms, _, _ = measure(step, warmup=3, iters=args.iters)
        best = max(best, args.batch * args.length / (ms / 1e3))
        if args.profile and profile_to is not None:
            profile_raw(step, profile_to)
            profile_to = None  # once
        del model, optimizer, step
    torch.cuda.empty_cache()
    return best, config


def choose_corpus(args: argparse.Namespace) -> Path:
    """--corpus, else the recipe's data.path, else the bundled corpus where the recipe's vocabulary fits it, else a
    synthetic one under --work, large enough for the run on every GPU (``args.gpus``, default 1)."""
    if args.corpus is not None:
        print(f"corpus: {args.corpus}", flush=True)
        return args.corpus
    configured = Path(load_recipe(args.recipe, args.override).data.path)
    corpus = next((c for c in (configured, BUNDLED) if corpus_fits(args.recipe, c, args.override)), None)
    if corpus is not None:
        print(f"corpus: {corpus}", flush=True)
        return corpus
    r = load_recipe(args.recipe, [f"data.path={BUNDLED}", *args.override])
    config = resolve_model_config(r)
    tokens = (args.steps + 5) * args.batch * args.length * 2 * max(getattr(args, "gpus", [1]))
    corpus = synthetic_corpus(args.work / "synthetic_corpus", config.modalities, config.vocab_sizes, tokens)
    print(f"corpus: {corpus} -- {SPEED_ONLY_NOTE}", flush=True)
    return corpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", "--model", type=Path, default=ROOT / "recipes" / "t2i_160m_mom.yaml",
                        help="the MoM recipe (its dense twin: the same name with _dense, or --dense)")
    parser.add_argument("--dense", type=Path, help="the dense twin's recipe")
    parser.add_argument("--only", choices=("mom", "dense"), help="measure one of the two")
    parser.add_argument("--corpus", type=Path, help="corpus directory (default: see above)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per trainer run")
    parser.add_argument("--warmup", type=int, default=10, help="steps whose log windows are not counted")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (2 batches) to see that "
                        "evaluation does not lower the logged tokens/s")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10, help="raw steps timed per round")
    parser.add_argument("--rounds", type=int, default=2, help="raw-step rounds; the best counts (as bench_lm)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_trainer"), help="run and corpus directory")
    parser.add_argument("--master-port", type=int, default=29517)
    parser.add_argument("--override", action="append", default=[], help="extra key=value for both (repeatable)")
    parser.add_argument("--profile", action="store_true", help=f"after the measured steps, profile {PROFILED_STEPS} "
                        "trainer steps (train.profile_steps) and as many raw steps; summaries under --work")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_trainer: needs a CUDA device", file=sys.stderr)
        return 2
    if shutil.which("deepspeed") is None:
        print("bench_trainer: the deepspeed launcher is not on PATH", file=sys.stderr)
        return 2
    recipes = {"mom": args.recipe, "dense": args.dense or dense_twin(args.recipe)}
    if args.only:
        recipes = {args.only: recipes[args.only]}
    args.work.mkdir(parents=True, exist_ok=True)

    corpus = choose_corpus(args)

    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, flush=True)
    results = {}
    for name, recipe in recipes.items():
        print(f"== {name}: {recipe}", flush=True)
        run = args.work / f"run_{name}"
        trainer, windows, wall = run_trainer(recipe, corpus, run, args)
        raw, config = raw_step(recipe, corpus, args, args.work / f"profile-{name}-raw.txt")
        if args.profile:
            for side, path in (("trainer", run / "profile" / "summary-rank0.txt"),
                               ("raw step", args.work / f"profile-{name}-raw.txt")):
                head = path.read_text().splitlines()[:2]
                print(f"  profile, {side}: " + " | ".join(head) + f"  ({path})")
        mfu = flops.mfu(trainer, config, torch.device("cuda"))
        print("  trainer windows (step: tokens/s): " + ", ".join(f"{s}: {t:,.0f}" for s, t in windows))
        print(f"  trainer {trainer:,.0f} tokens/s (steps > {args.warmup}; command wall {wall:.0f} s)"
              + ("" if mfu is None else f", MFU {mfu:.1%}"))
        print(f"  raw step (bench_lm) {raw:,.0f} tokens/s  ratio trainer / raw {trainer / raw:.3f}", flush=True)
        results[name] = (trainer, raw)
    print(f"summary, batch {args.batch}x{args.length}, {args.steps} steps:")
    for name, (trainer, raw) in results.items():
        print(f"  {name:<6} trainer {trainer / 1e3:8.1f}k/s  raw {raw / 1e3:8.1f}k/s  ratio {trainer / raw:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
