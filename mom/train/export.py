"""The Hugging Face export of a training run: a directory that ``transformers`` loads whole.

Layout of ``out`` (written into a temporary directory beside it, then renamed into place)::

    config.json              MoMConfig, with bos / eos / pad token ids of the special-token contract
    generation_config.json   the same ids for generate(): it stops at </s>
    model.safetensors        the weights (save_pretrained)
    tokenizer.json           the text tokenizer for AutoTokenizer (mom.tokenization.hf_tokenizer; same ids as mom's)
    tokenizer_config.json
    processor_config.json    MoMProcessor (AutoProcessor, after ``import mom``): text + images + audio -> ids
    tokenizer/               the multimodal tokenizer the run trained with, cut to the model's modalities and
                             self-contained (text, image, speech as the model has them; mom-generate)
    README.md                model card: configuration, training data, how to load
    recipe.yaml              the training recipe (when given)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from mom.model.config import MoMConfig
from mom.tokenization.hf_tokenizer import save_hf_tokenizer
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.processor import MEDIA_DIR, write_processor_config
from mom.tokenization.special import BOS_ID, EOS_ID, PAD_ID
from mom.train.distributed import Context, barrier
from mom.train.model_card import CARD_FILE, RECIPE_FILE, model_card
from mom.train.recipe import Recipe
from mom.utils.atomic import atomic_directory, atomic_write_text
from mom.utils.errors import BadInputError

SPECIAL_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


def export_hf(
    engine: Any,
    out: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None,
    ctx: Context,
    recipe: Recipe | None = None,
    results: dict[str, Any] | None = None,
) -> Path:
    """Write the engine's model with its tokenizers, processor, generation config and model card to ``out``.

    Works from every ZeRO stage: under ZeRO-3 the full weights are gathered first (``GatheredParameters``; every
    rank must call this). The weights are the ones the engine computes with (bf16 in a bf16 run). ``tokenizer_dir``
    (a multimodal tokenizer directory, or None for no tokenizer) is checked against the model on every rank before
    anything is written; ``recipe`` and ``results`` (``step``, ``tokens``, ``validation``) fill the model card.
    ``out`` is replaced atomically: on any error the previous export stays as it was.
    """
    out = Path(out)
    model = engine.module
    media = load_tokenizer(tokenizer_dir, model.config) if tokenizer_dir is not None else None
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_directory(out)) if ctx.is_main else None
        with _full_weights(engine, model):
            if tmp is not None:
                model.save_pretrained(tmp, safe_serialization=True)
        if tmp is not None:
            complete_export(tmp, model.config, media, recipe, results)
    barrier()
    return out


def load_tokenizer(tokenizer_dir: str | os.PathLike, config: MoMConfig) -> MultimodalTokenizer:
    """The multimodal tokenizer of ``tokenizer_dir`` cut to the model's modalities
    (`MultimodalTokenizer.for_model`); `BadInputError` unless the model's vocabulary leads it."""
    try:
        media = MultimodalTokenizer.load(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise BadInputError(str(tokenizer_dir), f"not a multimodal tokenizer directory ({e})") from e
    try:
        return media.for_model(config.modalities, config.vocab_sizes)
    except ValueError as e:
        raise BadInputError(str(tokenizer_dir), str(e)) from e


def complete_export(
    directory: str | os.PathLike,
    config: MoMConfig,
    media: MultimodalTokenizer | None,
    recipe: Recipe | None = None,
    results: dict[str, Any] | None = None,
) -> None:
    """Everything but the weights, into a directory ``save_pretrained`` wrote: special ids in ``config.json``,
    ``generation_config.json``, the tokenizers and processor config (when ``media``, the model's tokenizer as
    `load_tokenizer` returns it, is given), ``README.md`` and ``recipe.yaml`` (when ``recipe`` is given)."""
    from transformers import GenerationConfig

    directory = Path(directory)
    config_path = directory / "config.json"
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    saved.update(SPECIAL_IDS)
    atomic_write_text(config_path, json.dumps(saved, indent=2, sort_keys=True) + "\n")
    GenerationConfig(**SPECIAL_IDS).save_pretrained(directory)
    if media is not None:
        media.save(directory / MEDIA_DIR)  # self-contained: the model's modalities only
        save_hf_tokenizer(media.text, directory)
        write_processor_config(directory, MEDIA_DIR, config.modalities)
    if recipe is not None:
        atomic_write_text(directory / RECIPE_FILE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    atomic_write_text(directory / CARD_FILE, model_card(config, recipe, results, with_tokenizer=media is not None))


@contextlib.contextmanager
def _full_weights(engine: Any, model: Any):
    """Under ZeRO-3, gather the full parameters on every rank for the duration; otherwise nothing to do."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield
