import shutil
import wave

import pytest
import torch
from PIL import Image

import mom
from mom.generation.document import SpanConstraint, main
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.special import BOI_ID, BOS_ID, BOSP_ID, EOI_ID, EOSP_ID, PAD_ID

TOKENIZERS = "tokenizers/small"


@pytest.fixture(scope="module")
def tokenizer():
    return MultimodalTokenizer.load(TOKENIZERS)


def allowed(constraint, row, vocab):
    scores = constraint(torch.tensor([row]), torch.zeros(1, vocab))
    return torch.isfinite(scores[0]).nonzero().flatten().tolist()


def test_span_constraint_keeps_documents_well_formed(tokenizer):
    c = SpanConstraint(tokenizer, max_speech_units=3)
    V = sum(tokenizer.vocab_sizes)
    image_lo, speech_lo = tokenizer.offsets["image"], tokenizer.offsets["speech"]
    text = allowed(c, [BOS_ID, 100], V)
    assert max(text) < image_lo and BOI_ID in text and BOSP_ID in text
    assert not {PAD_ID, BOS_ID, EOI_ID, EOSP_ID} & set(text)
    n = tokenizer.image.tokens_per_image
    assert allowed(c, [BOS_ID, BOI_ID] + [image_lo] * (n - 1), V) == list(range(image_lo, speech_lo))
    assert allowed(c, [BOS_ID, BOI_ID] + [image_lo] * n, V) == [EOI_ID]
    assert allowed(c, [BOS_ID, BOI_ID] + [image_lo] * n + [EOI_ID], V) == text  # back to text
    assert EOSP_ID not in allowed(c, [BOS_ID, BOSP_ID], V)  # a speech span holds at least one unit
    assert EOSP_ID in allowed(c, [BOS_ID, BOSP_ID, speech_lo], V)
    assert allowed(c, [BOS_ID, BOSP_ID] + [speech_lo] * 3, V) == [EOSP_ID]


def test_cli_writes_a_decoded_document(tmp_path, tokenizer, capsys):
    config = mom.MoMConfig(**tokenizer.to_config_kwargs(), d_model=32, n_layer=2)
    model_dir = tmp_path / "hf"
    mom.MoMForCausalLM(config).save_pretrained(model_dir)
    shutil.copytree(TOKENIZERS, model_dir / "tokenizer")
    out = tmp_path / "img"
    assert main(["--model", str(model_dir), "--prompt", "a grinning face", "--then", "image", "--out", str(out),
                 "--max-new-tokens", "70"]) == 0
    assert Image.open(out / "image_0.png").size == (32, 32)
    assert (out / "text.txt").read_text().startswith("a grinning face[image_0.png]")
    out = tmp_path / "speech"
    assert main(["--model", str(model_dir), "--then", "speech", "--max-speech-units", "25", "--max-new-tokens", "30",
                 "--out", str(out)]) == 0
    with wave.open(str(out / "speech_0.wav")) as w:
        seconds = w.getnframes() / w.getframerate()
    assert 0.02 <= seconds <= 25 / 50 + 0.05  # at most 25 units at 50 units/s
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--tokenizer", str(tmp_path / "none")])
