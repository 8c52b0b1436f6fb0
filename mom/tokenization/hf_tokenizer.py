"""The Hugging Face form of a `TextTokenizer`: ``tokenizer.json`` + ``tokenizer_config.json`` that plain
``AutoTokenizer.from_pretrained(dir)`` loads (no ``import mom``), giving the same ids as ``TextTokenizer.encode``.

The SentencePiece BPE model (identity normaliser, no dummy prefix, byte fallback) becomes a `tokenizers`
model over the same pieces and ids. SentencePiece writes a space as ``▁`` inside pieces; here the pieces hold the
space itself, so that a literal ``▁`` in the input is not in the vocabulary and falls back to its three byte tokens,
exactly as `TextTokenizer` encodes it. No normaliser, no pre-tokenizer: the whole string is one word, as in
SentencePiece. The eight special tokens (`mom.tokenization.special`) are special added tokens; like `TextTokenizer`,
the tokenizer never reads them out of text (``split_special_tokens``: the string ``"<image>"`` is seven characters),
and ``tokenizer(text)`` puts ``<s>`` in front, the start of every MoM document (``</s>`` is not appended: add
``tokenizer.eos_token_id`` to a training document yourself).

Decoding (``skip_special_tokens=True``) equals ``TextTokenizer.decode`` except on byte runs that are not valid
UTF-8: SentencePiece keeps the valid bytes of such a run, `tokenizers` turns every byte of it into U+FFFD.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from mom.tokenization.special import BOS_ID, SPECIAL_TOKENS, UNK_ID
from mom.tokenization.text import MODEL_FILE, SPACE_META, TextTokenizer
from mom.utils.atomic import atomic_write_text

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
NAMED_SPECIALS = {"pad": "pad_token", "unk": "unk_token", "bos": "bos_token", "eos": "eos_token"}
# Strings the conversion is checked on before anything is written: whitespace runs, a literal "▁", specials as
# text, digits, accents, CJK, emoji, control characters.
PROBES = ("", " ", "  two  spaces\t\ttabs\n\nlines\r\n", "a\u2581b \u2581\u2581", "<s>x</s> <image> <speech> <pad>",
          "3.14159 and 2048", "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \U0001f916 \u200b", "\x00\x01\x7f")


def _model_proto(text: TextTokenizer):
    """The SentencePiece ``ModelProto`` of ``text`` (read back from its own ``save``)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with tempfile.TemporaryDirectory() as tmp:
        text.save(Path(tmp) / "text")
        proto.ParseFromString((Path(tmp) / "text" / MODEL_FILE).read_bytes())
    return proto


def build_tokenizer(text: TextTokenizer):
    """A `tokenizers.Tokenizer` with the pieces, ids and encoding of ``text`` (a SentencePiece BPE model).

    ``ValueError`` for a unigram model, or if the result disagrees with ``text`` on any of `PROBES`."""
    from sentencepiece import sentencepiece_model_pb2

    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    proto = _model_proto(text)
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    literal = (piece_type.CONTROL, piece_type.UNKNOWN, piece_type.BYTE)  # pieces that never hold a space
    pieces = [p.piece if p.type in literal else p.piece.replace(SPACE_META, " ") for p in proto.pieces]
    if len(set(pieces)) != len(pieces):
        raise ValueError("text model: two pieces differ only in '▁' versus ' ' and cannot be told apart")
    if kind != "BPE":
        # A `tokenizers` Unigram model would match control and byte pieces ("<s>", "<0x3C>") in text whose
        # characters are out of vocabulary, where SentencePiece falls back to bytes: no exact conversion.
        raise ValueError(f"text model: only SentencePiece BPE models convert exactly to Hugging Face, not {kind}")
    normal = [p.type == piece_type.NORMAL for p in proto.pieces]
    merges = _bpe_merges(pieces, [p.score for p in proto.pieces], normal)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[UNK_ID], byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(model)
    tokenizer.add_special_tokens([AddedToken(t.piece, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    bos = SPECIAL_TOKENS[BOS_ID].piece
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, BOS_ID)]
    )
    tokenizer.encode_special_tokens = True
    check_same_ids(tokenizer, text, PROBES)
    return tokenizer


def _bpe_merges(pieces: list[str], scores: list[float], normal: list[bool]) -> list[tuple[str, str]]:
    """Merges that rebuild SentencePiece BPE: every split of a piece into two pieces, ranked by the merged piece's
    score (higher first; SentencePiece merges the best-scoring adjacent pair first), then by the halves' ids."""
    ids = {piece: i for i, piece in enumerate(pieces) if normal[i]}
    ranked = []
    for i, piece in enumerate(pieces):
        if not normal[i]:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def check_same_ids(tokenizer, text: TextTokenizer, samples: Iterable[str]) -> None:
    """``ValueError`` naming the first sample whose ids differ between ``tokenizer`` (`tokenizers`) and ``text``."""
    for sample in samples:
        ours = text.encode(sample)
        theirs = tokenizer.encode(sample, add_special_tokens=False).ids
        if ours != theirs:
            raise ValueError(f"the Hugging Face text tokenizer disagrees with mom's on {sample!r}: {theirs} != {ours}")


def tokenizer_config() -> dict:
    """``tokenizer_config.json``: the class to load with, the special tokens, ``<s>`` added, specials never parsed."""
    named = {NAMED_SPECIALS[t.name]: t.piece for t in SPECIAL_TOKENS if t.name in NAMED_SPECIALS}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "extra_special_tokens": [t.piece for t in SPECIAL_TOKENS if t.name not in NAMED_SPECIALS],
        "add_bos_token": True,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }


def save_hf_tokenizer(text: TextTokenizer, directory: str | os.PathLike) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` of ``text`` into ``directory`` (each file atomically;
    other files are left alone). Returns the paths written."""
    directory = Path(directory)
    tokenizer = build_tokenizer(text)
    written = [directory / TOKENIZER_FILE, directory / TOKENIZER_CONFIG_FILE]
    atomic_write_text(written[0], tokenizer.to_str(pretty=True) + "\n")
    atomic_write_text(written[1], json.dumps(tokenizer_config(), indent=2) + "\n")
    return written
