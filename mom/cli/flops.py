"""`mom-flops`: FLOPs per token and parameters of a model by component, and its training time on reference GPUs.

    mom-flops --config recipes/t2i_1b4_mom.yaml [--world-size 8] [key=value ...]
    mom-flops --model-json runs/tiny_mom/hf [--seq-len 2048] [model.d_model=128 ...]
    mom-flops --config recipes/t2i_160m_mamba2_mom.yaml --hardware   # + what the backward recomputes, row by row

A recipe is sized by `mom.train.resolve.resolve_model_config`, as ``mom-train`` does: no corpus is needed when the
recipe states its vocabulary. A hybrid's attention rows count at the recipe's ``data.seq_len`` (``--seq-len`` overrides
it; needed with ``--model-json``). ``--hardware`` prints the recompute of the GPU training path's backward per row and
counts training in hardware FLOPs (model FLOPs + recompute). docs/flops.md derives every row.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mom.cli.common import add_debug_flag, run
from mom.model.config import MoMConfig
from mom.model.flops import GPU_PEAKS, TRAIN_FACTOR, flop_table, human_duration, training_flops
from mom.train.recipe import SETTINGS, load_recipe, model_schema
from mom.train.resolve import resolve_model_config
from mom.utils.configio import apply_overrides, blame, read_mapping

REFERENCE_GPUS = ("H100 SXM", "H200 SXM", "A100", "L40S", "A10G", "L4", "RTX 4090")  # names in GPU_PEAKS
TERA = 1e12  # FLOP/s per TFLOP/s


def config_from_json(path: str | Path, overrides: Sequence[str] = ()) -> MoMConfig:
    """A `MoMConfig` from a saved model's ``config.json`` (file or model directory), with ``model.key=value``
    overrides (`mom.utils.configio.apply_overrides`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    raw = {"model": read_mapping(path, "--model-json")}
    applied = apply_overrides(raw, overrides, {"model": model_schema()})
    by_type = {cls.model_type: cls for cls in SETTINGS.values()}  # a Transfusion model's config.json: its class
    config_class = by_type.get(raw["model"].get("model_type"), MoMConfig)
    try:
        return config_class.from_dict(raw["model"])
    except ValueError as e:
        raise blame(ValueError(f"model.{e}"), applied, f"--model-json {path}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mom-flops",
        description="FLOPs per token and parameters of a MoM / dense Mamba model by component, training FLOPs of "
        "a recipe's token budget and the time it takes on reference GPUs at a given MFU.",
        epilog="example: mom-flops --config recipes/t2i_1b4_mom.yaml --world-size 8 (docs/flops.md)",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="training recipe YAML (recipes/<name>.yaml)")
    src.add_argument("--model-json", help="config.json of a saved model (or its directory)")
    parser.add_argument("--world-size", type=int, default=1, help="number of GPUs (sets the recipe's token budget "
                        "and divides the time estimates); default 1")  # fmt: skip
    parser.add_argument("--tokens", type=float, default=None, help="training tokens (overrides the recipe's budget)")
    parser.add_argument("--seq-len", type=int, default=None, help="context length of attention layers' FLOPs (a "
                        "hybrid's attention_layers); default: the recipe's data.seq_len")
    parser.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the time estimates; default 0.4")
    parser.add_argument("--hardware", action="store_true", help="print what the GPU training path's backward "
                        "recomputes per row, and count training FLOPs and times in hardware FLOPs (model FLOPs + "
                        "that recompute; --mfu is then a hardware FLOPs utilisation)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides (with --model-json: model.<key>=value)")
    add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error(f"--world-size: must be >= 1, got {args.world_size}")
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu: must be in (0, 1], got {args.mfu}")
    if args.seq_len is not None and args.seq_len < 1:
        parser.error(f"--seq-len: must be >= 1, got {args.seq_len}")
    if args.tokens is not None and args.tokens < 0:
        parser.error(f"--tokens: must be non-negative, got {args.tokens}")
    return run("mom-flops", lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> int:
    if args.model_json is not None:
        config, budget, seq_len = config_from_json(args.model_json, args.overrides), None, args.seq_len
        if config.attention_layers and seq_len is None:
            raise ValueError(f"--seq-len: the model has attention layers {list(config.attention_layers)}, whose FLOPs "
                             "per token depend on the context length; give it")
    else:
        recipe = load_recipe(args.config, args.overrides)
        config, budget = resolve_model_config(recipe), recipe.total_tokens(args.world_size)
        seq_len = args.seq_len if args.seq_len is not None else recipe.data.seq_len
    tokens = int(args.tokens) if args.tokens is not None else budget
    table = flop_table(config, seq_len)
    print(table.format())
    if args.hardware:
        print("\n" + table.format_recompute())
    if tokens is None:
        print("no token budget: pass --tokens (or --config) for training FLOPs and time estimates")
        return 0
    total = training_flops(config, tokens, hardware=args.hardware, seq_len=seq_len)
    kind = (f"hardware FLOPs, {TRAIN_FACTOR}x forward + the backward's recompute" if args.hardware
            else f"model FLOPs, {TRAIN_FACTOR}x forward")
    print(f"\ntraining on {tokens:,} tokens: {total:.3e} FLOPs ({kind})")
    print(f"time on {args.world_size} GPU(s) at {args.mfu:.0%} {'HFU' if args.hardware else 'MFU'} (dense bf16 peak):")
    for name in REFERENCE_GPUS:
        peak = next(g for g in GPU_PEAKS if g.name == name)
        seconds = total / (args.mfu * peak.bf16 * args.world_size)
        print(f"  {name:<10}{peak.bf16 / TERA:>9.1f} TFLOP/s  {human_duration(seconds):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
