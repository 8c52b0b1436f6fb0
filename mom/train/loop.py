"""`mom-train`: pretrain (or fine-tune) a MoM language model with DeepSpeed, from a recipe.

    mom-train --config recipes/tiny_mom.yaml [key=value ...] [--resume auto|none|PATH]
    deepspeed --num_gpus 8 --module mom.train --config recipes/t2i_760m_mom.yaml

`train()` reads top to bottom: processes -> data -> model -> engine -> resume -> steps (micro-batches: forward,
backward; skip a non-finite step; optimizer step; log / evaluate / checkpoint) -> final evaluation, checkpoint,
Hugging Face export, summary. docs/training.md documents every option.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from tqdm import tqdm

from mom.data.loader import build_loader, read_manifest
from mom.model import flops
from mom.model.config import MoMConfig
from mom.model.modeling import MoMForCausalLM
from mom.train import distributed
from mom.train.checkpoint import Checkpointer, atomic_write_text, export_hf
from mom.train.distributed import Context, all_reduce_sum
from mom.train.metrics import MetricsLogger, read_jsonl
from mom.train.optim import lr_at, param_groups
from mom.train.recipe import AUTO, Recipe, load_recipe

MODEL_INPUTS = ("input_ids", "labels", "modality_ids", "seq_idx")  # batch keys the model consumes


class TrainingError(RuntimeError):
    """Training stopped (e.g. too many non-finite steps); the last checkpoint is intact."""


def train(
    recipe: Recipe,
    model: nn.Module | None = None,
    *,
    trainable_filter: Callable[[str, nn.Parameter], bool] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (default: a fresh `MoMForCausalLM` of ``recipe.model``) as the recipe says.

    ``trainable_filter(name, param)`` restricts the optimised parameters (the others are frozen), e.g. to LoRA
    adapters of a PEFT-wrapped model. Every rank must call this. Returns the final step, tokens, FLOPs, train and
    validation metrics, the paths written (``checkpoint``, ``hf_export``, ``metrics``) and the ``engine``.
    """
    cfg = recipe.train
    ctx = distributed.setup(cfg)
    torch.manual_seed(cfg.seed)  # same on every rank: identical initial weights
    out_dir = Path(cfg.out_dir)
    tokenizer_dir = resolve_tokenizer_dir(recipe)  # checked now rather than at export time

    # ---- data and model -------------------------------------------------------------------------------------------
    loader = build_loader(recipe.data, ctx.rank, ctx.world_size)
    if model is None:
        config = resolve_model_config(recipe)
        model = MoMForCausalLM(config)
    elif isinstance(getattr(model, "config", None), MoMConfig):  # a given (e.g. PEFT-wrapped) model: its config
        config = model.config
        check_corpus(config, recipe)
    else:
        config = resolve_model_config(recipe)
    if trainable_filter is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(bool(trainable_filter(name, param)))
    groups = param_groups(model, recipe.optim)
    engine = distributed.initialize(model, groups, recipe, ctx)

    # ---- bookkeeping and resume -----------------------------------------------------------------------------------
    flops_per_token = flops.training_flops_per_token(config)
    peak = flops.peak_flops(ctx.device, ctx.compute_dtype)  # None on CPU: MFU is null
    tokens_per_step = recipe.tokens_per_step(ctx.world_size)
    checkpointer = Checkpointer(out_dir / "checkpoints", cfg.keep_last, ctx)
    state = {"step": 0, "tokens": 0, "flops": 0.0, "bad_steps": 0}
    shape = model_shape(config)  # saved with each checkpoint: resuming into another architecture is refused
    resume_from = checkpointer.resolve(cfg.resume)
    if resume_from is not None:
        meta = checkpointer.load(engine, loader, resume_from, expect={"model": shape})
        state.update({k: meta[k] for k in state})
        if ctx.is_main:
            print(f"resumed from {resume_from} (step {state['step']})", flush=True)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    metrics = MetricsLogger(out_dir, ctx.is_main, cfg.tensorboard, resume_step=state["step"])
    last_step = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    val_batches = None  # validation batches, loaded once
    window = Window(config.modalities)
    train_metrics: dict[str, Any] = {}
    first_step = state["step"]  # 0, or where this run resumed
    saved_step = first_step if resume_from is not None else None
    bar = tqdm(total=last_step, initial=state["step"], disable=not (ctx.is_main and cfg.progress),
               desc="train", unit="step", dynamic_ncols=True)

    # ---- the loop -------------------------------------------------------------------------------------------------
    for step in range(state["step"] + 1, last_step + 1):
        set_lr(engine, lr_at(step - 1, recipe.optim, cfg.max_steps))
        start = time.perf_counter()
        result = train_step(engine, loader, ctx, recipe, config.num_modalities, step in cfg.inject_nan_steps)
        seconds = time.perf_counter() - start
        state["step"] = step
        state["tokens"] += tokens_per_step
        state["flops"] += flops_per_token * tokens_per_step
        if result["bad"]:
            state["bad_steps"] += 1
            message = (f"step {step}: non-finite loss or gradient, update skipped "
                       f"({state['bad_steps']} of train.max_bad_steps={cfg.max_bad_steps})")
            if ctx.is_main:
                tqdm.write(f"WARNING: {message}", file=sys.stderr)
            if state["bad_steps"] > cfg.max_bad_steps:
                bar.close()
                metrics.close()
                last = checkpointer.latest()
                raise TrainingError(f"{message}: too many bad steps, stopping. Last checkpoint (intact): {last}")
        else:
            window.add(result["stats"], tokens_per_step, seconds)
        if step % cfg.log_every == 0 or step == last_step:
            train_metrics = window.summary()
            tokens_per_s = train_metrics.pop("tokens_per_s")
            record = {
                **train_metrics,
                "lr": engine.optimizer.param_groups[0]["lr"],
                "grad_norm": result["grad_norm"],
                "tokens_per_s": tokens_per_s,
                "tokens": state["tokens"],
                "flops": state["flops"],
                "mfu": None if peak is None else tokens_per_s * flops_per_token / (peak * ctx.world_size),
                "skipped_steps": state["bad_steps"],
            }
            metrics.log(step, "train", record)
            bar.set_postfix(loss=f"{train_metrics.get('loss', float('nan')):.3f}", tok_s=f"{tokens_per_s:,.0f}")
            window = Window(config.modalities)
        bar.update(1)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != last_step and cfg.eval_batches:
            val_batches = val_batches if val_batches is not None else load_val_batches(recipe, ctx)
            metrics.log(step, "validation", evaluate(engine, val_batches, ctx, config.modalities))
        if cfg.save_every and step % cfg.save_every == 0:
            checkpointer.save(engine, loader, {**state, "model": shape})
            saved_step = step
    bar.close()

    # ---- end of run: evaluate, checkpoint, export -----------------------------------------------------------------
    validation: dict[str, Any] = {}
    if cfg.eval_batches and state["step"] > first_step:
        val_batches = val_batches if val_batches is not None else load_val_batches(recipe, ctx)
        validation = evaluate(engine, val_batches, ctx, config.modalities)
        metrics.log(state["step"], "validation", validation)
    if saved_step != state["step"]:
        checkpointer.save(engine, loader, {**state, "model": shape})
    checkpoint = checkpointer.latest()
    hf_dir = None
    if cfg.export_hf and state["step"] >= cfg.max_steps:
        hf_dir = export_hf(engine, out_dir / "hf", tokenizer_dir, ctx)
    metrics.close()
    if ctx.is_main and state["step"] == first_step:  # nothing trained (resumed at the end): the last logged
        train_metrics, validation = last_record(metrics.path, "train"), last_record(metrics.path, "validation")
    summary = {
        "step": state["step"],
        "tokens": state["tokens"],
        "flops": state["flops"],
        "skipped_steps": state["bad_steps"],
        "train": train_metrics,
        "validation": validation,
        "out_dir": str(out_dir),
        "metrics": str(metrics.path),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "hf_export": str(hf_dir) if hf_dir else None,
    }
    if ctx.is_main:
        print(format_summary(summary, config.modalities), flush=True)
    return {**summary, "engine": engine}


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, num_modalities: int,
                 non_blocking: bool = False) -> dict[str, Any]:
    """The model's inputs from a CPU batch, on ``device``, with the batch's tokens per modality counted here on the
    host (``modality_counts``): the model's forward then need not wait for the device to read them."""
    inputs: dict[str, Any] = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items() if k in MODEL_INPUTS}
    if "modality_ids" in batch:  # out-of-range ids are clamped here and named by the model's own check
        ids = batch["modality_ids"].reshape(-1).clamp(0, num_modalities - 1)
        inputs["modality_counts"] = tuple(torch.bincount(ids, minlength=num_modalities).tolist())
    return inputs


