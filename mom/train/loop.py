"""The training loop: pretrain (or fine-tune) a MoM language model with DeepSpeed, from a recipe (`mom-train`,
`mom.cli.train`, is its command line).

`train()` reads top to bottom: processes -> run directory (resume, or a fresh start that never mixes with an earlier
run) -> data (read ahead in a background thread) -> model -> engine -> resume -> steps (micro-batches: forward,
backward; skip a non-finite step; optimizer step) -> at each sync point (log, evaluation and save steps, the last
step, a stop): read what the steps since the last one left on the device, report, evaluate, checkpoint, stop on
SIGINT / SIGTERM -> final evaluation, checkpoint, Hugging Face export, summary. docs/training.md documents every
option.

Between sync points a step reads nothing from the device: losses, target counts and the skip flags stay there
(`Window`) and are read in one transfer at the next sync point; batches arrive prepared and pinned
(`mom.data.prefetch`), their tokens per modality counted on the host. The one host sync per forward left is the
model's own input check (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
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

from mom.data.corpus import build_loader
from mom.data.prefetch import Prefetcher
from mom.model import flops
from mom.model.config import MoMConfig
from mom.model.modeling import MoMForCausalLM
from mom.model.transfusion import MoMTransfusionConfig, MoMTransfusionForCausalLM
from mom.train import distributed
from mom.train.checkpoint import SUPERSEDED, Checkpointer, read_meta
from mom.train.distributed import ClipAndSkip, Context, all_reduce_sum, decided_on_main
from mom.train.export import export_hf
from mom.train.metrics import MetricsLogger, read_jsonl
from mom.train.optim import lr_at, param_groups
from mom.train.profiling import StepProfiler
from mom.train.recipe import Recipe, TrainConfig
from mom.train.resolve import check_corpus, for_world, resolve_model_config, resolve_tokenizer_dir
from mom.utils.atomic import atomic_write_text
from mom.utils.signals import StopSignals

EVAL_SEED = 0  # seeds every evaluation's random draws (see `evaluate`)
MODEL_INPUTS = ("input_ids", "labels", "modality_ids", "seq_idx",  # batch keys the model consumes
                "latents", "image_mask")  # (the Transfusion setting's: mom.data.latent_corpus)
# What a start that saved no checkpoint leaves in out_dir: ``resume: auto`` may start afresh over it.
UNSAVED_START = {"recipe.yaml", "metrics.jsonl", "tensorboard", "checkpoints"}


class TrainingError(RuntimeError):
    """Training stopped (e.g. too many non-finite steps); the last checkpoint is intact."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the run after a step; ``checkpoint`` (of ``step``) was saved by every rank.
    ``is_main``: raised on rank 0 (the rank that reports it)."""

    def __init__(self, signum: int, step: int, checkpoint: Path, is_main: bool) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint {checkpoint}")
        self.signum, self.step, self.checkpoint, self.is_main = signum, step, checkpoint, is_main

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


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

    Raises `ValueError` before anything is written if ``out_dir`` holds another run this one would mix with (see
    `claim_out_dir`), `mom.train.checkpoint.CheckpointError` if no checkpoint to resume verifies, `TrainingError`
    after too many non-finite steps, and `TrainingInterrupted` after SIGINT / SIGTERM once the checkpoint of the
    step in progress is saved.
    """
    cfg = recipe.train
    ctx = distributed.setup(cfg, recipe.deepspeed)
    given, recipe = recipe, for_world(recipe, ctx.world_size)  # "auto" ZeRO stage resolved; `given` is saved
    torch.manual_seed(cfg.seed)  # same on every rank: identical initial weights
    out_dir = Path(cfg.out_dir)
    tokenizer_dir = resolve_tokenizer_dir(recipe)  # checked now rather than at export time

    # ---- run directory: continue its run, or start afresh in a directory no other run holds -------------------
    checkpointer = Checkpointer(out_dir / "checkpoints", cfg.keep_last, ctx)
    resume = "none" if cfg.overwrite and cfg.resume == "auto" else cfg.resume
    resume_from = checkpointer.resolve(resume)  # verified; the same on every rank
    for line in decided_on_main(lambda: claim_out_dir(out_dir, checkpointer, resume, resume_from, cfg.overwrite)):
        if ctx.is_main:
            print(line, file=sys.stderr, flush=True)

    # ---- data and model -------------------------------------------------------------------------------------------
    loader = build_loader(recipe.data, ctx.rank, ctx.world_size)
    if model is None:
        config = resolve_model_config(recipe)
        model = (MoMTransfusionForCausalLM if isinstance(config, MoMTransfusionConfig) else MoMForCausalLM)(config)
    elif isinstance(getattr(model, "config", None), MoMConfig):  # a given (e.g. PEFT-wrapped) model: its config
        config = model.config
        check_corpus(config, recipe)
    else:
        config = resolve_model_config(recipe)
    if trainable_filter is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(bool(trainable_filter(name, param)))
    groups = param_groups(model, recipe.optim)
    sizes = (sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad))
    batches = Prefetcher(loader, functools.partial(host_inputs, num_modalities=config.num_modalities),
                         recipe.data.prefetch, pin_memory=ctx.device.type == "cuda", device=ctx.device)
    engine = distributed.initialize(model, groups, recipe, ctx)
    if ctx.is_main:
        print(describe_start(model, config, recipe, ctx, *sizes), flush=True)

    # ---- bookkeeping and resume -----------------------------------------------------------------------------------
    flops_per_token = flops.training_flops_per_token(config, seq_len=recipe.data.seq_len)  # attention layers' context
    peak = flops.peak_flops(ctx.device, ctx.compute_dtype)  # None on CPU: MFU is null
    tokens_per_step = recipe.tokens_per_step(ctx.world_size)
    state = {"step": 0, "tokens": 0, "flops": 0.0, "bad_steps": 0}
    shape = model_shape(config)  # saved with each checkpoint: resuming into another architecture is refused
    if resume_from is not None:
        meta = checkpointer.load(engine, batches, resume_from, expect={"model": shape})
        state.update({k: meta[k] for k in state})
        if ctx.is_main:
            print(f"resumed from {resume_from} (step {state['step']})", flush=True)
    clip_and_skip = ClipAndSkip(engine, recipe, ctx)  # on the device where DeepSpeed allows it; after the load
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = given.to_dict()
        saved["train"]["overwrite"] = False  # done: the saved recipe continues this run rather than moving it aside
        atomic_write_text(out_dir / "recipe.yaml", yaml.safe_dump(saved, sort_keys=False))
    metrics = MetricsLogger(out_dir, ctx.is_main, cfg.tensorboard, resume_step=state["step"])
    last_step = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    val_batches = None  # validation batches, loaded once
    window = Window(config.modalities, ctx)
    run_tokens, run_seconds = 0, 0.0  # this run's training steps (evaluation and saves excluded)
    train_metrics: dict[str, Any] = {}
    first_step = state["step"]  # 0, or where this run resumed
    saved_step = first_step if resume_from is not None else None
    already_done = resume_from is not None and first_step >= last_step  # rerun of a finished (or stopped) recipe
    stop = StopSignals(announce=ctx.is_main)  # SIGINT / SIGTERM: finish the step, checkpoint, raise
    bar = tqdm(total=last_step, initial=state["step"], disable=not (ctx.is_main and cfg.progress),
               desc="train", unit="step", dynamic_ncols=True)

    # ---- the loop -------------------------------------------------------------------------------------------------
    profiler = StepProfiler(cfg.profile_steps, out_dir, ctx.rank, ctx.device)
    with stop, batches, contextlib.closing(profiler):  # leaving: the data worker stops
        for step in range(state["step"] + 1, last_step + 1):
            set_lr(engine, lr_at(step - 1, recipe.optim, cfg.max_steps))
            profiler.before(step)
            window.add(step, train_step(engine, batches, ctx, cfg.grad_accum, step in cfg.inject_nan_steps,
                                        clip_and_skip), tokens_per_step)
            if (summary := profiler.after(step)) is not None and ctx.is_main:
                tqdm.write(f"profile of steps {cfg.profile_steps[0]}-{step}: {summary}", file=sys.stderr)
            state["step"] = step
            state["tokens"] += tokens_per_step
            state["flops"] += flops_per_token * tokens_per_step
            bar.update(1)
            log_now = step % cfg.log_every == 0 or step == last_step
            eval_now = bool(cfg.eval_every and step % cfg.eval_every == 0 and step != last_step and cfg.eval_batches)
            save_now = bool(cfg.save_every and step % cfg.save_every == 0)
            if not (log_now or eval_now or save_now or (ctx.world_size == 1 and stop.requested())):
                continue  # nothing read from the device: the next step is queued behind this one

            # ---- a sync point: one read of the steps since the last one; report, evaluate, checkpoint --------
            read = window.read(stop.requested())  # all-reduced over ranks: the same everywhere
            for bad in read["skipped"]:
                state["bad_steps"] += 1
                message = (f"step {bad}: non-finite loss or gradient, update skipped "
                           f"({state['bad_steps']} of train.max_bad_steps={cfg.max_bad_steps})")
                if ctx.is_main:
                    tqdm.write(f"WARNING: {message}", file=sys.stderr)
                if state["bad_steps"] > cfg.max_bad_steps:
                    bar.close()
                    metrics.close()
                    last = checkpointer.latest()
                    raise TrainingError(f"{message}: too many bad steps, stopping. Last checkpoint (intact): {last}")
            if log_now:
                train_metrics = window.summary()
                tokens_per_s = train_metrics.pop("tokens_per_s")
                run_tokens, run_seconds = run_tokens + window.tokens, run_seconds + window.seconds
                mfu = None if peak is None else tokens_per_s * flops_per_token / (peak * ctx.world_size)
                record = {
                    **train_metrics,
                    "lr": engine.optimizer.param_groups[0]["lr"],
                    "grad_norm": read["grad_norm"],
                    "tokens_per_s": tokens_per_s,
                    "tokens": state["tokens"],
                    "flops": state["flops"],
                    "mfu": mfu,
                    "skipped_steps": state["bad_steps"],
                    "peak_gib": peak_gib(ctx.device),
                }
                metrics.log(step, "train", record)
                postfix = {"loss": f"{train_metrics.get('loss', float('nan')):.3f}", "tok_s": f"{tokens_per_s:,.0f}"}
                bar.set_postfix(postfix | ({} if mfu is None else {"mfu": f"{mfu:.1%}"}))
                window = Window(config.modalities, ctx)
            if eval_now:
                val_batches = val_batches if val_batches is not None else load_val_batches(recipe, ctx)
                metrics.log(step, "validation", evaluate(engine, val_batches, ctx, config.modalities))
            if save_now:
                checkpointer.save(engine, batches, {**state, "model": shape})
                saved_step = step
            if read["stop"] and step < last_step:  # all ranks agree: the flag was summed over them
                if saved_step != step:
                    checkpointer.save(engine, batches, {**state, "model": shape})
                bar.close()
                metrics.close()
                raise TrainingInterrupted(stop.signum or signal.SIGINT, step, checkpointer.latest(), ctx.is_main)
            window.restart_clock()  # evaluation and saving are not training time
        bar.close()
        batches.close()  # no more training batches

        # ---- end of run: evaluate, checkpoint, export -------------------------------------------------------------
        validation: dict[str, Any] = {}
        if cfg.eval_batches and state["step"] > first_step:
            val_batches = val_batches if val_batches is not None else load_val_batches(recipe, ctx)
            validation = evaluate(engine, val_batches, ctx, config.modalities)
            metrics.log(state["step"], "validation", validation)
        if saved_step != state["step"]:
            checkpointer.save(engine, batches, {**state, "model": shape})
    checkpoint = checkpointer.latest()
    hf_dir = None
    if cfg.export_hf and state["step"] >= cfg.max_steps:
        exported = out_dir / "hf"
        if already_done and decided_on_main(exported.is_dir):  # exported when the run finished
            hf_dir = exported
        else:
            results = {"step": state["step"], "tokens": state["tokens"], "validation": validation}
            hf_dir = export_hf(engine, exported, tokenizer_dir, ctx, recipe, results)  # results: the model card
    metrics.close()
    if ctx.is_main and state["step"] == first_step:  # nothing trained (resumed at the end): the last logged
        train_metrics, validation = last_record(metrics.path, "train"), last_record(metrics.path, "validation")
    tokens_per_s = run_tokens / run_seconds if run_seconds > 0 else None  # this run's logged windows
    summary = {
        "step": state["step"],
        "tokens": state["tokens"],
        "flops": state["flops"],
        "skipped_steps": state["bad_steps"],
        "tokens_per_s": tokens_per_s,
        "mfu": None if peak is None or tokens_per_s is None else tokens_per_s * flops_per_token / (
            peak * ctx.world_size),
        "train": train_metrics,
        "validation": validation,
        "out_dir": str(out_dir),
        "metrics": str(metrics.path),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "hf_export": str(hf_dir) if hf_dir else None,
    }
    if ctx.is_main:
        print(format_done(summary, cfg) if already_done else format_summary(summary, config.modalities), flush=True)
    return {**summary, "engine": engine}


