"""LoRA fine-tuning of a pretrained MoM checkpoint with the pretraining trainer.

    ft = load_finetune_recipe("recipes/finetune/image_experts.yaml", ["train.max_steps=50", "lora.r=4"])
    result = finetune("runs/tiny_mom/hf", ft)

The command line is `mom.cli.finetune` (``mom-finetune``).

A fine-tuning recipe is a training recipe (``data`` / ``optim`` / ``train`` / ``deepspeed``, docs/training.md) with
no ``model:`` section (the base checkpoint defines the model) and a ``lora:`` section (`mom.train.lora.LoraSettings`).
The base is loaded with ``AutoModelForCausalLM.from_pretrained``, wrapped with ``peft.get_peft_model``, trained by
``mom.train.train`` (same loop, logging, checkpoints, per-modality losses) and its adapter saved in peft's format
to ``<train.out_dir>/adapter`` (``PeftModel.from_pretrained(base, dir)`` loads it). See docs/finetune.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from transformers import AutoModelForCausalLM

import mom  # noqa: F401  (registers MoM with the Auto classes)
from mom.data.corpus import build_loader
from mom.data.loader import read_manifest
from mom.model.modeling import MoMForCausalLM
from mom.model.transfusion import MoMTransfusionForCausalLM
from mom.tokenization.processor import MEDIA_DIR
from mom.train.export import complete_export, load_tokenizer
from mom.train.loop import losses, model_inputs, train
from mom.train.lora import LoraSettings, adapter_filter, parameter_counts, save_adapter, wrap
from mom.train.model_card import CARD_FILE, RECIPE_FILE
from mom.train.recipe import SECTIONS, Recipe
from mom.utils.atomic import atomic_directory, atomic_write_text
from mom.utils.configio import apply_overrides, blame, read_mapping

ADAPTER_SUBDIR = "adapter"  # default adapter directory inside train.out_dir
SUMMARY_FILE = "finetune.json"  # inside train.out_dir: parameter counts, paths, losses before / after


@dataclass
class FinetuneRecipe:
    """A training recipe (no model section) plus the ``lora:`` section."""

    recipe: Recipe
    lora: LoraSettings


def load_finetune_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> FinetuneRecipe:
    """Read a fine-tuning recipe, apply ``key=value`` overrides (``lora.*`` ones included), validate it all."""
    raw = read_mapping(path, "recipe", of="sections")
    schema = {"lora": LoraSettings, **SECTIONS}
    applied = apply_overrides(raw, overrides, schema, refused={"model": "the base checkpoint defines the model"})
    try:
        if "lora" not in raw:
            raise ValueError("lora: section required (what to adapt, see docs/finetune.md)")
        if raw.get("model"):
            raise ValueError("model: the base checkpoint (--base) defines the model; remove this section")
        sections = {k: v for k, v in raw.items() if k not in ("model", "lora")}
        lora_raw = raw["lora"]
        if not isinstance(lora_raw, dict):
            raise ValueError(f"lora: must be a mapping, got {type(lora_raw).__name__}")
        return FinetuneRecipe(Recipe.from_dict(sections), LoraSettings.from_dict(lora_raw))
    except ValueError as e:
        raise blame(e, applied, f"recipe {path}") from e


def load_base(base_dir: str | os.PathLike) -> MoMForCausalLM:
    """The pretrained MoM (``AutoModelForCausalLM.from_pretrained`` of a local Hugging Face directory)."""
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir / 'config.json'} not found: --base must be a Hugging Face model directory "
                                "(e.g. <train.out_dir>/hf of a pretraining run)")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if not isinstance(model, (MoMForCausalLM, MoMTransfusionForCausalLM)):
        raise ValueError(f"{base_dir} holds a {type(model).__name__}, not a MoM model")
    return model


def check_corpus_matches(model: Any, corpus: str | os.PathLike) -> None:
    """The corpus's modalities and vocabulary must be the base's (else token ids mean other things)."""
    manifest = read_manifest(corpus)
    ours = (tuple(model.config.modalities), tuple(model.config.vocab_sizes))
    if (manifest.modalities, manifest.vocab_sizes) != ours:
        raise ValueError(
            f"corpus {corpus}: has modalities {list(manifest.modalities)} with vocab sizes "
            f"{list(manifest.vocab_sizes)}, the base has {list(ours[0])} with {list(ours[1])}; tokenize the "
            "fine-tuning data with the base's tokenizers"
        )


def finetune(
    base_dir: str | os.PathLike,
    ft: FinetuneRecipe,
    adapter_dir: str | os.PathLike | None = None,
    merged_dir: str | os.PathLike | None = None,
    compare: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Wrap the base with LoRA, train it, save the adapter (and optionally the merged model).

    ``compare``: corpora whose validation split is evaluated before and after (the fine-tuning corpus is added
    first), e.g. the base's pretraining corpus to measure forgetting. Returns the trainer's result plus
    ``adapter_dir``, ``merged_dir`` (None unless written), ``trainable_params``, ``total_params`` and
    ``comparison`` ({corpus: {"before": losses, "after": losses}}), also written to ``<out_dir>/finetune.json``.
    A run stopped early (``train.stop_after``) saves no adapter: the same call again resumes it.
    """
    recipe = ft.recipe
    if recipe.deepspeed.zero_stage == 3:
        raise ValueError("deepspeed.zero_stage: 3 shards the base weights; LoRA fine-tuning supports stages 0-2")
    adapter_dir = Path(adapter_dir) if adapter_dir else Path(recipe.train.out_dir) / ADAPTER_SUBDIR
    for out in (adapter_dir, merged_dir):  # refuse before training, not after
        if out is not None and Path(out).exists():
            raise FileExistsError(f"{out} already exists; choose another output directory or remove it")
    corpora = list(dict.fromkeys([recipe.data.path, *map(str, compare)])) if compare else []
    model = load_base(base_dir)
    for corpus in [recipe.data.path, *corpora]:
        check_corpus_matches(model, corpus)
    if merged_dir is not None and (tokenizer_dir := base_tokenizer_dir(base_dir)) is not None:
        load_tokenizer(tokenizer_dir, model.config)  # the merged export copies it: checked before training
    torch.manual_seed(recipe.train.seed)  # LoRA's A factors are drawn here, before the trainer seeds anything
    peft_model = wrap(model, ft.lora)
    trainable, total = parameter_counts(peft_model)
    before = {c: evaluate_corpus(peft_model, recipe, c) for c in corpora}  # LoRA starts at zero: the base's losses

    recipe.train.export_hf = False  # the trainer would export the bare adapter; we save it below
    result = dict(train(recipe, model=peft_model, trainable_filter=adapter_filter(peft_model, ft.lora)))
    finished = result["step"] >= recipe.train.max_steps
    main_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    after = {c: evaluate_corpus(peft_model, recipe, c) for c in corpora} if finished else {}
    if finished and main_rank:
        save_adapter(peft_model, adapter_dir, ft.lora)
        if merged_dir is not None:
            export_merged(peft_model, merged_dir, base_dir, ft,
                          {"step": result["step"], "tokens": result["tokens"], "validation": result["validation"]})
    summary = {
        "base": str(base_dir),
        "lora": asdict(ft.lora),
        "step": result["step"],
        "adapter_dir": str(adapter_dir) if finished else None,
        "merged_dir": str(merged_dir) if finished and merged_dir else None,
        "trainable_params": trainable,
        "total_params": total,
        "comparison": {c: {"before": before[c], "after": after.get(c)} for c in corpora},
    }
    if main_rank:
        atomic_write_text(Path(recipe.train.out_dir) / SUMMARY_FILE, json.dumps(_json_safe(summary), indent=2))
    return {**result, **summary}


