"""The one resolver of a recipe's ``auto`` values: model modalities and vocabulary sizes, and the tokenizer directory.

`mom-train`, ``--dry-run`` and `mom-flops` all size a model through `resolve_model_config`.
"""

from __future__ import annotations

import json
from pathlib import Path

from mom.data.kinds import kinds_that_may_hold
from mom.data.loader import read_manifest
from mom.model.config import MoMConfig
from mom.train.recipe import AUTO, Recipe


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