# ---- one optimizer step ----------------------------------------------------------------------------------------
def train_step(
    engine: Any, loader: Any, ctx: Context, recipe: Recipe, num_modalities: int, inject_nan: bool
) -> dict[str, Any]:
    """``train.grad_accum`` micro-batches (forward, backward) then the optimizer step, skipped if non-finite.

    Returns ``stats`` ((2M,) summed loss and target count per modality, over micro-batches and ranks), ``bad``
    (the update was skipped) and ``grad_norm`` (before clipping).
    """
    M = num_modalities
    stats = torch.zeros(2 * M + 1, dtype=torch.float64, device=ctx.device)  # sums (M), counts (M), non-finite
    grad_norm, grads_finite = None, True
    grad_accum = recipe.train.grad_accum
    own_clip = distributed.trainer_clips(recipe, ctx)
    for micro in range(grad_accum):
        out = engine(**model_inputs(next(loader), ctx.device, M, non_blocking=True))
        loss = out.loss * float("nan") if inject_nan and ctx.is_main else out.loss  # fault injection (tests)
        engine.backward(loss)
        if own_clip and micro == grad_accum - 1:  # gradients are all-reduced: check and clip before the step
            grad_norm, grads_finite = clip_or_drop_grads(engine.module, recipe.optim.grad_clip)
        engine.step()
        stats[:M] += out.modality_loss_sums.detach().double()
        stats[M : 2 * M] += out.modality_target_counts.detach().double()
        stats[2 * M] += float(not torch.isfinite(loss.detach()))
    all_reduce_sum(stats)
    stats = stats.cpu()
    # ZeRO optimizers (and DeepSpeed's bf16 optimizer) skip a step with non-finite gradients themselves; the
    # plain fp32 stage-0 optimizer does not, so clip_or_drop_grads cleared the gradients before its step.
    bad = bool(stats[2 * M] > 0) or not grads_finite or not engine.was_step_applied()
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
    grad_norm = None if grad_norm is None else float(grad_norm)
    return {"stats": stats[: 2 * M], "bad": bad, "grad_norm": grad_norm}


