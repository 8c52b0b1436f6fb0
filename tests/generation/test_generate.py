import math

import numpy as np
import pytest
import torch
from helpers import needs_generate_cache

import mom
from mom.generation.document import SpanConstraint, generate_document, level_dbfs, write_document
from mom.model import generate_loop
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


def reference_state(constraint, row):
    """The span a row is in, walked back on the host (the oracle of `SpanConstraint.states`): its last opener's,
    unless a closer or <s> came after it."""
    for back, token in enumerate(reversed(row)):
        if token in (BOI_ID, BOSP_ID):
            return {BOI_ID: 1, BOSP_ID: 2}[token], back
        if token in (EOI_ID, EOSP_ID, BOS_ID):
            break
    return 0, 0


def test_span_states_on_the_device_equal_a_walk_on_the_host(tokenizer):
    c = SpanConstraint(tokenizer, max_speech_units=3)
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor([BOS_ID, BOI_ID, EOI_ID, BOSP_ID, EOSP_ID, 100, 101, tokenizer.offsets["image"],
                         tokenizer.offsets["speech"]])
    for n in (1, 2, 7, 30):
        rows = pool[torch.randint(0, len(pool), (64, n), generator=g)]  # (64, n): every mix of markers
        span, emitted = c.states(rows)
        assert [(int(s), int(e)) for s, e in zip(span, emitted)] == [reference_state(c, r) for r in rows.tolist()]


def test_rows_in_different_spans_are_masked_each_its_own_way(tokenizer):
    c = SpanConstraint(tokenizer, max_speech_units=3)
    V = sum(tokenizer.vocab_sizes)
    image_lo, speech_lo = tokenizer.offsets["image"], tokenizer.offsets["speech"]
    n = tokenizer.image.tokens_per_image
    rows = [[BOS_ID] * (n + 1) + [100],  # text
            [BOS_ID] + [BOI_ID] + [image_lo] * n,  # an image span, full: its closer only
            [BOS_ID] * n + [BOI_ID, image_lo],  # an image span, open
            [BOS_ID] * n + [BOSP_ID, speech_lo]]  # a speech span with one unit: units or its closer
    scores = c(torch.tensor(rows), torch.zeros(len(rows), V))
    got = [torch.isfinite(r).nonzero().flatten().tolist() for r in scores]
    assert got == [allowed(c, row, V) for row in rows]  # as each row alone
    assert got[1] == [EOI_ID] and got[2] == list(range(image_lo, speech_lo)) and EOSP_ID in got[3]


def test_the_constraint_reads_nothing_on_the_host(tokenizer, monkeypatch):
    c = SpanConstraint(tokenizer, max_speech_units=3)
    rows = torch.tensor([[BOS_ID, 100, BOI_ID, tokenizer.offsets["image"]], [BOS_ID, BOSP_ID, 5, EOSP_ID]])
    scores = torch.zeros(2, sum(tokenizer.vocab_sizes))
    c(rows, scores)  # its tables built
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _real=real, **k: reads.append(1) or _real(*a, **k))
    c(rows, scores)
    monkeypatch.undo()
    assert reads == []  # so MoM's own generate loop runs it between steps without waiting for the device


@needs_generate_cache
@pytest.mark.parametrize("then", ["image", "speech"])
def test_documents_sample_in_moms_loop_as_in_transformers_loop(tokenizer, then, monkeypatch):
    torch.manual_seed(0)
    config = mom.MoMConfig(vocab_sizes=tokenizer.vocab_sizes, d_model=16, n_layer=1, d_state=4, dt_rank=2)
    model = mom.MoMForCausalLM(config).eval()
    calls = []
    monkeypatch.setattr(generate_loop, "decode", lambda m, p, real=generate_loop.decode: calls.append(p) or real(m, p))
    ours = generate_document(model, tokenizer, "a digit", then, max_new_tokens=40, max_speech_units=20, seed=1)
    assert len(calls) == 1  # MoM's loop took it
    monkeypatch.setattr(generate_loop, "plan", lambda *a: None)  # every call to transformers' loop
    assert generate_document(model, tokenizer, "a digit", then, max_new_tokens=40, max_speech_units=20,
                             seed=1) == ours
    assert len(calls) == 1
