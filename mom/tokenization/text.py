"""`TextTokenizer`: a SentencePiece (BPE or unigram) text tokenizer whose ids 0..7 are the contract's specials.

Exact round trips: ``decode(encode(s)) == s`` for every string. To get that, training uses the ``identity``
normaliser (no NFKC), no dummy prefix, keeps whitespace runs, and byte fallback (any character outside the
vocabulary becomes its UTF-8 bytes). SentencePiece shows spaces as ``▁`` (U+2581) internally, so a literal ``▁``
in the input is encoded as its three byte tokens to survive decoding.

The media markers (``<image>`` ...) are *control* symbols: the text ``"<image>"`` is encoded as ordinary
characters, never as the marker id, and decoding a marker id yields ``""``.

Train with ``mom-tokenizer text train --recipe tokenizers/recipes/text_small.yaml --out DIR``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mom.tokenization.special import NUM_SPECIAL_TOKENS, SPECIAL_TOKENS
from mom.utils.atomic import atomic_directory

KIND = "sentencepiece-text"
MODEL_FILE = "text.model"
CONFIG_FILE = "config.json"
SPACE_META = "\u2581"  # SentencePiece's visible space


@dataclass
class TextTrainingConfig:
    """SentencePiece training settings (the corpus-side recipe, :class:`mom.data.tokenizer_training.
    TextTokenizerRecipe`, adds the sources). ``max_sentences`` is SentencePiece's ``input_sentence_size`` (documents
    sampled for training, 0 = all)."""

    vocab_size: int = 2048
    model_type: str = "bpe"  # "bpe" | "unigram"
    character_coverage: float = 0.9995  # rarer characters are left to byte fallback
    split_digits: bool = True
    max_sentences: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type: must be 'bpe' or 'unigram', got {self.model_type!r}")
        min_vocab = NUM_SPECIAL_TOKENS + 256 + 1  # specials + 256 byte pieces + at least one learned piece
        if self.vocab_size < min_vocab:
            raise ValueError(f"vocab_size: must be at least {min_vocab} (specials + 256 bytes), got {self.vocab_size}")
        if not 0 < self.character_coverage <= 1:
            raise ValueError(f"character_coverage: must be in (0, 1], got {self.character_coverage}")


class TextTokenizer:
    """SentencePiece text tokenizer: ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``save``/``load``."""

    def __init__(self, model_proto: bytes, recipe: dict | None = None) -> None:
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.recipe = recipe or {}
        for token in SPECIAL_TOKENS:
            piece = self._sp.id_to_piece(token.id) if token.id < self._sp.vocab_size() else None
            if piece != token.piece:
                raise ValueError(f"text model: id {token.id} must be {token.piece!r} (special token), found {piece!r}")
        self._space_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_META.encode("utf-8")]
        if self._sp.unk_id() in self._space_bytes:
            raise ValueError("text model: trained without byte_fallback (byte pieces <0x..> are missing)")

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if SPACE_META not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_META)):
            if i:
                ids.extend(self._space_bytes)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids decode to ``""``; an id outside the vocabulary raises ``ValueError``."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"text token id {i} is out of range for the text vocabulary of size {self.vocab_size}")
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    # ---- persistence ---------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` + ``text.model`` into ``directory`` (built in a temp dir, then renamed into place)."""
        with atomic_directory(directory) as tmp:
            (tmp / MODEL_FILE).write_bytes(self._proto)
            config = {"kind": KIND, "model_file": MODEL_FILE, "vocab_size": self.vocab_size, "recipe": self.recipe}
            config["special_tokens"] = {t.piece: t.id for t in SPECIAL_TOKENS}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TextTokenizer:
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"text tokenizer: {config_path} not found")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("kind") != KIND:
            raise ValueError(f"{config_path}: kind is {config.get('kind')!r}, expected {KIND!r}")
        model_path = directory / config.get("model_file", MODEL_FILE)
        if not model_path.is_file():
            raise FileNotFoundError(f"text tokenizer: model file {model_path} not found")
        tokenizer = cls(model_path.read_bytes(), recipe=config.get("recipe"))
        if config.get("vocab_size") not in (None, tokenizer.vocab_size):
            raise ValueError(
                f"{config_path}: vocab_size {config['vocab_size']} != {tokenizer.vocab_size} in {model_path}"
            )
        return tokenizer

    # ---- training ------------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], recipe: TextTrainingConfig) -> TextTokenizer:
        """Train on ``texts`` (each one a SentencePiece "sentence", i.e. a document) following ``recipe``; the saved
        config records ``asdict(recipe)``."""
        import sentencepiece as spm

        spm.set_random_generator_seed(recipe.seed)
        model = io.BytesIO()
        n_threads = max(1, min(os.cpu_count() or 1, 8))
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(t for t in texts if t),
            model_writer=model,
            vocab_size=recipe.vocab_size,
            model_type=recipe.model_type,
            character_coverage=recipe.character_coverage,
            split_digits=recipe.split_digits,
            input_sentence_size=recipe.max_sentences,
            shuffle_input_sentence=True,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,  # fmt: skip
            control_symbols=[t.piece for t in SPECIAL_TOKENS[4:]],  # media markers -> ids 4..7
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 20,  # bytes; documents are the sentences
            hard_vocab_limit=True,
            num_threads=n_threads,
            minloglevel=2,
        )
        return cls(model.getvalue(), recipe=asdict(recipe))
