"""`MoMProcessor`: the Hugging Face processor (``AutoProcessor``) of a MoM checkpoint.

It turns text, PIL images (or uint8 ``(h, w, 3)`` arrays) and audio arrays into one interleaved id sequence of the
unified vocabulary, with the project's tokenizers, and decodes ids back into text, images and waveforms. In the
text, ``<image>`` and ``<speech>`` mark where the next image / audio clip goes (the media markers of
`mom.tokenization.special`), e.g. ``processor(text="a digit <image> said: <speech>", images=[img],
audio=[wave], sampling_rate=16000)``. Text is encoded by the Hugging Face text tokenizer (``tokenizer``, the same
ids as `TextTokenizer`), media by `MultimodalTokenizer` into ``<image> codes </image>`` and ``<speech> units
</speech>`` spans; ``<s>`` starts the sequence (``add_special_tokens``), no ``</s>`` ends it (a prompt).

On disk (an export, or ``tokenizers/small``): ``processor_config.json`` (``processor_class``, the multimodal
tokenizer directory relative to it, the model's modalities) beside ``tokenizer.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin

from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.special import BOS_ID, SPAN_MARKERS, SPECIAL_TOKENS
from mom.utils.atomic import atomic_write_text

PROCESSOR_CONFIG_FILE = "processor_config.json"
MEDIA_DIR = "tokenizer"  # where save_pretrained puts the multimodal tokenizer (as the export does)
INPUT_NAMES = {"image": "image", "speech": "audio"}  # modality -> what __call__ calls its inputs
PLACEHOLDERS = {SPECIAL_TOKENS[SPAN_MARKERS[m][0]].piece: m for m in SPAN_MARKERS}  # "<image>" -> "image", ...


def processor_config(media_dir: str, modalities: Sequence[str]) -> dict:
    """``processor_config.json``: the class, the multimodal tokenizer directory (relative) and the modalities."""
    return {"processor_class": "MoMProcessor", "multimodal_tokenizer": media_dir, "modalities": list(modalities)}


def write_processor_config(directory: str | os.PathLike, media_dir: str, modalities: Sequence[str]) -> Path:
    path = Path(directory) / PROCESSOR_CONFIG_FILE
    atomic_write_text(path, json.dumps(processor_config(media_dir, modalities), indent=2) + "\n")
    return path


class MoMProcessor(ProcessorMixin):
    """Text + images + audio -> unified ids (``__call__``), ids -> text / images / waveforms (``decode_document``).

    Args:
        tokenizer: the Hugging Face text tokenizer (ids equal to `TextTokenizer`'s).
        media: the project's `MultimodalTokenizer` (text, image and speech tokenizers).
        modalities: the model's modalities, a leading part of ``media.modalities`` (default: all of them).
    """

    def __init__(self, tokenizer: Any, media: MultimodalTokenizer, modalities: Sequence[str] | None = None) -> None:
        super().__init__(tokenizer)
        self.media = media
        self.modalities = tuple(modalities or media.modalities)
        if self.modalities != media.modalities[: len(self.modalities)]:
            raise ValueError(f"modalities {list(self.modalities)} must be a leading part of the multimodal "
                             f"tokenizer's {list(media.modalities)}")
        if len(tokenizer) != media.vocab_sizes[0]:
            raise ValueError(f"text tokenizer has {len(tokenizer)} ids, the multimodal tokenizer's text vocabulary "
                             f"{media.vocab_sizes[0]}")

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"]

    @property
    def sampling_rate(self) -> int | None:
        """Sample rate of decoded speech (``None`` without speech)."""
        return self.media.speech_sample_rate if "speech" in self.modalities else None

    # ---- encoding ---------------------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        audio: Any = None,
        sampling_rate: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """``input_ids`` and ``attention_mask`` of one text (one row) or a batch (left-padded with ``<pad>``).

        ``images`` / ``audio`` (one item or a list) fill the ``<image>`` / ``<speech>`` placeholders of the texts in
        order; ``sampling_rate`` is the rate of every audio array (resampled to the speech tokenizer's). Media
        without text is one span each, images first.
        """
        images = _as_list(images)
        audio = _as_list(audio)
        if text is None:
            text = "<image>" * len(images) + "<speech>" * len(audio)
        texts = [text] if isinstance(text, str) else list(text)
        if audio and sampling_rate is None:
            raise ValueError("sampling_rate: required with audio (the rate of the arrays, e.g. 16000)")
        queues = {"image": list(images), "speech": list(audio)}
        rows = [self._encode_one(t, queues, sampling_rate, add_special_tokens) for t in texts]
        left = {m: len(q) for m, q in queues.items() if q}
        if left:
            raise ValueError(f"more media than placeholders in the text: {left} left over (mark each with "
                             f"{', '.join(PLACEHOLDERS)})")
        one = isinstance(text, str) and return_tensors is None  # a plain list for one str, like the tokenizer
        batch = {"input_ids": rows[0] if one else rows}
        return BatchFeature(self.tokenizer.pad(batch, return_tensors=return_tensors, **kwargs))

    def _encode_one(self, text: str, queues: dict[str, list], sampling_rate: int | None, bos: bool) -> list[int]:
        ids = [BOS_ID] if bos else []
        for piece in _split_placeholders(text):
            modality = PLACEHOLDERS.get(piece)
            if modality is None:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                continue
            if modality not in self.modalities:
                raise ValueError(f"{piece} in the text, but the model has no {modality} modality "
                                 f"(modalities: {list(self.modalities)})")
            if not queues[modality]:
                raise ValueError(f"{piece} placeholder without a matching {INPUT_NAMES[modality]} input: pass one "
                                 "per placeholder")
            item = queues[modality].pop(0)
            if modality == "image":
                ids += self.media.image_span(self.media.encode_images([_as_image(item)])[0])
            else:
                waveform = np.asarray(item, dtype=np.float32)
                if waveform.ndim != 1:
                    raise ValueError(f"audio: expected a mono 1-D array, got shape {waveform.shape}")
                ids += self.media.speech_span(self.media.encode_speech(waveform, int(sampling_rate)))
        return ids

    # ---- decoding ---------------------------------------------------------------------------------------------
    def decode_document(self, ids: Sequence[int] | Any) -> list[tuple[str, Any]]:
        """Parts of one document: ``("text", str)``, ``("image", PIL.Image)``, ``("speech", float32 (n,))`` at
        ``sampling_rate``. ``<s>`` / ``</s>`` around it are optional; a malformed span raises ``ValueError``."""
        from PIL import Image

        ids = np.asarray(ids.tolist() if hasattr(ids, "tolist") else ids, dtype=np.int64).reshape(-1)
        parts = []
        for kind, value in self.media.decode_document(ids):
            parts.append((kind, Image.fromarray(value) if kind == "image" else value))
        return parts

    # ---- persistence ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``processor_config.json`` as `save_pretrained` writes it (also what ``repr`` shows)."""
        return processor_config(MEDIA_DIR, self.modalities)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """The text tokenizer, the multimodal tokenizer (in ``tokenizer/``) and ``processor_config.json``."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = list(self.tokenizer.save_pretrained(directory))
        self.media.save(directory / MEDIA_DIR)
        written.append(str(write_processor_config(directory, MEDIA_DIR, self.modalities)))
        return written

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> MoMProcessor:
        """Load from a local directory holding ``processor_config.json`` (an export or ``tokenizers/small``)."""
        directory = Path(pretrained_model_name_or_path)
        config_path = directory / PROCESSOR_CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"MoMProcessor: {config_path} not found (a mom export or tokenizer directory "
                                    "has one)")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        media_dir = config.get("multimodal_tokenizer")
        if not isinstance(media_dir, str):
            raise ValueError(f"{config_path}: 'multimodal_tokenizer' must name the multimodal tokenizer directory")
        kwargs.pop("_from_auto", None)
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        return cls(tokenizer, MultimodalTokenizer.load(directory / media_dir), config.get("modalities"))


def _split_placeholders(text: str) -> list[str]:
    """``text`` cut around every placeholder (placeholders kept as their own pieces, empty pieces dropped)."""
    pieces, start = [], 0
    while True:
        hits = [(text.find(p, start), p) for p in PLACEHOLDERS if text.find(p, start) >= 0]
        if not hits:
            break
        at, placeholder = min(hits)
        pieces += [text[start:at], placeholder]
        start = at + len(placeholder)
    pieces.append(text[start:])
    return [p for p in pieces if p]


def _as_list(items: Any) -> list:
    if items is None:
        return []
    if isinstance(items, (list, tuple)):
        return list(items)
    return [items]


def _as_image(item: Any) -> Any:
    """A PIL image in RGB, from a PIL image or a uint8 (h, w, 3) array (the image tokenizer crops and resizes it)."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    array = np.asarray(item)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images: expected PIL images or uint8 (h, w, 3) arrays, got {array.dtype} {array.shape}")
    return Image.fromarray(array)
