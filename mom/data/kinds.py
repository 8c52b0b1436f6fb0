"""The document kinds of a corpus (its ``kind`` column) and the modalities a document of each kind may contain.

The one list of kinds: `mom-data build` draws documents of these kinds, mixture weights of the loader are keyed by
them, and `mom-train` checks that a model leaving out a corpus modality gives weight 0 to every kind that may hold it.
"""

from __future__ import annotations

from collections.abc import Iterable

ANY_MODALITY = None  # a kind whose documents may interleave every modality of the corpus

# kind -> modalities its documents may contain (text always: <s>, </s> and captions / transcripts are text tokens)
KIND_MODALITIES: dict[str, frozenset[str] | None] = {
    "text": frozenset({"text"}),
    "image_caption": frozenset({"text", "image"}),  # <s> <image> codes </image> caption </s>
    "caption_image": frozenset({"text", "image"}),
    "speech_transcript": frozenset({"text", "speech"}),  # <s> <speech> units </speech> transcript </s>
    "transcript_speech": frozenset({"text", "speech"}),
    "mixed": ANY_MODALITY,  # spans of text, captioned images and transcribed speech
}
KINDS = tuple(KIND_MODALITIES)


def kinds_that_may_hold(modalities: Iterable[str]) -> list[str]:
    """The kinds whose documents may contain a token of any of ``modalities``, in `KINDS` order."""
    wanted = set(modalities)
    return [kind for kind, held in KIND_MODALITIES.items() if held is ANY_MODALITY or held & wanted]
