"""`MultimodalTokenizer`: text, image and speech tokenizers combined into the unified MoM vocabulary.

Layout (shared contract): text ids ``[0, V_text)`` as they are (ids 0..7 are the specials), image code ``c`` is
``V_text + c``, speech unit ``u`` is ``V_text + V_image + u`` (modalities in the order text, image, speech; a
missing modality takes no room). A document is ``<s> part part ... </s>`` where a part is text ids, an image span
``<image> codes </image>`` or a speech span ``<speech> units </speech>``.

Saved as one directory: ``config.json`` (``"kind": "multimodal"``, modalities, vocab sizes and the sub-directory
of each tokenizer, relative to the directory) plus the three tokenizer directories, e.g. ``tokenizers/small/``
with ``text/``, ``image/``, ``speech/``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mom.tokenization.special import BOI_ID, BOS_ID, BOSP_ID, EOI_ID, EOS_ID, EOSP_ID, PAD_ID, SPECIAL_TOKENS
from mom.tokenization.text import TextTokenizer
from mom.utils.atomic import atomic_write_text

KIND = "multimodal"
CONFIG_FILE = "config.json"
MODALITY_ORDER = ("text", "image", "speech")
# Class that loads each modality's tokenizer directory ("module:Class" with a ``load(dir)`` classmethod).
TOKENIZER_CLASSES = {
    "text": "mom.tokenization.text:TextTokenizer",
    "image": "mom.tokenization.image:ImageTokenizer",
    "speech": "mom.tokenization.speech:SpeechTokenizer",
}
Part = tuple[str, Any]  # ("text", str) | ("image", PIL image or uint8 (h, w, 3)) | ("speech", (waveform, sample_rate))


def _load_class(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


class MultimodalTokenizer:
    """Encode documents of text, images and speech into unified ids and decode them back.

    Args:
        text: the text tokenizer (its ids 0..7 are the special tokens).
        image: image tokenizer (``encode(list[PIL]) -> (n, tokens_per_image)``, ``decode``, ``vocab_size``) or None.
        speech: speech tokenizer (``encode(waveform, sample_rate) -> (t,)``, ``decode``, ``vocab_size``) or None.
    """

    def __init__(self, text: TextTokenizer, image: Any = None, speech: Any = None) -> None:
        self.tokenizers = {m: t for m, t in zip(MODALITY_ORDER, (text, image, speech)) if t is not None}
        self.sources: dict[str, Path] = {}  # modality -> directory it was loaded from (for save)
        self.modalities: tuple[str, ...] = tuple(self.tokenizers)
        self.vocab_sizes: tuple[int, ...] = tuple(int(t.vocab_size) for t in self.tokenizers.values())
        offsets = np.cumsum((0,) + self.vocab_sizes[:-1])
        self.offsets: dict[str, int] = {m: int(o) for m, o in zip(self.modalities, offsets)}
        self.vocab_size = int(sum(self.vocab_sizes))
        self._bounds = np.asarray(offsets[1:], dtype=np.int64)  # first id of each modality after text

    @property
    def text(self) -> TextTokenizer:
        return self.tokenizers["text"]

    @property
    def image(self) -> Any:
        return self._get("image")

    @property
    def speech(self) -> Any:
        return self._get("speech")

    def _get(self, modality: str) -> Any:
        if modality not in self.tokenizers:
            raise ValueError(f"this tokenizer has no {modality!r} modality (modalities: {list(self.modalities)})")
        return self.tokenizers[modality]

    @property
    def speech_sample_rate(self) -> int | None:
        """Sample rate of decoded speech (``None`` without a speech tokenizer)."""
        if "speech" not in self.tokenizers:
            return None
        tok = self.tokenizers["speech"]
        rate = getattr(tok, "sample_rate", None) or getattr(getattr(tok, "config", None), "sample_rate", None)
        return int(rate) if rate else None

    def for_model(self, modalities: Sequence[str], vocab_sizes: Sequence[int]) -> MultimodalTokenizer:
        """This tokenizer cut to a model's ``modalities``, which must lead its own with the same ``vocab_sizes`` (the
        unified ids agree only then): a text + image model trained on a corpus that a text + image + speech
        tokenizer built gets the text + image part. ``ValueError`` naming both otherwise."""
        n, sizes = len(modalities), tuple(int(v) for v in vocab_sizes)
        if tuple(modalities) != self.modalities[:n] or sizes != self.vocab_sizes[:n]:
            raise ValueError(f"the tokenizer's modalities / vocab sizes {list(self.modalities)} / "
                             f"{list(self.vocab_sizes)} do not start with the model's {list(modalities)} / "
                             f"{list(sizes)}")
        if n == len(self.modalities):
            return self
        cut = MultimodalTokenizer(**{m: self.tokenizers[m] for m in self.modalities[:n]})
        cut.sources = {m: path for m, path in self.sources.items() if m in cut.tokenizers}
        return cut

    def to_config_kwargs(self) -> dict:
        """Keyword arguments for ``MoMConfig``: modalities, vocab sizes and the bos/eos/pad ids."""
        return {
            "modalities": self.modalities,
            "vocab_sizes": self.vocab_sizes,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
        }

    # ---- ids --------------------------------------------------------------------------------------------------
    def check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return ``ids`` as int64 array; ``ValueError`` naming the first id outside ``[0, vocab_size)``."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"token id {int(arr[bad][0])} is out of range for the unified vocabulary of size {self.vocab_size}"
            )
        return arr

    def modality_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Modality index (int8) of each unified id (same rule as ``MoMConfig.modality_of``)."""
        return np.searchsorted(self._bounds, self.check_ids(ids), side="right").astype(np.int8)

    # ---- encoding ---------------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self.text.encode(text)

    def image_span(self, codes: Sequence[int] | np.ndarray) -> list[int]:
        """``<image> codes </image>`` with modality-local ``codes`` shifted into the unified range."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1)
        self._check_local(codes, "image")
        return [BOI_ID, *(codes + self.offsets["image"]).tolist(), EOI_ID]

    def speech_span(self, units: Sequence[int] | np.ndarray) -> list[int]:
        """``<speech> units </speech>`` with modality-local ``units`` shifted into the unified range."""
        units = np.asarray(units, dtype=np.int64).reshape(-1)
        self._check_local(units, "speech")
        return [BOSP_ID, *(units + self.offsets["speech"]).tolist(), EOSP_ID]

    def _check_local(self, codes: np.ndarray, modality: str) -> None:
        size = self.vocab_sizes[self.modalities.index(modality)] if modality in self.modalities else 0
        bad = (codes < 0) | (codes >= size)
        if bad.any():
            raise ValueError(f"{modality} code {int(codes[bad][0])} is out of range for its vocabulary of size {size}")

    def encode_images(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Modality-local codes ``(tokens_per_image,)`` of each image (PIL images or uint8 ``(h, w, 3)`` arrays, or one
        uint8 ``(n, h, w, 3)`` array)."""
        if len(images) == 0:
            return []
        items = images if isinstance(images, np.ndarray) else list(images)  # a uint8 (n, h, w, 3) batch as it is
        if isinstance(items, list) and all(isinstance(i, np.ndarray) for i in items):
            items = np.stack(items)  # arrays go to the image tokenizer as one uint8 batch
        codes = _to_numpy(self.image.encode(items))  # (n, tokens_per_image)
        return [row.astype(np.int64) for row in codes]

    def encode_speech(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Modality-local units ``(t,)`` of one waveform."""
        return _to_numpy(self.speech.encode(waveform, sample_rate)).astype(np.int64).reshape(-1)

    def encode_document(self, parts: Iterable[Part]) -> list[int]:
        """``<s> ... </s>`` ids of a document given as ``("text", str)``, ``("image", image)``,
        ``("speech", (waveform, sample_rate))`` parts, in order."""
        ids = [BOS_ID]
        for kind, value in parts:
            if kind == "text":
                ids += self.encode_text(value)
            elif kind == "image":
                ids += self.image_span(self.encode_images([value])[0])
            elif kind == "speech":
                waveform, sample_rate = value
                ids += self.speech_span(self.encode_speech(waveform, sample_rate))
            else:
                raise ValueError(f"document part kind must be 'text', 'image' or 'speech', got {kind!r}")
        return ids + [EOS_ID]

    # ---- decoding ---------------------------------------------------------------------------------------------
    def split_document(self, ids: Sequence[int] | np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Parse a document's unified ids into ``(modality, ids)`` parts with media ids made modality-local.

        Leading ``<s>`` and trailing ``</s>`` are optional; a malformed span raises ``ValueError`` naming the
        offending id and its position.
        """
        arr = self.check_ids(ids)
        modality = self.modality_of(arr)
        start, end = 0, len(arr)
        if end and arr[0] == BOS_ID:
            start = 1
        if end > start and arr[end - 1] == EOS_ID:
            end -= 1
        begin_of = {BOI_ID: ("image", EOI_ID), BOSP_ID: ("speech", EOSP_ID)}
        parts: list[tuple[str, np.ndarray]] = []
        text: list[int] = []
        i = start
        while i < end:
            token = int(arr[i])
            if token in begin_of:
                name, closing = begin_of[token]
                if name not in self.modalities:
                    raise ValueError(
                        f"token id {token} at position {i} opens a {name} span but there is no {name} tokenizer"
                    )
                index = self.modalities.index(name)
                j = i + 1
                while j < end and modality[j] == index:
                    j += 1
                if j >= end or arr[j] != closing:
                    found = "the end of the document" if j >= end else f"token id {int(arr[j])}"
                    raise ValueError(f"{name} span opened at position {i} is closed by {found} at position {j}")
                if text:
                    parts.append(("text", np.asarray(text, dtype=np.int64)))
                    text = []
                parts.append((name, arr[i + 1 : j] - self.offsets[name]))
                i = j + 1
                continue
            if modality[i] != 0:
                name = self.modalities[modality[i]]
                raise ValueError(f"{name} token id {token} at position {i} is outside a {name} span")
            if token in (BOS_ID, EOS_ID, PAD_ID, EOI_ID, EOSP_ID):
                raise ValueError(f"unexpected special token id {token} ({SPECIAL_TOKENS[token].piece}) at position {i}")
            text.append(token)
            i += 1
        if text:
            parts.append(("text", np.asarray(text, dtype=np.int64)))
        return parts

    def decode_document(self, ids: Sequence[int] | np.ndarray) -> list[Part]:
        """Parts of a document: ``("text", str)``, ``("image", uint8 (h, w, 3))``, ``("speech", float32 (n,))``.

        Speech is rendered at the speech tokenizer's ``sample_rate`` (see ``speech_sample_rate``).
        """
        out: list[Part] = []
        for name, local in self.split_document(ids):
            if name == "text":
                out.append(("text", self.text.decode(local.tolist())))
            elif name == "image":
                n = getattr(self.image, "tokens_per_image", len(local))
                if len(local) != n:
                    raise ValueError(f"image span has {len(local)} codes, the image tokenizer expects {n}")
                pixels = _to_numpy(self.image.decode(_as_long(local[None, :])))  # (1, h, w, 3)
                out.append(("image", np.asarray(pixels[0], dtype=np.uint8)))
            else:
                waveform = self.speech.decode(_as_long(local))
                if isinstance(waveform, tuple):  # (waveform, sample_rate)
                    waveform = waveform[0]
                waveform = _to_numpy(waveform)
                out.append(("speech", np.asarray(waveform, dtype=np.float32).reshape(-1)))
        return out

    # ---- persistence ------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write the trio into ``directory``: one sub-directory per modality plus ``config.json`` (written last).

        A sub-tokenizer loaded from ``directory/<modality>`` is left in place; others are saved (``save``) or
        copied from the directory they were loaded from.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for modality, tokenizer in self.tokenizers.items():
            target = directory / modality
            source = self.sources.get(modality)
            if source is not None and source.resolve() == target.resolve():
                continue
            if hasattr(tokenizer, "save"):
                tokenizer.save(target)
            elif source is not None:
                shutil.copytree(source, target, dirs_exist_ok=True)
            else:
                raise ValueError(f"cannot save the {modality} tokenizer: it has no save() and no source directory")
        write_config(directory, {m: m for m in self.modalities}, self.vocab_sizes)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> MultimodalTokenizer:
        """Load from a directory holding a multimodal ``config.json`` (sub-directories relative to it)."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"multimodal tokenizer: {config_path} not found")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("kind") != KIND:
            raise ValueError(f"{config_path}: kind is {config.get('kind')!r}, expected {KIND!r}")
        subdirs = config.get("tokenizers")
        if not isinstance(subdirs, dict) or "text" not in subdirs:
            raise ValueError(f"{config_path}: 'tokenizers' must map modality -> directory and include 'text'")
        unknown = sorted(set(subdirs) - set(MODALITY_ORDER))
        if unknown:
            raise ValueError(f"{config_path}: unknown modalities {unknown}; valid ones are {list(MODALITY_ORDER)}")
        loaded, sources = {}, {}
        for modality, sub in subdirs.items():
            path = (directory / sub) if not os.path.isabs(sub) else Path(sub)
            if not path.is_dir():
                raise FileNotFoundError(f"{config_path}: {modality} tokenizer directory {path} not found")
            loaded[modality] = TOKENIZER_LOADERS[modality](path)
            sources[modality] = path
        tokenizer = cls(**loaded)
        tokenizer.sources = sources
        expected = config.get("vocab_sizes")
        if expected is not None and list(expected) != list(tokenizer.vocab_sizes):
            raise ValueError(
                f"{config_path}: vocab_sizes {expected} != the loaded tokenizers' {list(tokenizer.vocab_sizes)}"
            )
        return tokenizer


def _default_loader(modality: str) -> Callable[[Path], Any]:
    return lambda path: _load_class(TOKENIZER_CLASSES[modality]).load(path)


# modality -> function loading that modality's tokenizer from a directory (tests may substitute stand-ins).
TOKENIZER_LOADERS: dict[str, Callable[[Path], Any]] = {m: _default_loader(m) for m in MODALITY_ORDER}


def write_config(directory: str | os.PathLike, subdirs: dict[str, str], vocab_sizes: Sequence[int] | None) -> None:
    """Write the multimodal ``config.json`` of ``directory`` (atomically) pointing at ``subdirs`` (modality -> path)."""
    directory = Path(directory)
    modalities = [m for m in MODALITY_ORDER if m in subdirs]
    config = {"kind": KIND, "modalities": modalities, "tokenizers": {m: subdirs[m] for m in modalities}}
    if vocab_sizes is not None:
        config["vocab_sizes"] = [int(v) for v in vocab_sizes]
    config["special_tokens"] = {t.piece: t.id for t in SPECIAL_TOKENS}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_long(x: np.ndarray) -> Any:
    import torch

    return torch.as_tensor(np.asarray(x, dtype=np.int64))
