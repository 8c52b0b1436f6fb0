"""`TextTokenizer`: a SentencePiece (BPE or unigram) text tokenizer whose ids 0..7 are the contract's specials.

Exact round trips: ``decode(encode(s)) == s`` for every string. To get that, training uses the ``identity``
normaliser (no NFKC), no dummy prefix, keeps whitespace runs, and byte fallback (any character outside the
vocabulary becomes its UTF-8 bytes). SentencePiece shows spaces as ``▁`` (U+2581) internally, so a literal ``▁``
in the input is encoded as its three byte tokens to survive decoding.

The media markers (``<image>`` ...) are *control* symbols: the text ``"<image>"`` is encoded as ordinary
characters, never as the marker id, and decoding a marker id yields ``""``.

Train with ``python -m mom.tokenization.text train --recipe tokenizers/recipes/text_small.yaml --out DIR``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mom.tokenization.special import NUM_SPECIAL_TOKENS, SPECIAL_TOKENS
from mom.utils.atomic import atomic_directory

KIND = "sentencepiece-text"
MODEL_FILE = "text.model"
CONFIG_FILE = "config.json"
SPACE_META = "\u2581"  # SentencePiece's visible space


@dataclass
class TextTokenizerRecipe:
    """How to train a text tokenizer (``tokenizers/recipes/*.yaml`` maps onto this one to one).

    ``sources`` are text sources of :mod:`mom.data.text` (``{source: python-docs, max_chars: 2000}``, ...);
    ``max_documents`` caps the documents read per source (``null``: all); ``max_sentences`` is SentencePiece's
    ``input_sentence_size`` (documents sampled for training, 0 = all).
    """

    vocab_size: int = 2048
    model_type: str = "bpe"  # "bpe" | "unigram"
    character_coverage: float = 0.9995  # rarer characters are left to byte fallback
    split_digits: bool = True
    max_sentences: int = 0
    max_documents: int | None = None
    seed: int = 0
    sources: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type: must be 'bpe' or 'unigram', got {self.model_type!r}")
        min_vocab = NUM_SPECIAL_TOKENS + 256 + 1  # specials + 256 byte pieces + at least one learned piece
        if self.vocab_size < min_vocab:
            raise ValueError(f"vocab_size: must be at least {min_vocab} (specials + 256 bytes), got {self.vocab_size}")
        if not 0 < self.character_coverage <= 1:
            raise ValueError(f"character_coverage: must be in (0, 1], got {self.character_coverage}")
        for i, spec in enumerate(self.sources):
            if not isinstance(spec, dict) or not isinstance(spec.get("source"), str):
                raise ValueError(f"sources[{i}]: must be a mapping with a 'source' name, got {spec!r}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TextTokenizerRecipe:
        from mom.utils.configio import from_file

        return from_file(cls, path, list_unknown=True)


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
    def train(cls, texts: Iterable[str], recipe: TextTokenizerRecipe) -> TextTokenizer:
        """Train on ``texts`` (each one a SentencePiece "sentence", i.e. a document) following ``recipe``."""
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


def recipe_texts(recipe: TextTokenizerRecipe, on_error: str = "skip") -> Iterable[str]:
    """The training documents of ``recipe``'s sources, in order (``max_documents`` per source)."""
    from mom.data.text import iter_text_records

    for spec in recipe.sources:
        options = {k: v for k, v in spec.items() if k != "source"}
        for n, record in enumerate(iter_text_records(spec["source"], on_error=on_error, **options)):
            if recipe.max_documents is not None and n >= recipe.max_documents:
                break
            yield record.text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mom.tokenization.text",
        description="Train a SentencePiece text tokenizer whose ids 0..7 are the MoM special tokens.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train on the text sources of a recipe and save to --out")
    train.add_argument("--recipe", required=True, help="YAML recipe, e.g. tokenizers/recipes/text_small.yaml")
    train.add_argument("--out", required=True, help="output directory (config.json + text.model)")
    train.add_argument("--on-error", choices=("skip", "stop"), default="skip", help="unreadable input files")
    encode = sub.add_parser("encode", help="print the pieces of a text (to inspect a trained tokenizer)")
    encode.add_argument("--tokenizer", required=True, help="tokenizer directory")
    encode.add_argument("text", help="text to encode")
    args = parser.parse_args(argv)

    if args.command == "encode":
        tok = TextTokenizer.load(args.tokenizer)
        ids = tok.encode(args.text)
        print(" ".join(f"{tok.id_to_piece(i)}:{i}" for i in ids))
        return 0

    from tqdm import tqdm

    from mom.utils.errors import MissingDependencyError

    recipe = TextTokenizerRecipe.from_yaml(args.recipe)
    start = time.time()
    try:
        texts = list(tqdm(recipe_texts(recipe, args.on_error), desc="reading text", unit="doc"))
    except MissingDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not texts:
        print("error: the recipe's sources yielded no text", file=sys.stderr)
        return 2
    chars = sum(len(t) for t in texts)
    print(f"training {recipe.model_type} vocab {recipe.vocab_size} on {len(texts)} documents ({chars:,} chars) ...")
    tok = TextTokenizer.train(texts, recipe)
    tok.save(args.out)
    sample = texts[: min(len(texts), 2000)]
    n_tokens = sum(len(tok.encode(t)) for t in sample)
    n_chars = sum(len(t) for t in sample)
    print(
        f"saved {args.out} (vocab {tok.vocab_size}) in {time.time() - start:.1f} s; "
        f"{n_chars / max(n_tokens, 1):.2f} chars/token on {len(sample)} training documents"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
