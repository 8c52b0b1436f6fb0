import math

import numpy as np
import pytest
import torch

from mom.generation.document import SpanConstraint, level_dbfs, write_document
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


def test_level_dbfs():
    assert level_dbfs(np.ones(100, dtype=np.float32)) == pytest.approx(0.0)
    assert level_dbfs(np.full(100, 0.01, dtype=np.float32)) == pytest.approx(-40.0)
    assert level_dbfs(np.zeros(10, dtype=np.float32)) == -math.inf and level_dbfs(np.zeros(0)) == -math.inf


def test_write_document_replaces_an_earlier_document_only(tmp_path):
    for name in ("image_0.png", "speech_3.wav", "text.txt", "notes.md", "image_x.png"):
        (tmp_path / name).write_text("old")
    parts = [("text", "hello "), ("image", np.zeros((4, 4, 3), dtype=np.uint8))]
    written = write_document(parts, tmp_path, sample_rate=16000)
    assert [p.name for p in written] == ["text.txt", "image_0.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image_0.png", "image_x.png", "notes.md", "text.txt"]
    assert (tmp_path / "text.txt").read_text() == "hello [image_0.png]\n"