def clip_or_drop_grads(model: nn.Module, max_norm: float) -> tuple[float, bool]:
    """Global gradient norm (before clipping) and whether it is finite.

    Finite: gradients are scaled down to norm ``max_norm`` if above it (0 disables). Not finite: every ``.grad``
    is set to None, which makes the optimizer step a no-op for all parameters.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0, True
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])))
    if not math.isfinite(norm):
        for p in params:
            p.grad = None
        return norm, False
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_([p.grad for p in params], max_norm / (norm + 1e-6))  # torch's clip_grad_norm_ epsilon
    return norm, True


def model_shape(config: MoMConfig) -> dict[str, Any]:
    """The config fields that fix the parameter shapes (a checkpoint only loads into the same ones)."""
    keys = ("modalities", "vocab_sizes", "d_model", "n_layer", "d_state", "d_conv", "expand", "dt_rank", "decouple",
            "bias", "conv_bias", "rms_norm", "tie_word_embeddings")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(config, k)) for k in keys)}


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


class Window:
    """Losses and throughput accumulated between two log lines (non-finite steps excluded)."""

    def __init__(self, modalities: Sequence[str]) -> None:
        self.modalities = tuple(modalities)
        self.stats = torch.zeros(2 * len(modalities), dtype=torch.float64)
        self.tokens, self.seconds = 0, 0.0

    def add(self, stats: torch.Tensor, tokens: int, seconds: float) -> None:
        self.stats += stats
        self.tokens += tokens
        self.seconds += seconds

    def summary(self) -> dict[str, float]:
        out = losses(self.stats, self.modalities)
        out["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return out


def losses(stats: torch.Tensor, modalities: Sequence[str]) -> dict[str, float]:
    """``loss`` (mean over all targets) and ``loss/<modality>`` from summed losses and counts (NaN if no target)."""
    M = len(modalities)
    sums, counts = stats[:M], stats[M:]
    out = {"loss": float(sums.sum() / counts.sum()) if counts.sum() > 0 else float("nan")}
    for m, s, c in zip(modalities, sums.tolist(), counts.tolist()):
        out[f"loss/{m}"] = s / c if c > 0 else float("nan")
    return out


# ---- validation ------------------------------------------------------------------------------------------------
def load_val_batches(recipe: Recipe, ctx: Context) -> list[dict[str, torch.Tensor]]:
    """The first ``train.eval_batches`` batches of the validation split (fixed order, same count on every rank)."""
    cfg = replace(recipe.data, split="validation", shuffle=False, drop_last=False, num_epochs=1)
    batches = list(islice(build_loader(cfg, ctx.rank, ctx.world_size), recipe.train.eval_batches))
    count = torch.tensor([len(batches)], device=ctx.device)
    if ctx.world_size > 1:  # ranks must run the same number of forwards (ZeRO-3 gathers weights collectively)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
    return batches[: int(count)]


def evaluate(engine: Any, batches: list[dict], ctx: Context, modalities: Sequence[str]) -> dict[str, float]:
    """Mean validation loss overall and per target modality, exact over batches and ranks."""
    M = len(modalities)
    stats = torch.zeros(2 * M, dtype=torch.float64, device=ctx.device)
    engine.eval()
    with torch.no_grad():
        for batch in batches:
            out = engine(**model_inputs(batch, ctx.device, M))
            stats[:M] += out.modality_loss_sums.detach().double()
            stats[M:] += out.modality_target_counts.detach().double()
            del out
    engine.train()
    return losses(all_reduce_sum(stats).cpu(), modalities)


# ---- recipe -> model config, tokenizer -------------------------------------------------------------------------
def resolve_model_config(recipe: Recipe) -> MoMConfig:
    """The recipe's MoMConfig, "auto" modalities / vocabulary sizes taken from the corpus manifest.

    The model's modalities may be a leading subset of the corpus's (e.g. ``[text, image]`` of a text / image /
    speech corpus: the unified ids of those modalities are the same); `check_corpus` then requires the mixture to
    exclude every document kind that could hold the others.
    """
    manifest = read_manifest(recipe.data.path)
    modalities = manifest.modalities if recipe.model.get("modalities", AUTO) == AUTO else recipe.model["modalities"]
    sizes = dict(zip(manifest.modalities, manifest.vocab_sizes))
    missing = [m for m in modalities if m not in sizes]
    if missing:
        raise ValueError(f"model.modalities: {missing} not in the corpus {recipe.data.path} ({list(sizes)})")
    config = recipe.model_config(modalities=tuple(modalities), vocab_sizes=tuple(sizes[m] for m in modalities))
    check_corpus(config, recipe)
    return config


# Document kinds (mom.data.loader.DOC_KINDS) that may hold tokens of a modality other than text.
KIND_MODALITIES = {"image_caption": {"image"}, "caption_image": {"image"}, "speech_transcript": {"speech"},
                   "transcript_speech": {"speech"}, "mixed": None}  # None: any modality


def check_corpus(config: MoMConfig, recipe: Recipe) -> None:
    """The model's vocabulary must be a leading part of the corpus's, and excluded modalities excluded from data."""
    manifest = read_manifest(recipe.data.path)
    M = config.num_modalities
    if tuple(config.modalities) != manifest.modalities[:M] or tuple(config.vocab_sizes) != manifest.vocab_sizes[:M]:
        raise ValueError(
            f"model.modalities / model.vocab_sizes {list(config.modalities)} / {list(config.vocab_sizes)} do not "
            f"match the corpus {recipe.data.path} ({list(manifest.modalities)} / {list(manifest.vocab_sizes)}): "
            "use auto, or a leading subset of the corpus's modalities"
        )
    dropped = set(manifest.modalities[M:])
    if not dropped:
        return
    weights = recipe.data.mixture or {}
    risky = [k for k, mods in KIND_MODALITIES.items() if (mods is None or mods & dropped) and weights.get(k, 1.0) > 0]
    if risky:
        raise ValueError(
            f"model.modalities {list(config.modalities)} leaves out {sorted(dropped)} of the corpus, so "
            f"data.mixture must give weight 0 to the document kinds {risky} that may contain them"
        )


def resolve_tokenizer_dir(recipe: Recipe) -> Path | None:
    """``train.tokenizer_dir``, "auto" meaning the corpus manifest's ``tokenizer_dir`` (None if it has none)."""
    value = recipe.train.tokenizer_dir
    if value is None:
        return None
    if value != AUTO:
        path = Path(value)
        if not path.is_dir():
            raise FileNotFoundError(f"train.tokenizer_dir: {path} is not a directory")
        return path
    corpus = Path(recipe.data.path)
    rel = json.loads((corpus / "manifest.json").read_text()).get("tokenizer_dir")
    path = corpus / rel if rel else None
    return path if path is not None and path.is_dir() else None


