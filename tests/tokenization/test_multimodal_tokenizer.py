"""MultimodalTokenizer: unified id layout, documents with media spans, decoding, persistence.

The layout tests use tiny in-test image/speech tokenizers (exact, invertible toy codecs) so that every id can be
checked by hand; the last tests use the committed small tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mom import MoMConfig
from mom.tokenization import multimodal
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.special import BOI_ID, BOS_ID, BOSP_ID, EOI_ID, EOS_ID, EOSP_ID
from mom.tokenization.text import TextTokenizer

ROOT = Path(__file__).resolve().parents[2]
SMALL = ROOT / "tokenizers" / "small"


class ToyImage:
    """2x2 image, one code per pixel: the grey level // 32 (8 codes); decode paints the level back."""

    vocab_size, tokens_per_image = 8, 4

    def encode(self, images):
        arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (n, 2, 2, 3)
        return torch.as_tensor(arr[..., 0].reshape(len(arr), 4) // 32, dtype=torch.long)

    def decode(self, codes):
        grey = (np.asarray(codes).reshape(-1, 2, 2) * 32).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)

    def save(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps({"kind": "toy-image"}))


class ToySpeech:
    """One unit per 100 samples: the rounded mean amplitude * 4 (5 units); decode holds each level."""

    vocab_size = 5

    def encode(self, waveform, sample_rate):
        frames = np.asarray(waveform)[: len(waveform) // 100 * 100].reshape(-1, 100)
        return torch.as_tensor(np.rint(frames.mean(1) * 4).astype(np.int64))

    def decode(self, units):
        return np.repeat(np.asarray(units, dtype=np.float32) / 4, 100)

    def save(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps({"kind": "toy-speech"}))


@pytest.fixture(scope="module")
def text() -> TextTokenizer:
    return TextTokenizer.load(SMALL / "text")


@pytest.fixture()
def toy(text: TextTokenizer) -> MultimodalTokenizer:
    return MultimodalTokenizer(text, ToyImage(), ToySpeech())


def _image(levels: list[int]) -> np.ndarray:
    return np.repeat(np.asarray(levels, dtype=np.uint8).reshape(2, 2, 1) * 32, 3, axis=-1)


def test_layout_matches_config(toy: MultimodalTokenizer, text: TextTokenizer) -> None:
    v = text.vocab_size
    assert toy.modalities == ("text", "image", "speech")
    assert toy.vocab_sizes == (v, 8, 5)
    assert toy.offsets == {"text": 0, "image": v, "speech": v + 8}
    config = MoMConfig(**toy.to_config_kwargs())
    assert config.vocab_size == toy.vocab_size == v + 13
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (BOS_ID, EOS_ID, 0)
    ids = np.arange(toy.vocab_size)
    assert np.array_equal(toy.modality_of(ids), config.modality_of(torch.as_tensor(ids)).numpy())


def test_document_round_trip(toy: MultimodalTokenizer, text: TextTokenizer) -> None:
    v = text.vocab_size
    wave = np.repeat(np.array([0.0, 0.25, 1.0], dtype=np.float32), 100)
    parts = [
        ("text", "A cat:\n"),
        ("image", _image([0, 1, 6, 7])),
        ("text", " — said ünïcode"),
        ("speech", (wave, 16000)),
    ]
    ids = toy.encode_document(parts)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    start = ids.index(BOI_ID)
    assert ids[start : start + 6] == [BOI_ID, v + 0, v + 1, v + 6, v + 7, EOI_ID]
    start = ids.index(BOSP_ID)
    assert ids[start : start + 5] == [BOSP_ID, v + 8 + 0, v + 8 + 1, v + 8 + 4, EOSP_ID]
    decoded = toy.decode_document(ids)
    assert [k for k, _ in decoded] == ["text", "image", "text", "speech"]
    assert decoded[0][1] == "A cat:\n" and decoded[2][1] == " — said ünïcode"
    assert np.array_equal(decoded[1][1], _image([0, 1, 6, 7]))
    assert np.allclose(decoded[3][1], wave)
    split = toy.split_document(ids)
    assert split[1][1].tolist() == [0, 1, 6, 7] and split[3][1].tolist() == [0, 1, 4]


def test_bad_ids_and_spans_are_named(toy: MultimodalTokenizer) -> None:
    v = toy.vocab_sizes[0]
    with pytest.raises(ValueError, match=str(toy.vocab_size)):
        toy.decode_document([BOS_ID, toy.vocab_size, EOS_ID])
    with pytest.raises(ValueError, match="-3"):
        toy.modality_of([5, -3])
    with pytest.raises(ValueError, match=f"{v + 1}.*position 2"):
        toy.decode_document([BOS_ID, 100, v + 1, EOS_ID])  # image code outside a span
    with pytest.raises(ValueError, match="image span opened at position 1"):
        toy.decode_document([BOS_ID, BOI_ID, v, v, v, v, EOSP_ID, EOS_ID])
    with pytest.raises(ValueError, match="2 codes"):
        toy.decode_document([BOS_ID, BOI_ID, v, v, EOI_ID, EOS_ID])
    with pytest.raises(ValueError, match="image code 8"):
        toy.image_span([0, 8, 1, 1])


def test_save_load_round_trip(toy: MultimodalTokenizer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(multimodal.TOKENIZER_LOADERS, "image", lambda path: ToyImage())
    monkeypatch.setitem(multimodal.TOKENIZER_LOADERS, "speech", lambda path: ToySpeech())
    toy.save(tmp_path / "mm")
    config = json.loads((tmp_path / "mm" / "config.json").read_text())
    assert config["kind"] == "multimodal" and config["tokenizers"] == {m: m for m in toy.modalities}
    again = MultimodalTokenizer.load(tmp_path / "mm")
    assert again.vocab_sizes == toy.vocab_sizes
    doc = [("text", "x y"), ("image", _image([3, 3, 2, 1]))]
    assert again.encode_document(doc) == toy.encode_document(doc)
    config["vocab_sizes"][1] = 9
    (tmp_path / "mm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocab_sizes"):
        MultimodalTokenizer.load(tmp_path / "mm")
    config["tokenizers"]["speech"] = "nowhere"
    (tmp_path / "mm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MultimodalTokenizer.load(tmp_path / "mm")


def test_text_only_tokenizer(text: TextTokenizer) -> None:
    tok = MultimodalTokenizer(text)
    assert tok.modalities == ("text",) and tok.vocab_size == text.vocab_size
    assert tok.decode_document(tok.encode_document([("text", "only text")])) == [("text", "only text")]
    with pytest.raises(ValueError, match="no 'image' modality"):
        tok.encode_document([("image", _image([0, 0, 0, 0]))])


def test_committed_small_trio_round_trip() -> None:
    from PIL import Image

    from mom.utils.audio import read_audio

    tok = MultimodalTokenizer.load(SMALL)
    config = json.loads((SMALL / "config.json").read_text())
    assert tok.modalities == ("text", "image", "speech") and list(tok.vocab_sizes) == config["vocab_sizes"]
    entry = json.loads((ROOT / "data/small/raw/images/captions.jsonl").read_text().splitlines()[0])
    image = Image.open(ROOT / "data/small/raw/images" / entry["file"]).convert("RGB")
    wave, rate = read_audio(ROOT / "data/small/raw/speech/clips/00000.flac")
    codes = tok.encode_images([image])[0]
    assert tok.encode_images([np.asarray(image)] * 2)[1].tolist() == codes.tolist()  # uint8 (h, w, 3) arrays too
    units = tok.encode_speech(wave, rate)
    assert len(codes) == tok.image.tokens_per_image and 40 <= len(units) <= 60 * len(wave) / rate
    ids = tok.encode_document([("text", entry["caption"]), ("image", image), ("speech", (wave, rate))])
    parts = tok.split_document(ids)
    assert [name for name, _ in parts] == ["text", "image", "speech"]
    assert parts[1][1].tolist() == codes.tolist() and parts[2][1].tolist() == units.tolist()
    assert np.array_equal(tok.modality_of(ids), MoMConfig(**tok.to_config_kwargs()).modality_of(torch.tensor(ids)))
    text, pixels = tok.decode_document(ids[: ids.index(BOSP_ID)] + [EOS_ID])
    assert text == ("text", entry["caption"])
    assert pixels[0] == "image" and pixels[1].shape == (tok.image.image_size, tok.image.image_size, 3)
    error = np.abs(pixels[1].astype(float) - np.asarray(image.resize(pixels[1].shape[:2]), dtype=float)).mean()
    assert error < 40  # a reconstruction of this image, not noise (mean abs error in 0..255 levels)


def test_for_model_cuts_to_the_leading_modalities(toy: MultimodalTokenizer) -> None:
    assert toy.for_model(toy.modalities, toy.vocab_sizes) is toy
    text_image = toy.for_model(toy.modalities[:2], toy.vocab_sizes[:2])
    assert text_image.modalities == ("text", "image") and text_image.vocab_sizes == toy.vocab_sizes[:2]
    doc = [("text", "a cat"), ("image", _image([0, 1, 6, 7]))]
    assert text_image.encode_document(doc) == toy.encode_document(doc)  # the same ids where both apply
    with pytest.raises(ValueError, match="has no 'speech' modality"):
        _ = text_image.speech
    for modalities, sizes in [(("text", "speech"), (toy.vocab_sizes[0], toy.vocab_sizes[2])),
                              (("text", "image"), (toy.vocab_sizes[0], toy.vocab_sizes[1] + 1))]:
        with pytest.raises(ValueError, match=r"do not start with the model's"):
            toy.for_model(modalities, sizes)
