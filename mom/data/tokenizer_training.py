"""Tokenizer training recipes: which corpus sources each tokenizer learns from, and reading them.

The tokenizer libraries (:mod:`mom.tokenization`) train on arrays and strings; these recipes
(``tokenizers/recipes/*.yaml`` map onto them one to one) add the sources of :mod:`mom.data` the training data comes
from. The image recipes (the VQ tokenizer's and the Transfusion setting's VAE) split their images into training and
held-out ones by one rule, :func:`load_split_images`. `mom-tokenizer ... train` (:mod:`mom.cli.tokenizer`) and
`mom-data build` (``tokenizer.train_text``) use them.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from mom.data.images import SOURCES as IMAGE_SOURCES
from mom.data.images import iter_image_records
from mom.data.speech import SpeechRecord, iter_speech_records
from mom.data.text import iter_text_records
from mom.tokenization.image import ImageTokenizerConfig, TrainingConfig
from mom.tokenization.speech import KMeansConfig, SpeechTokenizerConfig
from mom.tokenization.text import TextTrainingConfig
from mom.tokenization.vae import ImageVAEConfig, VAETrainingConfig
from mom.utils.configio import from_file
from mom.utils.errors import BadInputError

# ---- text --------------------------------------------------------------------------------------------------------


@dataclass
class TextTokenizerRecipe(TextTrainingConfig):
    """A text tokenizer recipe: SentencePiece settings plus ``sources``.

    ``sources`` are text sources of :mod:`mom.data.text` (``{source: python-docs, max_chars: 2000}``, ...);
    ``max_documents`` caps the documents read per source (``null``: all).
    """

    max_documents: int | None = None
    sources: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_documents is not None and self.max_documents < 0:
            raise ValueError(f"max_documents: must be >= 0, got {self.max_documents}")
        for i, spec in enumerate(self.sources):
            if not isinstance(spec, dict) or not isinstance(spec.get("source"), str):
                raise ValueError(f"sources[{i}]: must be a mapping with a 'source' name, got {spec!r}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TextTokenizerRecipe:
        return from_file(cls, path, list_unknown=True)


def recipe_texts(recipe: TextTokenizerRecipe, on_error: str = "skip") -> Iterator[str]:
    """The training documents of ``recipe``'s sources, in order (``max_documents`` per source)."""
    for spec in recipe.sources:
        options = {k: v for k, v in spec.items() if k != "source"}
        for n, record in enumerate(iter_text_records(spec["source"], on_error=on_error, **options)):
            if recipe.max_documents is not None and n >= recipe.max_documents:
                break
            yield record.text


# ---- image -------------------------------------------------------------------------------------------------------


@dataclass
class ImageSourceSpec:
    """One image source of :func:`mom.data.images.iter_image_records` with its options (e.g. path, augment)."""

    source: str
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in IMAGE_SOURCES:
            raise ValueError(f"source: unknown image source {self.source!r}; valid sources are {list(IMAGE_SOURCES)}")


def check_image_sources(sources: Sequence[ImageSourceSpec], held_out_fraction: float) -> None:
    """The checks every image recipe makes of its ``sources`` and ``held_out_fraction`` (``ValueError`` naming the
    field)."""
    if not sources:
        raise ValueError("sources: list at least one image source")
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held_out_fraction: must be in [0, 1), got {held_out_fraction}")


