"""Corpora of captioned images beside the text documents of a corpus already built, written in one pass where the
image model runs (the GPU, for the 64x64 tokenizers): the discrete setting's (`build_code_corpus`, ``mom-data
codes``: each image as its VQ codes) and the Transfusion setting's (`mom.data.latent_corpus.build_latent_corpus`,
``mom-data latents``: each image as VAE latent patches). Only the images and the token shards of the text corpus
need to travel there, not the raw text sources.

Documents (kinds ``image_caption`` / ``caption_image`` of `mom.data.kinds`)::

    <s> <image> SPAN </image> caption </s>        or        <s> caption <image> SPAN </image> </s>

with each image's split drawn from its record as `mom-data build` draws it (`mom.data.documents.split_of`), plus the
``text`` documents of ``text_from`` (a `mom-data build` corpus of the same text tokenizer) in their own splits,
their ids as they are. Each split is shuffled (a validation prefix holds every kind) into one shard.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mom.data.documents import Item, count_tokens, split_of
from mom.data.loader import MANIFEST_FORMAT, MANIFEST_VERSION, SHARD_SCHEMA, read_manifest
from mom.tokenization.special import BOI_ID, BOS_ID, EOI_ID, EOS_ID, SPECIAL_TOKENS
from mom.utils.atomic import atomic_directory
from mom.utils.errors import BadInputError

MODALITIES = ("text", "image")
# An image's encoding: the ids of its span between <image> and </image>, and its values of the extra columns.
Encoded = tuple[np.ndarray, dict[str, Any]]
Encoder = Callable[[np.ndarray], list[Encoded]]  # uint8 images (n, s, s, 3) -> one Encoded each


def document_layout(caption_ids: Sequence[int], span: Sequence[int], caption_first: bool) -> list[int]:
    """``<s> <image> span </image> caption </s>``, or the caption first."""
    image = [BOI_ID, *span, EOI_ID]
    body = [*caption_ids, *image] if caption_first else [*image, *caption_ids]
    return [BOS_ID, *body, EOS_ID]


def text_documents(corpus: str | Path, text_vocab: int, extra: dict[str, Any]) -> dict[str, list[dict]]:
    """The ``text`` documents of a discrete-token corpus, per split, as shard rows (``extra``: the values of the
    builder's extra columns for a document without images)."""
    manifest = read_manifest(corpus)
    if manifest.vocab_sizes[0] != text_vocab:
        raise ValueError(f"--text-from {corpus}: its text vocabulary has {manifest.vocab_sizes[0]} ids, the captions' "
                         f"tokenizer {text_vocab}: use a corpus built with the same text tokenizer")
    out: dict[str, list[dict]] = {}
    for split, shards in manifest.shards.items():
        docs = out.setdefault(split, [])
        for shard in shards:
            table = pq.read_table(manifest.root / shard, columns=["input_ids", "kind", "source", "meta"])
            for row in table.to_pylist():
                if row["kind"] == "text":
                    ids = np.asarray(row["input_ids"], dtype=np.int32)
                    docs.append({"input_ids": ids, "modality_ids": np.zeros(len(ids), dtype=np.int8), "doc_id": 0,
                                 "kind": "text", "source": row["source"], "meta": row["meta"], **extra})
    return out


def build_captioned_corpus(
    records: Iterable[Any],
    encode: Encoder,
    tokenizer: Any,
    out: str | Path,
    *,
    image_size: int,
    manifest_fields: dict[str, Any],
    schema: pa.Schema = SHARD_SCHEMA,
    text_extra: dict[str, Any] | None = None,
    caption_first: float = 0.5,
    validation_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 32,
    row_group_size: int = 128,
    name: str = "captioned",
    text_from: str | Path | None = None,
) -> dict:
    """Encode captioned images (`mom.data.images.ImageRecord`s: ``image``, ``caption``, ``source``, ``meta``), in
    batches of ``batch_size``, with ``encode``, their captions with ``tokenizer`` (``encode_text``, ``vocab_sizes``:
    a `MultimodalTokenizer`), and write the corpus to ``out`` (atomically; an existing ``out`` is an error).
    ``manifest_fields``: ``vocab_sizes``, ``columns`` and whatever else the manifest states for this kind of corpus;
    ``schema``: the shard's columns (`SHARD_SCHEMA` plus the extra ones ``encode`` fills, ``text_extra`` their values
    for a text document). A token is of the image modality where its id is at least the text vocabulary's size.
    Returns the manifest."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another output directory")
    if not 0 <= caption_first <= 1 or not 0 <= validation_fraction < 1:
        raise ValueError(f"caption_first must be in [0, 1] and validation_fraction in [0, 1), got {caption_first}, "
                         f"{validation_fraction}")
    text_vocab = int(tokenizer.vocab_sizes[0])
    rng = random.Random(seed)
    rows: dict[str, list[dict]] = {"train": [], "validation": []}

    def flush(chunk: list[Any]) -> None:
        images = np.stack([np.asarray(r.image.convert("RGB"), dtype=np.uint8) for r in chunk])  # (n, h, w, 3)
        if images.shape[1:3] != (image_size, image_size):
            raise BadInputError(chunk[0].source, f"images must be {image_size}x{image_size} (the image model's "
                                f"image_size), got {images.shape[1]}x{images.shape[2]}")
        for record, (span, extra) in zip(chunk, encode(images)):
            first = rng.random() < caption_first
            ids = np.asarray(document_layout(tokenizer.encode_text(record.caption), span.tolist(), first),
                             dtype=np.int32)
            item = Item("image", record.source, dict(record.meta), record.caption)
            rows[split_of(item, validation_fraction, seed)].append(
                {"input_ids": ids, "modality_ids": (ids >= text_vocab).astype(np.int8), "doc_id": 0,
                 "kind": "caption_image" if first else "image_caption", "source": record.source,
                 "meta": json.dumps(record.meta, default=str), **extra})

    if text_from is not None:
        for split, docs in text_documents(text_from, text_vocab, text_extra or {}).items():
            rows[split] += docs
    chunk: list[Any] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == batch_size:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    splits = {}
    doc_id = 0
    with atomic_directory(out) as tmp:
        for split, docs in rows.items():
            if not docs:
                raise ValueError(f"no {split} documents: give more images or another validation_fraction")
            rng.shuffle(docs)  # kinds mixed along the shard: a validation prefix (train.eval_batches) holds every kind
            kinds: dict[str, int] = {}
            for d in docs:
                d["doc_id"], doc_id = doc_id, doc_id + 1
                kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
            (tmp / split).mkdir()
            table = pa.Table.from_pylist(docs, schema=schema)
            pq.write_table(table, tmp / split / "shard-00000.parquet", row_group_size=row_group_size)
            per_modality = count_tokens(np.concatenate([d["modality_ids"] for d in docs]), MODALITIES)
            splits[split] = {"documents": len(docs), "shards": [f"{split}/shard-00000.parquet"],
                             "tokens": int(sum(len(d["input_ids"]) for d in docs)), "documents_per_kind": kinds,
                             "tokens_per_modality": per_modality}
        sizes = manifest_fields["vocab_sizes"]
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "name": name, "modalities": list(MODALITIES),
            "vocab_offsets": [0, int(sizes[0])], "special_tokens": {t.name: t.id for t in SPECIAL_TOKENS},
            **manifest_fields, "splits": splits,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_code_corpus(records: Iterable[Any], tokenizer: Any, out: str | Path, **options: Any) -> dict:
    """The discrete setting's corpus (`build_captioned_corpus`): each image as its codes from ``tokenizer``'s image
    tokenizer (a `MultimodalTokenizer` with an ``image`` part), in the unified vocabulary ``[text, image]``, the
    columns of `mom-data build`'s shards. ``options``: `build_captioned_corpus`'s keywords (``text_from``,
    ``caption_first``, ``validation_fraction``, ``seed``, ``batch_size``, ``row_group_size``, ``name``)."""
    image = tokenizer.image
    offset = tokenizer.offsets["image"]
    sizes = [int(tokenizer.vocab_sizes[0]), int(image.vocab_size)]
    if offset != sizes[0]:
        raise ValueError(f"the tokenizer's image ids start at {offset}, not after its {sizes[0]} text ids")

    def encode(images: np.ndarray) -> list[Encoded]:
        return [(codes + offset, {}) for codes in tokenizer.encode_images(images)]

    fields = {"vocab_sizes": sizes, "image_tokens": int(image.tokens_per_image),
              "columns": "input_ids list<int32>, modality_ids list<int8>, doc_id int64, kind, source, meta (JSON) "
                         "strings"}
    return build_captioned_corpus(records, encode, tokenizer, out, image_size=int(image.image_size),
                                  manifest_fields=fields, **{"name": "codes", **options})