# ---- output ----------------------------------------------------------------------------------------------------
def last_record(path: Path, split: str) -> dict[str, Any]:
    """The loss entries of the last ``split`` record of a metrics file ({} if none)."""
    records = [r for r in read_jsonl(path) if r.get("split") == split] if path.exists() else []
    return {k: v for k, v in records[-1].items() if k.startswith("loss")} if records else {}


def format_summary(summary: dict[str, Any], modalities: Sequence[str]) -> str:
    def fmt(x: Any) -> str:
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"

    train_m, val_m = summary["train"], summary["validation"]
    lines = [
        f"done: step {summary['step']}, {flops.human(summary['tokens'])} tokens, "
        f"{flops.human(summary['flops'])}FLOPs, {summary['skipped_steps']} skipped steps",
        f"{'loss':<10}{'train':>10}{'validation':>12}",
    ]
    for key, name in [("loss", "all"), *((f"loss/{m}", m) for m in modalities)]:
        lines.append(f"{name:<10}{fmt(train_m.get(key)):>10}{fmt(val_m.get(key)):>12}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    lines.append(f"metrics:    {summary['metrics']}")
    if summary["hf_export"]:
        lines.append(f"HF export:  {summary['hf_export']}  (import mom; AutoModelForCausalLM.from_pretrained(...))")
    return "\n".join(lines)


def describe(recipe: Recipe, world_size: int) -> str:
    """What ``--dry-run`` prints: sizes, tokens and FLOPs of the recipe."""
    config = resolve_model_config(recipe)
    total, active = flops.count_params(config)
    tokens = recipe.total_tokens(world_size)
    per_token = flops.training_flops_per_token(config)
    return "\n".join([
        yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip(),
        "---",
        f"parameters: {flops.human(total)} total, {flops.human(active)} active per token",
        f"tokens/step: {recipe.tokens_per_step(world_size):,} (world size {world_size})",
        f"tokens total: {flops.human(tokens)} over {recipe.train.max_steps:,} steps",
        f"training FLOPs: {flops.human(per_token)}/token, {flops.human(per_token * tokens)} total",
    ])


# ---- command line ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mom-train",
        description="Pretrain a MoM / dense Mamba language model with DeepSpeed from a YAML recipe. Runs as one "
        "process (CPU or one GPU) or under the deepspeed launcher: deepspeed --num_gpus N --module mom.train ...",
        epilog="Example: mom-train --config recipes/tiny_mom.yaml train.max_steps=50 optim.lr=1e-3. "
        "See docs/training.md.",
    )
    parser.add_argument("--config", required=True, help="recipe YAML (recipes/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted recipe overrides, values parsed as YAML (e.g. train.max_steps=20)")
    parser.add_argument("--resume", metavar="auto|none|PATH",
                        help="override train.resume: the latest checkpoint of out_dir (auto), a fresh start (none), "
                        "or a checkpoint directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe, parameter count, tokens and FLOPs, then exit")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks assumed by --dry-run")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
        if args.resume:
            recipe.train.resume = args.resume
        if args.dry_run:
            print(describe(recipe, args.world_size))
            return
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"mom-train: error: {e}\n")
    try:
        train(recipe)
    except (ValueError, FileNotFoundError) as e:  # a recipe / corpus / checkpoint mismatch found before training
        parser.exit(2, f"mom-train: error: {e}\n")
    except TrainingError as e:
        parser.exit(1, f"mom-train: error: {e}\n")


if __name__ == "__main__":
    main()
