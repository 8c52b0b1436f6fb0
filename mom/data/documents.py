"""Document assembly: encoded source items -> train/validation documents of each kind -> unified token ids.

An :class:`Item` is one encoded source record: a text document, or an image / speech clip with its modality-local
codes and its caption / transcript. Items are assigned to a split by a hash of their *group* (the source image for
all augmented variants of it, the transcript for all voices reading it, the file section of a text), so no source
item is in both splits. Documents are then drawn per split from that split's items, each item used at most once:

* ``text``: ``<s> text </s>``
* ``image_caption`` / ``caption_image``: ``<s> <image> codes </image> caption </s>`` or caption first
* ``speech_transcript`` / ``transcript_speech``: the same with ``<speech> units </speech>``
* ``mixed``: ``<s>`` then several spans (text passages, captioned images, transcribed speech) ``</s>``
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mom.data.text import chunk_text
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.special import BOS_ID, EOS_ID

SPLITS = ("train", "validation")


@dataclass
class Item:
    """One encoded source record. ``codes``: modality-local image codes / speech units (empty for text);
    ``text``: the text itself, or the caption / transcript."""

    modality: str
    source: str
    meta: dict
    text: str
    codes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))

    @property
    def group(self) -> str:
        """Key shared by items that must stay in one split."""
        if self.modality == "image":
            return f"image:{self.source}:{self.meta.get('id', json.dumps(self.meta, sort_keys=True))}"
        if self.modality == "speech":
            return "speech:" + " ".join(self.text.lower().split())
        meta = {k: v for k, v in self.meta.items() if k != "part"}
        return f"text:{self.source}:{json.dumps(meta, sort_keys=True, default=str)}"


@dataclass
class DocumentPlan:
    """Counts of documents to draw. ``None`` for ``text``/``image``/``speech``: every item left over."""

    text: int | None = None
    image: int | None = None
    caption_first: float = 0.5  # fraction of image documents of kind caption_image
    speech: int | None = None
    transcript_first: float = 0.5  # fraction of speech documents of kind transcript_speech
    mixed: int = 0
    mixed_spans: tuple[int, int] = (3, 5)  # (min, max) spans per mixed document
    mixed_text_chars: int = 600  # a text span of a mixed document is the record's first chunk of at most this


@dataclass
class Document:
    kind: str
    parts: list[tuple[str, Item]]  # ("text" | "image" | "speech" | "caption" | "transcript", item) in order

    @property
    def source(self) -> str:
        return "+".join(sorted({item.source for _, item in self.parts}))

    def meta(self) -> str:
        items = list(dict.fromkeys(id(item) for _, item in self.parts))
        by_id = {id(item): item for _, item in self.parts}
        if len(items) == 1:
            return json.dumps(by_id[items[0]].meta, sort_keys=True, ensure_ascii=False, default=str)
        metas = [{"modality": by_id[i].modality, "source": by_id[i].source, **by_id[i].meta} for i in items]
        return json.dumps({"parts": metas}, sort_keys=True, ensure_ascii=False, default=str)


def split_of(item: Item, validation_fraction: float, seed: int) -> str:
    """``"validation"`` for a stable ``validation_fraction`` of groups (hash of seed and group), else ``"train"``."""
    digest = hashlib.sha1(f"{seed}:{item.group}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction else "train"


def plan_documents(
    items: dict[str, list[Item]], plan: DocumentPlan, validation_fraction: float, seed: int
) -> dict[str, list[Document]]:
    """Draw the documents of each split from ``items`` (modality -> items); deterministic given ``seed``."""
    pools: dict[str, dict[str, list[Item]]] = {s: {m: [] for m in items} for s in SPLITS}
    for modality, modality_items in items.items():
        for item in modality_items:
            pools[split_of(item, validation_fraction, seed)][modality].append(item)
    documents = {}
    for split in SPLITS:
        rng = random.Random(f"{seed}:{split}")
        pool = {m: rng.sample(v, len(v)) for m, v in pools[split].items()}  # shuffled copies, consumed from the end
        share = (
            (lambda n: n - round(n * validation_fraction))
            if split == "train"
            else (lambda n: round(n * validation_fraction))
        )
        docs = _mixed(pool, share(plan.mixed), plan, rng, split)
        for modality, count, first_fraction, kinds in (
            ("image", plan.image, plan.caption_first, ("image_caption", "caption_image")),
            ("speech", plan.speech, plan.transcript_first, ("speech_transcript", "transcript_speech")),
        ):
            available = pool.get(modality, [])
            n = len(available) if count is None else share(count)
            _check_enough(modality, n, len(available), split)
            for _ in range(n):
                item = available.pop()
                label = "caption" if modality == "image" else "transcript"
                if rng.random() < first_fraction:
                    docs.append(Document(kinds[1], [(label, item), (modality, item)]))
                else:
                    docs.append(Document(kinds[0], [(modality, item), (label, item)]))
        available = pool.get("text", [])
        n = len(available) if plan.text is None else share(plan.text)
        _check_enough("text", n, len(available), split)
        docs += [Document("text", [("text", available.pop())]) for _ in range(n)]
        rng.shuffle(docs)
        documents[split] = docs
    return documents


def _check_enough(modality: str, wanted: int, available: int, split: str) -> None:
    if wanted > available:
        raise ValueError(
            f"documents: {wanted} {modality} documents wanted in split {split!r} but only {available} {modality} "
            f"records are left there (after mixed documents); lower the count or add sources"
        )


def _mixed(pool: dict[str, list[Item]], count: int, plan: DocumentPlan, rng: random.Random, split: str) -> list:
    docs = []
    low, high = plan.mixed_spans
    for index in range(count):
        n_spans = rng.randint(low, high)
        spans = [rng.choice(sorted(pool)) for _ in range(n_spans)]
        if len(set(spans)) == 1 and len(pool) > 1:  # interleave at least two modalities
            spans[rng.randrange(n_spans)] = rng.choice([m for m in sorted(pool) if m != spans[0]])
        needed = {m: spans.count(m) for m in set(spans)}
        short = [m for m, k in needed.items() if len(pool[m]) < k]
        if short:
            raise ValueError(
                f"documents.mixed: ran out of {short} records in split {split!r} after {index} mixed documents; "
                f"lower documents.mixed or add sources"
            )
        parts: list[tuple[str, Item]] = []
        for modality in spans:
            item = pool[modality].pop()
            label = {"image": "caption", "speech": "transcript"}.get(modality)
            if label is None:
                parts.append(("text", item))
            elif rng.random() < 0.5:
                parts += [(label, item), (modality, item)]
            else:
                parts += [(modality, item), (label, item)]
        docs.append(Document("mixed", parts))
    return docs


def document_ids(doc: Document, tokenizer: MultimodalTokenizer, plan: DocumentPlan) -> list[int]:
    """Unified ids ``<s> ... </s>`` of ``doc``; adjacent text pieces of a mixed document are joined by a blank line."""
    pieces: list[tuple[str, object]] = []  # ("text", str) | ("image", codes) | ("speech", units)
    for role, item in doc.parts:
        if role in ("image", "speech"):
            pieces.append((role, item.codes))
            continue
        text = item.text
        if doc.kind == "mixed" and role == "text":
            text = chunk_text(text, plan.mixed_text_chars)[0]
        if pieces and pieces[-1][0] == "text":
            pieces[-1] = ("text", pieces[-1][1] + "\n\n" + text)
        else:
            pieces.append(("text", text))
    ids = [BOS_ID]
    for role, value in pieces:
        if role == "text":
            ids += tokenizer.encode_text(value)
        elif role == "image":
            ids += tokenizer.image_span(value)
        else:
            ids += tokenizer.speech_span(value)
    ids.append(EOS_ID)
    return ids


def count_tokens(modality_ids: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    """Tokens per modality name of one document's ``modality_ids`` column."""
    counts = np.bincount(modality_ids.astype(np.int64), minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts)}
