"""The training loop: pretrain (or fine-tune) a MoM language model with DeepSpeed, from a recipe (`mom-train`,
`mom.cli.train`, is its command line).

`train()` reads top to bottom: processes -> data -> model -> engine -> resume -> steps (micro-batches: forward,
backward; skip a non-finite step; optimizer step; log / evaluate / checkpoint) -> final evaluation, checkpoint,
Hugging Face export, summary. docs/training.md documents every option.
"""

from __future__ import annotations

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

from mom.data.loader import build_loader
from mom.model import flops
from mom.model.config import MoMConfig
from mom.model.modeling import MoMForCausalLM
from mom.train import distributed
from mom.train.checkpoint import Checkpointer
from mom.train.distributed import Context, all_reduce_sum
from mom.train.export import export_hf
from mom.train.metrics import MetricsLogger, read_jsonl
from mom.train.optim import lr_at, param_groups
from mom.train.recipe import Recipe
from mom.train.resolve import check_corpus, resolve_model_config, resolve_tokenizer_dir
from mom.utils.atomic import atomic_write_text

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