def _json_safe(value: Any) -> Any:
    """NaN (no target of a modality) -> null, as JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@torch.no_grad()
def evaluate_corpus(model: nn.Module, recipe: Recipe, corpus: str | os.PathLike) -> dict[str, float]:
    """Mean loss overall and per target modality on the first ``train.eval_batches`` validation batches of
    ``corpus`` (in corpus order; batch shape from ``recipe.data``)."""
    cfg = replace(recipe.data, path=str(corpus), split="validation", shuffle=False, drop_last=False, num_epochs=1,
                  mixture=None)
    modalities = model.config.modalities
    device = next(model.parameters()).device
    stats = torch.zeros(2 * len(modalities), dtype=torch.float64)
    was_training = model.training
    model.eval()
    for batch in islice(build_loader(cfg), max(1, recipe.train.eval_batches)):
        out = model(**model_inputs(batch, device, len(modalities)))
        stats[: len(modalities)] += out.modality_loss_sums.double().cpu()
        stats[len(modalities) :] += out.modality_target_counts.double().cpu()
    model.train(was_training)
    return losses(stats, modalities)


def base_tokenizer_dir(base_dir: str | os.PathLike) -> Path | None:
    """The multimodal tokenizer a Hugging Face export carries (``<base>/tokenizer``), or None without one."""
    path = Path(base_dir) / MEDIA_DIR
    return path if path.is_dir() else None


def export_merged(
    peft_model: Any,
    out_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    ft: FinetuneRecipe | None = None,
    results: dict[str, Any] | None = None,
) -> Path:
    """``merge_and_unload()``, then a Hugging Face export to ``out_dir`` (atomically) laid out as the trainer's
    (`mom.train.export`): the weights, special ids in ``config.json``, ``generation_config.json``, the base's
    tokenizers (``tokenizer.json``, ``processor_config.json``, ``tokenizer/``; when ``base_dir`` has them, so that
    AutoTokenizer / AutoProcessor load the merged model as any export), the model card and, with ``ft``,
    ``recipe.yaml`` = the fine-tuning recipe (``lora:`` included). ``results``: ``step`` / ``tokens`` /
    ``validation`` for the card.

    The merge folds the adapter into the base weights in place: the peft model is unusable afterwards.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose another directory or remove it")
    config = peft_model.get_base_model().config
    tokenizer_dir = base_tokenizer_dir(base_dir) if base_dir is not None else None
    media = load_tokenizer(tokenizer_dir, config) if tokenizer_dir is not None else None  # before the merge
    merged = peft_model.merge_and_unload()
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp)
        complete_export(tmp, merged.config, media, ft.recipe if ft else None, results)
        if ft is not None:
            sections = {k: v for k, v in ft.recipe.to_dict().items() if k != "model"}  # the base defines the model
            atomic_write_text(Path(tmp) / RECIPE_FILE,
                              yaml.safe_dump({"lora": asdict(ft.lora), **sections}, sort_keys=False))
            card = Path(tmp) / CARD_FILE
            targets = ", ".join(ft.lora.projections or []) + (f" of {', '.join(ft.lora.modalities)}"
                                                              if ft.lora.modalities else "")
            atomic_write_text(card, card.read_text(encoding="utf-8") + "\n## Fine-tuning\n\n"
                              f"LoRA (r {ft.lora.r}, alpha {ft.lora.alpha}; {targets or 'see recipe.yaml'}) on "
                              f"`{base_dir}`, merged into the weights with `mom-finetune --merged-out`: a plain "
                              f"MoM checkpoint. The fine-tuning recipe (`lora:` included): `{RECIPE_FILE}`.\n")
    return out_dir