def peak_gib(device: torch.device) -> float | None:
    """The most memory this rank's tensors held on its GPU so far, GiB (a host-side counter: no device sync);
    None on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def host_inputs(batch: dict[str, torch.Tensor], num_modalities: int) -> dict[str, Any]:
    """The model's inputs of a CPU batch, still on the host, with its tokens per modality counted here
    (``modality_counts``, a tuple of ints): the model's forward then need not wait for the device to read them.
    Runs in the data worker thread (`mom.data.prefetch`)."""
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if "modality_ids" in batch:  # out-of-range ids are clamped here and named by the model's own check
        ids = batch["modality_ids"].reshape(-1).clamp(0, num_modalities - 1)
        inputs["modality_counts"] = tuple(torch.bincount(ids, minlength=num_modalities).tolist())
    return inputs


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``inputs`` with its tensors on ``device``; copies from pinned memory do not wait for the device."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, num_modalities: int) -> dict[str, Any]:
    """The model's inputs from a CPU batch, on ``device``, with the batch's tokens per modality (`host_inputs`)."""
    return to_device(host_inputs(batch, num_modalities), device)


# ---- one optimizer step ----------------------------------------------------------------------------------------
def train_step(
    engine: Any, batches: Any, ctx: Context, grad_accum: int, inject_nan: bool, clip_and_skip: ClipAndSkip,
) -> dict[str, Any]:
    """``grad_accum`` micro-batches (forward, backward) then the optimizer step, skipped if non-finite (by
    `ClipAndSkip` or DeepSpeed's optimizer). Reads nothing from the device.

    Returns ``stats`` ((2M + 1,) on the device: loss sums and target counts per modality over the micro-batches, then
    the number of non-finite losses), ``skipped`` (the update was skipped: a 0-dim device tensor or a bool) and
    ``grad_norm`` (before clipping: a device tensor, a float or None).
    """
    stats = None
    for _ in range(grad_accum):
        out = engine(**to_device(next(batches), ctx.device))
        loss = out.loss * float("nan") if inject_nan and ctx.is_main else out.loss  # fault injection (tests)
        engine.backward(loss)
        engine.step()
        micro_stats = torch.cat([out.modality_loss_sums.detach().double(), out.modality_target_counts.detach().double(),
                                 (~torch.isfinite(loss.detach())).double().reshape(1)])  # (2M + 1,)
        stats = micro_stats if stats is None else stats + micro_stats
    return {"stats": stats, "skipped": clip_and_skip.last(), "grad_norm": clip_and_skip.norm()}


# ---- run directory and signals -----------------------------------------------------------------------------------
def claim_out_dir(out_dir: Path, checkpointer: Checkpointer, resume: str, resume_from: Path | None,
                  overwrite: bool) -> list[str]:
    """Make ``out_dir`` hold this run's history only (rank 0; returns the lines to print).

    Continuing ``out_dir``'s own checkpoint of step S: its checkpoints after S are set aside (a rollback with
    ``--resume PATH``). Any other start (fresh, or from another directory's checkpoint) needs an empty ``out_dir``
    (or, with ``resume: auto``, the leftovers of a start that saved nothing); ``overwrite`` first renames a
    non-empty one to ``<out_dir>.old-<UTC time>``. Otherwise `ValueError` saying what to do.
    """
    if resume_from is not None and resume_from.parent.resolve() == checkpointer.root.resolve():
        if overwrite:
            raise ValueError(f"train.overwrite moves {out_dir} aside, but the checkpoint to resume from "
                             f"({resume_from}) is inside it: resume without --overwrite, or copy it elsewhere")
        step = read_meta(resume_from)["step"]
        return [f"WARNING: {p.name.removesuffix(SUPERSEDED)} is after step {step}, which this run continues: set "
                f"aside as {p}" for p in checkpointer.set_aside_after(step)]
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries or (resume == "auto" and set(entries) <= UNSAVED_START):
        return []
    if overwrite:
        cwd = Path.cwd().resolve()
        if cwd == out_dir.resolve() or out_dir.resolve() in cwd.parents:
            raise ValueError(f"train.overwrite: will not move {out_dir} aside, it holds the current directory")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        aside = out_dir.with_name(f"{out_dir.name}.old-{stamp}")
        n = 1
        while aside.exists():
            aside, n = out_dir.with_name(f"{out_dir.name}.old-{stamp}-{n}"), n + 1
        os.rename(out_dir, aside)  # atomic: the new run starts in an empty directory, the old one is kept whole
        return [f"moved the previous contents of {out_dir} to {aside} (train.overwrite)"]
    newest = checkpointer.latest()
    held = f"a run with checkpoints up to {newest.name}" if newest else ", ".join(entries[:4]) + (
        ", ..." if len(entries) > 4 else "")
    how = "starting afresh" if resume in ("none", "auto") else f"starting from {resume}"
    raise ValueError(f"train.out_dir {out_dir} already holds {held}; {how} there would mix two runs. Continue it "
                     "with train.resume=auto (the default), start over with --overwrite (train.overwrite=true: moves "
                     "it aside first), or choose another train.out_dir")


def model_shape(config: MoMConfig) -> dict[str, Any]:
    """The config fields that fix the parameter shapes (a checkpoint only loads into the same ones)."""
    keys = ("modalities", "vocab_sizes", "d_model", "n_layer", "d_state", "d_conv", "expand", "dt_rank", "decouple",
            "bias", "conv_bias", "rms_norm", "tie_word_embeddings")
    if isinstance(config, MoMTransfusionConfig):
        keys += ("patch_size", "latent_channels")
    shape = {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(config, k)) for k in keys)}
    if config.attention_layers:  # a hybrid's; a pure Mamba's record stays as before (its old checkpoints resume)
        shape.update(attention_layers=list(config.attention_layers), attention_heads=config.attention_heads)
    return shape


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


class Window:
    """The steps since the last log line: what they leave on the device is kept there until a sync point reads it
    (`read`: one all-reduce and one device-to-host copy); losses exclude skipped steps, throughput counts every step.

    ``seconds``: training time of the window, from its start (or the last `restart_clock`) to each read, which waits
    for the device: evaluation and saves between a read and `restart_clock` are not counted.
    """

    def __init__(self, modalities: Sequence[str], ctx: Context) -> None:
        self.modalities, self.ctx = tuple(modalities), ctx
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor | bool]] = []  # (step, stats, skipped), unread
        self.grad_norm: Any = None  # the last step's, unread
        self.stats = torch.zeros(2 * len(modalities), dtype=torch.float64)  # read: sums and counts of good steps
        self.tokens, self.seconds = 0, 0.0
        self.since = time.perf_counter()

    def add(self, step: int, result: dict[str, Any], tokens: int) -> None:
        self.pending.append((step, result["stats"], result["skipped"]))
        self.grad_norm = result["grad_norm"]
        self.tokens += tokens

    def read(self, stop_requested: bool) -> dict[str, Any]:
        """Read the pending steps (one host sync). Returns ``skipped`` (steps whose update was skipped or whose loss
        was not finite on any rank), ``grad_norm`` of the last step (None if it was skipped) and ``stop`` (a stop
        was requested on any rank)."""
        device = self.ctx.device
        rows = [torch.cat([stats, flag.double().reshape(1) if isinstance(flag, torch.Tensor)
                           else torch.full((1,), float(flag), dtype=torch.float64, device=device)])
                for _, stats, flag in self.pending]  # (2M + 2,) each: sums, counts, non-finite losses, skipped
        flat = torch.cat([*rows, torch.full((1,), float(stop_requested), dtype=torch.float64, device=device)])
        all_reduce_sum(flat)
        norm = self.grad_norm
        if isinstance(norm, torch.Tensor):  # the same on every rank: appended after the sum
            flat = torch.cat([flat, norm.detach().to(device=device, dtype=torch.float64).reshape(1)])
        host = flat.cpu()  # the one read of the device since the last sync point
        self.seconds += time.perf_counter() - self.since
        M2 = 2 * len(self.modalities)
        skipped = []
        for i, (step, _, _) in enumerate(self.pending):
            row = host[i * (M2 + 2) : (i + 1) * (M2 + 2)]
            if row[M2] > 0 or row[M2 + 1] > 0:
                skipped.append(step)
            else:
                self.stats += row[:M2]
        n = len(self.pending) * (M2 + 2)
        stop = bool(host[n] > 0)
        if isinstance(norm, torch.Tensor):
            norm = float(host[n + 1])
        last_skipped = bool(self.pending) and self.pending[-1][0] in skipped
        self.pending = []
        return {"skipped": skipped, "stop": stop,
                "grad_norm": None if norm is None or last_skipped else float(norm)}

    def restart_clock(self) -> None:
        self.since = time.perf_counter()

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
    # the same random draws at every evaluation (a diffusion loss samples timesteps and noise): validation curves
    # then compare across steps and runs; the training stream of random numbers is left where it was
    cuda = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(EVAL_SEED)
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


def describe_start(model: nn.Module, config: MoMConfig, recipe: Recipe, ctx: Context, total: int,
                   trainable: int) -> str:
    """The start-up line: parameters, ranks, device, dtype, ZeRO stage, scan backend and whether the fused path is
    on (from the model's public ``backend``, e.g. "cuda+causal-conv1d (fused mixer)")."""
    backend = str(getattr(model, "backend", "unknown"))
    fused = "on" if "fused mixer" in backend else "off"
    return (f"start: {flops.human(total)} parameters ({flops.human(trainable)} trained), {ctx.world_size} "
            f"rank{'s' if ctx.world_size > 1 else ''} on {ctx.device.type}, dtype {ctx.precision}, ZeRO stage "
            f"{recipe.deepspeed.zero_stage}, backend {backend}, fused path {fused} "
            f"(use_fast_path={str(config.use_fast_path).lower()})")


def format_done(summary: dict[str, Any], cfg: TrainConfig) -> str:
    """What a rerun of a run that already reached its last step prints instead of the summary."""
    if summary["step"] >= cfg.max_steps:
        what = f"is already complete (step {summary['step']} of train.max_steps={cfg.max_steps})"
        hint = "raise train.max_steps to train further, or start over with --overwrite (train.overwrite=true)"
    else:
        what = f"already stopped at train.stop_after={cfg.stop_after} (step {summary['step']} of {cfg.max_steps})"
        hint = "raise or remove train.stop_after to continue"
    export = f", HF export {summary['hf_export']}" if summary["hf_export"] else ""
    return f"{summary['out_dir']} {what}: nothing to do (checkpoint {summary['checkpoint']}{export}); {hint}"


def format_summary(summary: dict[str, Any], modalities: Sequence[str]) -> str:
    def fmt(x: Any) -> str:
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"

    train_m, val_m = summary["train"], summary["validation"]
    lines = [
        f"done: step {summary['step']}, {flops.human(summary['tokens'])} tokens, "
        f"{flops.human(summary['flops'])}FLOPs, {summary['skipped_steps']} skipped steps",
    ]
    if summary["tokens_per_s"] is not None:  # training time only: evaluation and saves excluded
        mfu = "" if summary["mfu"] is None else f", MFU {summary['mfu']:.1%}"
        lines.append(f"throughput: {summary['tokens_per_s']:,.0f} tokens/s{mfu}")
    lines.append(f"{'loss':<10}{'train':>10}{'validation':>12}")
    for key, name in [("loss", "all"), *((f"loss/{m}", m) for m in modalities)]:
        lines.append(f"{name:<10}{fmt(train_m.get(key)):>10}{fmt(val_m.get(key)):>12}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    lines.append(f"metrics:    {summary['metrics']}")
    if summary["hf_export"]:
        lines.append(f"HF export:  {summary['hf_export']}  (import mom; AutoModelForCausalLM.from_pretrained(...))")
    return "\n".join(lines)
