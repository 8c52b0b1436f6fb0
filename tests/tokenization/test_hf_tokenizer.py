"""The Hugging Face text tokenizer: AutoTokenizer loads it without mom and gives mom's ids on the whole corpus."""

import glob
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from mom.tokenization.hf_tokenizer import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    build_tokenizer,
    check_same_ids,
    save_hf_tokenizer,
    tokenizer_config,
)
from mom.tokenization.special import SPECIAL_TOKENS
from mom.tokenization.text import TextTokenizer, TextTrainingConfig

ROOT = Path(__file__).parents[2]
SMALL = ROOT / "tokenizers" / "small"
EDGE_CASES = [
    "", " ", "  ", "\n", "\t\t--", "a  b   c    d", "trailing   ", "   leading", "\r\n\r\n", "\u2581", "a\u2581b",
    "\u2581\u2581 x \u2581", "<s>", "</s>", "<pad><unk>", "<image>x</image>", "<speech> y </speech>", "< s>",
    "na\u00efve caf\u00e9", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8", "\U0001f916\U0001f600 emoji",
    "zero\u200bwidth", "e\u0301 combining", "\ufb01 ligature", "\x00\x01\x1f\x7f", "12345678901234567890",
    "3.14159e-10", "x" * 3000, "def f(x):\n    return x  # comment\n",
]


def corpus_texts():
    """Every document's text of data/small (text ids outside media spans, decoded) and the raw text files."""
    text = TextTokenizer.load(SMALL / "text")
    texts = []
    for shard in sorted(glob.glob(str(ROOT / "data" / "small" / "*" / "shard-*.parquet"))):
        table = pq.read_table(shard, columns=["input_ids", "modality_ids"]).to_pydict()
        for ids, modality in zip(table["input_ids"], table["modality_ids"]):
            ids, modality = np.asarray(ids), np.asarray(modality)
            texts.append(text.decode(ids[(modality == 0) & (ids >= len(SPECIAL_TOKENS))].tolist()))
    texts += [Path(p).read_text(encoding="utf-8") for p in sorted(glob.glob(str(ROOT / "data/small/raw/text/*")))]
    return texts


@pytest.fixture(scope="module")
def mom_text():
    return TextTokenizer.load(SMALL / "text")


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(SMALL)


def test_ids_equal_mom_on_the_corpus_and_edge_cases(mom_text, hf):
    texts = corpus_texts() + EDGE_CASES
    assert len(texts) > 3000 and sum(map(len, texts)) > 1_000_000
    for text in texts:
        ids = mom_text.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:80]
        assert hf(text)["input_ids"] == [2] + ids  # a document starts with <s>
        assert hf.decode(ids, skip_special_tokens=True) == mom_text.decode(ids) == text


def test_batch_encoding_pads_on_the_left_with_pad(mom_text, hf):
    batch = hf(["a b", "a longer text"], padding=True, return_tensors="pt")
    short = [2] + mom_text.encode("a b")
    width = len(mom_text.encode("a longer text")) + 1
    assert batch["input_ids"][0].tolist() == [0] * (width - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (width - len(short)) + [1] * len(short)


def test_special_tokens(mom_text, hf):
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
    assert hf.convert_tokens_to_ids([t.piece for t in SPECIAL_TOKENS]) == list(range(8))
    assert sorted(hf.all_special_ids) == list(range(8))
    assert len(hf) == mom_text.vocab_size == 2048
    # As in mom, special tokens are never read out of text: "<image>" is characters, not id 4.
    assert hf("<image></s>", add_special_tokens=False)["input_ids"] == mom_text.encode("<image></s>")
    assert not set(mom_text.encode("<image></s>")) & set(range(8))
    assert hf.decode([2, 4, 5, 6, 7, 3], skip_special_tokens=True) == ""
    assert hf.decode([2, *mom_text.encode("hi"), 3]) == "<s>hi</s>"


def test_committed_files_are_the_conversion_of_the_text_model(tmp_path, mom_text):
    save_hf_tokenizer(mom_text, tmp_path)
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        assert (tmp_path / name).read_text() == (SMALL / name).read_text(), f"regenerate tokenizers/small/{name}"
    assert json.loads((SMALL / TOKENIZER_CONFIG_FILE).read_text()) == tokenizer_config()


@pytest.fixture(scope="module")
def raw_documents():
    texts = [Path(p).read_text(encoding="utf-8") for p in sorted(glob.glob(str(ROOT / "data/small/raw/text/*")))]
    return [d for t in texts for d in t.split("\n\n") if d.strip()]


def test_conversion_of_a_freshly_trained_model(tmp_path, raw_documents):
    trained = TextTokenizer.train(raw_documents, TextTrainingConfig(vocab_size=400))
    save_hf_tokenizer(trained, tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in raw_documents + EDGE_CASES:  # "<" is out of this vocabulary: byte fallback, never "<s>"
        assert hf(text, add_special_tokens=False)["input_ids"] == trained.encode(text), text[:80]


def test_unigram_models_are_refused(tmp_path, raw_documents):
    trained = TextTokenizer.train(raw_documents, TextTrainingConfig(vocab_size=400, model_type="unigram"))
    with pytest.raises(ValueError, match="only SentencePiece BPE models convert exactly"):
        save_hf_tokenizer(trained, tmp_path)
    assert not list(tmp_path.iterdir())


def test_check_same_ids_names_the_disagreeing_text(mom_text):
    other = TextTokenizer.train(["aaaa bbbb cccc dddd"] * 50, TextTrainingConfig(vocab_size=270))
    with pytest.raises(ValueError, match="disagrees with mom's on 'abcd'"):
        check_same_ids(build_tokenizer(other), mom_text, ["abcd"])


def test_loads_without_importing_mom():
    code = (
        "import sys; from transformers import AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(SMALL)!r})\n"
        "assert 'mom' not in sys.modules, 'mom was imported'\n"
        "print(t('a cat')['input_ids'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str([2] + TextTokenizer.load(SMALL / "text").encode("a cat"))
