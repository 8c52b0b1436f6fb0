"""`mom-finetune`: LoRA fine-tuning of a pretrained MoM checkpoint (`mom.train.finetune`).

    mom-finetune --base runs/tiny_mom/hf --config recipes/finetune/image_experts.yaml [train.max_steps=50 lora.r=4]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch

from mom.cli.common import add_debug_flag, run
from mom.train.finetune import ADAPTER_SUBDIR, finetune, load_finetune_recipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mom-finetune",
        description="LoRA fine-tuning of a pretrained MoM checkpoint (peft) with the pretraining trainer. The "
        "adapter is saved in peft's format (load with PeftModel.from_pretrained(base, dir)).",
        epilog="example: mom-finetune --base runs/tiny_mom/hf --config recipes/finetune/image_experts.yaml "
        "--compare data/small train.max_steps=100 lora.r=4   (docs/finetune.md)",
    )
    parser.add_argument("--base", required=True, help="pretrained MoM: a Hugging Face model directory")
    parser.add_argument("--config", required=True, help="fine-tuning recipe (YAML, with a lora: section)")
    parser.add_argument("--adapter-out", default=None,
                        help=f"adapter directory (default: <train.out_dir>/{ADAPTER_SUBDIR}); must not exist")
    parser.add_argument("--merged-out", default=None,
                        help="also merge the adapter into the base and save the plain MoM model here")
    parser.add_argument("--compare", action="append", default=[], metavar="CORPUS",
                        help="evaluate the validation split of this corpus (and of the fine-tuning corpus) before "
                        "and after fine-tuning, e.g. the base's pretraining corpus to measure forgetting; repeatable")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides, e.g. train.max_steps=20 optim.lr=1e-3 lora.r=16")
    add_debug_flag(parser)
    return parser


def format_comparison(comparison: dict[str, dict[str, dict[str, float] | None]]) -> str:
    """Validation losses before / after fine-tuning: a header line per corpus, a row per loss."""
    lines = [f"{'validation loss':<32}{'before':>10}{'after':>10}{'change':>10}"]
    for corpus, result in comparison.items():
        lines.append(str(corpus))
        before, after = result["before"], result["after"] or {}
        for key, value in before.items():
            new = after.get(key, math.nan)
            if math.isnan(value) and math.isnan(new):
                continue  # no target of that modality in this corpus
            lines.append(f"  {key:<30}{value:>10.4f}{new:>10.4f}{new - value:>+10.4f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run("mom-finetune", lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> int:
    ft = load_finetune_recipe(args.config, args.overrides)
    result = finetune(args.base, ft, args.adapter_out, args.merged_out, args.compare)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    trainable, total = result["trainable_params"], result["total_params"]
    counts = f"trainable {trainable:,} / total {total:,} parameters ({100 * trainable / total:.3f}%)"
    if result["adapter_dir"] is None:
        print(f"mom-finetune: stopped at step {result['step']} of {ft.recipe.train.max_steps} ({counts}); run the "
              "same command again to resume, the adapter is saved at the end")
        return 0
    if result["comparison"]:
        print(format_comparison(result["comparison"]))
    print(f"mom-finetune: done, {counts}; adapter: {result['adapter_dir']}"
          + (f"; merged model: {result['merged_dir']}" if result["merged_dir"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
