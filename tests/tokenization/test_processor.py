"""MoMProcessor: text + images + audio -> the ids MultimodalTokenizer gives; ids (e.g. mom-generate's) -> parts."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import mom
from mom.generation.document import SpanConstraint, close_open_span, generate_document
from mom.tokenization.processor import MoMProcessor
from mom.tokenization.special import BOI_ID, EOS_ID, EOSP_ID

ROOT = Path(__file__).parents[2]
SMALL = ROOT / "tokenizers" / "small"
RATE = 16_000


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(SMALL)


@pytest.fixture(scope="module")
def image():
    return Image.open(sorted((ROOT / "data/small/raw/images").glob("*.png"))[0])


@pytest.fixture(scope="module")
def wave():
    t = np.arange(RATE // 2) / RATE  # half a second of a 220 Hz tone
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_auto_processor_loads_the_registered_class(processor):
    assert isinstance(processor, MoMProcessor)
    assert processor.modalities == ("text", "image", "speech") and processor.sampling_rate == RATE


def test_interleaved_ids_equal_the_multimodal_tokenizer(processor, image, wave):
    ids = processor(text="a digit <image> then <speech> end", images=[image], audio=[wave], sampling_rate=RATE)
    parts = [("text", "a digit "), ("image", image), ("text", " then "), ("speech", (wave, RATE)), ("text", " end")]
    expected = processor.media.encode_document(parts)
    assert expected[-1] == EOS_ID
    assert ids["input_ids"] == expected[:-1]  # a prompt: <s> ... without </s>
    assert ids["attention_mask"] == [1] * len(expected[:-1])


def test_text_alone_equals_the_tokenizer(processor):
    text = "plain  text\twith <s> inside"
    assert processor(text=text)["input_ids"] == processor.tokenizer(text)["input_ids"]


def test_media_without_text_and_arrays_for_images(processor, image, wave):
    pixels = np.asarray(image.convert("RGB"))
    ids = processor(images=pixels, audio=wave, sampling_rate=RATE)["input_ids"]
    assert ids == processor(text="<image><speech>", images=[image], audio=[wave], sampling_rate=RATE)["input_ids"]
    assert ids[1] == BOI_ID and ids[-1] == EOSP_ID


def test_batch_is_left_padded(processor, image):
    batch = processor(text=["hi", "a digit: <image>"], images=[image], return_tensors="pt")
    long = processor(text="a digit: <image>", images=[image])["input_ids"]
    short = processor(text="hi")["input_ids"]
    assert batch["input_ids"].shape == (2, len(long))
    assert batch["input_ids"][0].tolist() == [0] * (len(long) - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (len(long) - len(short)) + [1] * len(short)
    assert batch["input_ids"][1].tolist() == long


def test_bad_inputs_are_named(processor, image, wave):
    with pytest.raises(ValueError, match="<image> placeholder without a matching image"):
        processor(text="<image> and <image>", images=[image])
    with pytest.raises(ValueError, match="more media than placeholders"):
        processor(text="one <image>", images=[image, image])
    with pytest.raises(ValueError, match="sampling_rate: required"):
        processor(text="<speech>", audio=[wave])
    with pytest.raises(ValueError, match="mono 1-D"):
        processor(text="<speech>", audio=[np.zeros((2, 100), np.float32)], sampling_rate=RATE)
    with pytest.raises(ValueError, match="uint8"):
        processor(text="<image>", images=[np.zeros((8, 8), np.float32)])
    text_image = MoMProcessor(processor.tokenizer, processor.media, modalities=("text", "image"))
    with pytest.raises(ValueError, match="no speech modality"):
        text_image(text="<speech>", audio=[wave], sampling_rate=RATE)
    with pytest.raises(ValueError, match="leading part"):
        MoMProcessor(processor.tokenizer, processor.media, modalities=("image",))


@pytest.mark.parametrize("then", ["image", "speech"])
def test_ids_of_mom_generate_round_trip(processor, then):
    """Decode what `mom-generate` samples into text, images and waveforms, and encode those again: the same parts
    come back, the same texts and images of as many codes (media codes may differ: decoding then re-encoding an
    image or a clip is not exact; sampled text ids need not be the canonical encoding of their text)."""
    config = mom.MoMConfig(vocab_sizes=processor.media.vocab_sizes, d_model=16, n_layer=1, d_state=4, dt_rank=2)
    model = mom.MoMForCausalLM(config).eval()
    ids = generate_document(model, processor.media, "a digit", then, max_new_tokens=80, max_speech_units=20, seed=1)
    ids = close_open_span(ids, SpanConstraint(processor.media, 20))
    if ids[-1] == EOS_ID:
        ids = ids[:-1]
    parts = processor.decode_document(ids)
    assert any(kind == then for kind, _ in parts)
    for kind, value in parts:
        assert isinstance(value, {"text": str, "image": Image.Image, "speech": np.ndarray}[kind])
    text = "".join(value if kind == "text" else f"<{kind}>" for kind, value in parts)
    again = processor(text=text, images=[v for k, v in parts if k == "image"],
                      audio=[v for k, v in parts if k == "speech"], sampling_rate=processor.sampling_rate)
    back = processor.decode_document(again["input_ids"])
    assert [kind for kind, _ in back] == [kind for kind, _ in parts]
    assert [v for k, v in back if k == "text"] == [v for k, v in parts if k == "text"]
    assert [v.size for k, v in back if k == "image"] == [v.size for k, v in parts if k == "image"]
    assert processor.decode_document(torch.tensor(ids))[0] == parts[0]  # tensors are accepted too


def test_save_pretrained_then_auto_processor(tmp_path, processor, image):
    processor.save_pretrained(tmp_path / "saved")
    loaded = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer" / "config.json").is_file()
    kwargs = dict(text="x <image>", images=[image])
    assert loaded(**kwargs)["input_ids"] == processor(**kwargs)["input_ids"]


def test_repr_and_tokenizer_decode(processor):
    assert '"modalities": [\n    "text",' in repr(processor)
    ids = processor(text="hello there")["input_ids"]
    assert processor.decode(ids, skip_special_tokens=True) == "hello there"


def test_missing_processor_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="processor_config.json not found"):
        MoMProcessor.from_pretrained(tmp_path)
