"""The fixed special tokens at the start of the text vocabulary (shared contract, never renumber).

Ids 0..7 of the text range (and so of the unified vocabulary) are reserved:

====  ============  ==============  ==========================================
 id   name          piece           meaning
====  ============  ==============  ==========================================
  0   pad           ``<pad>``       padding (never inside a document)
  1   unk           ``<unk>``       unknown (unused: text byte-falls back)
  2   bos           ``<s>``         begin of document
  3   eos           ``</s>``        end of document
  4   boi           ``<image>``     begin of an image span
  5   eoi           ``</image>``    end of an image span
  6   bos_speech    ``<speech>``    begin of a speech span
  7   eos_speech    ``</speech>``   end of a speech span
====  ============  ==============  ==========================================
"""

from __future__ import annotations

from typing import NamedTuple


class SpecialToken(NamedTuple):
    """One reserved token: ``name`` (identifier), ``id`` (text / unified id) and SentencePiece ``piece``."""

    name: str
    id: int
    piece: str


PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
BOI_ID, EOI_ID = 4, 5  # begin / end of an image span
BOSP_ID, EOSP_ID = 6, 7  # begin / end of a speech span

SPECIAL_TOKENS: tuple[SpecialToken, ...] = (
    SpecialToken("pad", PAD_ID, "<pad>"),
    SpecialToken("unk", UNK_ID, "<unk>"),
    SpecialToken("bos", BOS_ID, "<s>"),
    SpecialToken("eos", EOS_ID, "</s>"),
    SpecialToken("boi", BOI_ID, "<image>"),
    SpecialToken("eoi", EOI_ID, "</image>"),
    SpecialToken("bos_speech", BOSP_ID, "<speech>"),
    SpecialToken("eos_speech", EOSP_ID, "</speech>"),
)
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)

# Media span markers: modality name -> (begin id, end id).
SPAN_MARKERS: dict[str, tuple[int, int]] = {"image": (BOI_ID, EOI_ID), "speech": (BOSP_ID, EOSP_ID)}

assert [t.id for t in SPECIAL_TOKENS] == list(range(NUM_SPECIAL_TOKENS)), "special ids must be 0..7 in order"