def load_split_images(
    sources: Sequence[ImageSourceSpec],
    image_size: int,
    seed: int,
    held_out_fraction: float,
    on_error: Callable[[BadInputError], None] | None = None,
) -> tuple[list[Image.Image], list[Image.Image]]:
    """(train images, held-out images) of ``sources`` at ``image_size``: the one held-out rule of the image recipes.

    Per source, the held-out items are the records whose ``meta["split"]`` is ``"validation"`` (as written by
    ``mom-data images export``), or, when none has that mark, a ``held_out_fraction`` of the source's items drawn
    with ``seed``. Augmented variants (``options.augment``) of held-out items are never trained on nor evaluated.
    An unusable image goes to ``on_error`` (default: a line on stderr) and is skipped.
    """
    records, held_keys = [], set()
    for index, spec in enumerate(sources):
        options = {"size": image_size, **spec.options}
        recs = list(iter_image_records(spec.source, on_error=on_error or warn_skipped, **options))
        keys = sorted({(r.source, r.meta["id"]) for r in recs})
        marked = {(r.source, r.meta["id"]) for r in recs if r.meta.get("split") == "validation"}
        if not marked:  # no split in the source: hold out a seeded sample of its items
            rng = random.Random(f"{seed}:{index}")
            marked = set(rng.sample(keys, round(held_out_fraction * len(keys))))
        records += recs
        held_keys |= marked
    train = [r.image for r in records if (r.source, r.meta["id"]) not in held_keys]
    held: dict = {}  # one original per held-out item, even if two sources yield it
    for r in records:
        key = (r.source, r.meta["id"])
        if key in held_keys and r.meta.get("variant", 0) == 0:
            held.setdefault(key, r.image)
    return train, list(held.values())


@dataclass
class ImageTokenizerRecipe:
    """A VQ image tokenizer recipe (``tokenizers/recipes/image_*.yaml``): where the images come from, the
    architecture and the training run. Held-out images: :func:`load_split_images`."""

    sources: tuple[ImageSourceSpec, ...]
    tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    held_out_fraction: float = 0.1

    def __post_init__(self) -> None:
        check_image_sources(self.sources, self.held_out_fraction)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> ImageTokenizerRecipe:
        return from_file(cls, path, "image tokenizer recipe")

    def load_images(
        self, on_error: Callable[[BadInputError], None] | None = None
    ) -> tuple[list[Image.Image], list[Image.Image]]:
        """(train, held-out) images at the tokenizer's ``image_size`` (:func:`load_split_images`)."""
        return load_split_images(self.sources, self.tokenizer.image_size, self.training.seed, self.held_out_fraction,
                                 on_error)  # fmt: skip


@dataclass
class VAERecipe:
    """A continuous image VAE recipe (``tokenizers/recipes/vae_*.yaml``) of the Transfusion setting: image
    ``sources`` (as in the VQ recipes), the ``vae`` architecture (:class:`ImageVAEConfig`), the ``training`` run
    (:class:`VAETrainingConfig`) and ``held_out_fraction``. Held-out images: :func:`load_split_images`."""

    sources: tuple[ImageSourceSpec, ...]
    vae: ImageVAEConfig = field(default_factory=ImageVAEConfig)
    training: VAETrainingConfig = field(default_factory=VAETrainingConfig)
    held_out_fraction: float = 0.1

    def __post_init__(self) -> None:
        check_image_sources(self.sources, self.held_out_fraction)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> VAERecipe:
        return from_file(cls, path, "VAE recipe")

    def load_images(
        self, on_error: Callable[[BadInputError], None] | None = None
    ) -> tuple[list[Image.Image], list[Image.Image]]:
        """(train, held-out) images at the VAE's ``image_size`` (:func:`load_split_images`)."""
        return load_split_images(self.sources, self.vae.image_size, self.training.seed, self.held_out_fraction,
                                 on_error)  # fmt: skip


def warn_skipped(error: BadInputError) -> None:
    """The default ``on_error`` of the readers here: one line on stderr, then go on."""
    print(f"skipped {error}", file=sys.stderr)


# ---- speech ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechDataSpec:
    """A speech source for :func:`mom.data.speech.iter_speech_records`: its name and options (paths relative to
    the working directory)."""

    source: str
    options: dict = field(default_factory=dict)

    def records(self, on_error: Callable[[BadInputError], None]) -> Iterable[SpeechRecord]:
        return iter_speech_records(self.source, on_error=on_error, **self.options)


@dataclass(frozen=True)
class SpeechTokenizerRecipe:
    """A speech tokenizer recipe (``tokenizers/recipes/speech_*.yaml``); ``eval_data`` is measured after training."""

    tokenizer: SpeechTokenizerConfig
    train_data: SpeechDataSpec
    eval_data: SpeechDataSpec | None = None
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    seed: int = 0

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SpeechTokenizerRecipe:
        """Read a YAML recipe (``ValueError`` naming the file and any bad key)."""
        return from_file(cls, path, "speech tokenizer recipe", list_unknown=True)
