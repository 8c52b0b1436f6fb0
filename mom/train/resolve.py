"""The one resolver of a recipe's ``auto`` values: model modalities and vocabulary sizes, the tokenizer directory,
the ZeRO stage and the training precision.

`mom-train`, its ``--dry-run`` and `mom-flops` all size a model through `resolve_model_config`. Sizing a model needs
no corpus when the recipe states its vocabulary (the sized recipes under recipes/ do); ``auto`` is resolved from
the corpus manifest, else from the multimodal tokenizer of ``train.tokenizer_dir``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mom.data.kinds import kinds_that_may_hold
from mom.data.latent_corpus import check_latent_model, latent_spec
from mom.data.loader import read_manifest
from mom.model.config import MoMConfig
from mom.model.transfusion import MoMTransfusionConfig
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.train.recipe import AUTO, AUTO_MODEL_KEYS, Recipe


def resolve_model_config(recipe: Recipe) -> MoMConfig:
    """The recipe's MoMConfig, "auto" modalities / vocabulary sizes resolved; checked against the corpus if built.

    "auto" comes from the first source that exists: the corpus manifest (``data.path``), then the multimodal
    tokenizer of ``train.tokenizer_dir`` (a directory, not "auto"). A recipe stating both reads neither to size the
    model. The model's modalities may be a leading subset of the corpus's (e.g. ``[text, image]`` of a text / image /
    speech corpus: the unified ids of those modalities are the same); `check_corpus` then requires the mixture to
    exclude every document kind that could hold the others.
    """
    auto = [k for k in AUTO_MODEL_KEYS if recipe.model.get(k, AUTO) == AUTO]
    if auto:
        source, modalities, vocab_sizes = vocabulary_source(recipe, auto)
        sizes = dict(zip(modalities, vocab_sizes))
        if "modalities" not in auto:
            modalities = tuple(recipe.model["modalities"])
            missing = [m for m in modalities if m not in sizes]
            if missing:
                raise ValueError(f"model.modalities: {missing} not in {source} ({list(sizes)})")
        values = {"modalities": tuple(modalities), "vocab_sizes": tuple(sizes[m] for m in modalities)}
        config = recipe.model_config(**{k: values[k] for k in auto})
    else:
        config = recipe.model_config()
    if corpus_built(recipe):
        check_corpus(config, recipe)
    return config


def corpus_built(recipe: Recipe) -> bool:
    """Whether ``data.path`` holds a corpus (its manifest: `mom.data.loader.read_manifest` checks the rest)."""
    return (Path(recipe.data.path) / "manifest.json").is_file()


def vocabulary_source(recipe: Recipe, auto: list[str]) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
    """(what it is, modalities, vocabulary sizes) that resolve the ``auto`` keys: the corpus, else the tokenizer."""
    if corpus_built(recipe):
        manifest = read_manifest(recipe.data.path)
        return f"the corpus {recipe.data.path}", tuple(manifest.modalities), tuple(manifest.vocab_sizes)
    tokenizer_dir = recipe.train.tokenizer_dir
    if tokenizer_dir not in (None, AUTO):
        tokenizer = MultimodalTokenizer.load(tokenizer_dir)
        return f"the tokenizer {tokenizer_dir}", tuple(tokenizer.modalities), tuple(tokenizer.vocab_sizes)
    keys = " / ".join(f"model.{k}" for k in auto)
    modalities = recipe.model.get("modalities", AUTO)
    example = "[text, image, ...]" if modalities == AUTO else f"[{', '.join(modalities)}]"
    raise ValueError(
        f"{keys} {'is' if len(auto) == 1 else 'are'} 'auto' and there is no corpus at {recipe.data.path} to take "
        f"them from: state them in the recipe (model.modalities={example} model.vocab_sizes=[...], the sizes in "
        "the tokenizer's config.json), or set train.tokenizer_dir=DIR (a multimodal tokenizer), or build the corpus"
    )


def check_corpus(config: MoMConfig, recipe: Recipe) -> None:
    """The model's vocabulary must be a leading part of the corpus's, and excluded modalities excluded from data."""
    manifest = read_manifest(recipe.data.path)
    if isinstance(config, MoMTransfusionConfig):
        check_latent_model(config, recipe.data.path)
    elif latent_spec(recipe.data.path) is not None:
        raise ValueError(f"{recipe.data.path} is a corpus of image latents (the Transfusion setting): set "
                         "model.setting: transfusion (docs/transfusion.md)")
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
    risky = [k for k in kinds_that_may_hold(dropped) if weights.get(k, 1.0) > 0]
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


def zero_stage(stage: int | str, world_size: int) -> int:
    """``deepspeed.zero_stage``: "auto" is 0 in a world of one, where sharding saves nothing and DeepSpeed's ZeRO
    optimizer only adds work per parameter tensor (docs/training.md, "Measuring it"), and 1 on several ranks."""
    if stage != AUTO:
        return int(stage)
    return 0 if world_size == 1 else 1


def precision(dtype: str, on_gpu: bool, stage: int) -> str:
    """``train.dtype``: "auto" is fp32 off the GPU; on a GPU "autocast_bf16" at ZeRO stage 0 (fp32 weights stepped
    by torch's fused AdamW as they are, matmuls in bf16) and "bf16" at stages 1-3 (DeepSpeed's bf16 weights with an
    fp32 master copy, its ZeRO optimizer's own mode). docs/training.md has the measurements behind the choice."""
    if dtype != AUTO:
        return dtype
    if not on_gpu:
        return "fp32"
    return "autocast_bf16" if stage == 0 else "bf16"


def for_world(recipe: Recipe, world_size: int) -> Recipe:
    """``recipe`` with its ZeRO stage resolved for ``world_size`` ranks (`zero_stage`)."""
    stage = zero_stage(recipe.deepspeed.zero_stage, world_size)
    return dataclasses.replace(recipe, deepspeed=dataclasses.replace(recipe.deepspeed, zero_stage=stage))
