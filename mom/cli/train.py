"""`mom-train`: pretrain (or fine-tune) a MoM language model with DeepSpeed, from a recipe.

    mom-train --config recipes/tiny_mom.yaml [key=value ...] [--resume auto|none|PATH] [--overwrite]
    deepspeed --num_gpus 8 --module mom.train --config recipes/t2i_760m_mom.yaml

The loop itself is `mom.train.loop.train`; docs/training.md documents every option.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from mom.cli.common import CommandFailed, add_debug_flag, run
from mom.model import flops
from mom.train.loop import TrainingError, TrainingInterrupted, train
from mom.train.recipe import Recipe, load_recipe
from mom.train.resolve import resolve_model_config


def describe(recipe: Recipe, world_size: int) -> str:
    """What ``--dry-run`` prints: sizes, tokens and FLOPs of the recipe."""
    config = resolve_model_config(recipe)
    total, active = flops.count_params(config)
    tokens = recipe.total_tokens(world_size)
    per_token = flops.training_flops_per_token(config, seq_len=recipe.data.seq_len)
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
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh although train.out_dir holds a run: it is first renamed to "
                        "<out_dir>.old-<time> (sets train.overwrite; --resume then defaults to none)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved recipe, parameter count, tokens and FLOPs, then exit")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks assumed by --dry-run")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by launchers
    add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # options and key=value overrides in any order
    return run("mom-train", lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.config, args.overrides)
    if args.resume:
        recipe.train.resume = args.resume
    if args.overwrite:
        recipe.train.overwrite = True
    if args.dry_run:
        print(describe(recipe, args.world_size))
        return 0
    try:
        train(recipe)
    except TrainingError as e:
        raise CommandFailed(str(e)) from e
    except TrainingInterrupted as e:
        if e.is_main:
            fresh = recipe.train.overwrite or recipe.train.resume != "auto"
            again = "the same command without --resume / --overwrite" if fresh else "the same command"
            print(f"mom-train: interrupted ({e.signal_name}) at step {e.step}: checkpoint {e.checkpoint}; "
                  f"run {again} to resume", file=sys.stderr, flush=True)
        return 128 + e.signum  # the shell's code for death by that signal: 130 (SIGINT), 143 (SIGTERM)
    return 0
