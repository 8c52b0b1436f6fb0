"""Text tokenizer (committed tokenizers/small/text, training) and the text sources of mom.data.text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mom.data.text import chunk_text, clean_rst, iter_text_records, parse_fortunes
from mom.tokenization import special
from mom.tokenization.text import TextTokenizer, TextTrainingConfig
from mom.utils.errors import BadInputError, MissingDependencyError

ROOT = Path(__file__).resolve().parents[2]
SMALL_TEXT = ROOT / "tokenizers" / "small" / "text"
RAW_TEXT = ROOT / "data" / "small" / "raw" / "text"

ROUND_TRIP = [
    "Hello, world!",
    "  two leading spaces, trailing tab\t",
    "runs   of    spaces\n\n\n\nand newlines\r\n",
    "déjà vu — naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 😀👩‍👩‍👧 and astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "SentencePiece's own space mark \u2581 and \u2581\u2581 twice",
    "control \x00 \x07 \x1b[0m chars, zero\u200bwidth, BOM\ufeff",
    "ligature ﬁ and full-width ＡＢＣ stay as they are (no NFKC)",
    "<s> </s> <image> </image> <speech> </speech> <pad> <unk> are plain text here",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.load(SMALL_TEXT)


def test_special_ids_are_the_contract() -> None:
    assert (special.PAD_ID, special.UNK_ID, special.BOS_ID, special.EOS_ID) == (0, 1, 2, 3)
    assert (special.BOI_ID, special.EOI_ID, special.BOSP_ID, special.EOSP_ID) == (4, 5, 6, 7)
    pieces = [t.piece for t in special.SPECIAL_TOKENS]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>", "<image>", "</image>", "<speech>", "</speech>"]


def test_committed_tokenizer_has_specials_at_fixed_ids(tok: TextTokenizer) -> None:
    assert [tok.id_to_piece(t.id) for t in special.SPECIAL_TOKENS] == [t.piece for t in special.SPECIAL_TOKENS]
    assert tok.vocab_size == json.loads((SMALL_TEXT / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_markup_text_never_becomes_special_ids(tok: TextTokenizer) -> None:
    ids = tok.encode("<s>x</s><image><speech></speech></image><pad><unk>")
    assert not set(ids) & {t.id for t in special.SPECIAL_TOKENS}
    assert tok.decode([special.BOI_ID, special.EOI_ID]) == ""


def test_decode_rejects_out_of_range_id(tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match=str(tok.vocab_size + 5)):
        tok.decode([10, tok.vocab_size + 5])


def test_save_load_and_bad_directories(tok: TextTokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "t")
    again = TextTokenizer.load(tmp_path / "t")
    text = ROUND_TRIP[3] + ROUND_TRIP[9]
    assert again.encode(text) == tok.encode(text)
    (tmp_path / "t" / "text.model").unlink()
    with pytest.raises(FileNotFoundError, match="text.model"):
        TextTokenizer.load(tmp_path / "t")
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "config.json").write_text(json.dumps({"kind": "vq-image"}))
    with pytest.raises(ValueError, match="vq-image"):
        TextTokenizer.load(tmp_path / "u")


def test_training_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        TextTrainingConfig(vocab_size=100)
    with pytest.raises(ValueError, match="model_type"):
        TextTrainingConfig(model_type="wordpiece")
    with pytest.raises(ValueError, match="character_coverage"):
        TextTrainingConfig(character_coverage=0)


# ---- text sources ----------------------------------------------------------------------------------------------


def test_parse_fortunes_splits_records_and_removes_overstrike() -> None:
    raw = "first\nrecord\n%\n_\x08b_\x08o_\x08l_\x08d text\n%\n\n%\nlast"
    assert parse_fortunes(raw) == ["first\nrecord", "bold text", "last"]


def test_clean_rst_keeps_prose_and_drops_markup() -> None:
    rst = (
        ".. _label:\n\nTitle\n=====\n\n.. index:: single: spam\n   pair: eggs\n\n"
        "Use :func:`~os.path.join` and `the docs <https://x.org>`_.\n\n.. function:: f(x)\n   :noindex:\n\n"
        "   Return *x*.\n\n.. a comment\n   more comment\n\nExample::\n\n   >>> f(1)\n"
    )
    out = clean_rst(rst)
    assert "os.path.join" in out and "the docs" in out and "f(x)" in out and ">>> f(1)" in out
    for gone in ("_label", "=====", "index::", "spam", ":noindex:", "comment", "https://"):
        assert gone not in out


def test_chunk_text_respects_limit_and_keeps_text() -> None:
    text = "\n\n".join(f"paragraph {i} " + "word " * (i * 7) for i in range(30))
    chunks = chunk_text(text, 200)
    assert all(len(c) <= 200 for c in chunks) and len(chunks) > 5
    assert "".join(chunks).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


def test_folder_source_reports_unreadable_files(tmp_path: Path) -> None:
    shutil.copy(RAW_TEXT / "fortunes-wisdom.txt", tmp_path / "good.txt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    errors: list[BadInputError] = []
    docs = list(iter_text_records("folder", on_error=errors.append, path=str(tmp_path), split="paragraph"))
    assert len(docs) > 20 and all(d.meta["file"] == "good.txt" for d in docs)
    assert [Path(e.path).name for e in errors] == ["bad.txt"]
    with pytest.raises(BadInputError, match="bad.txt"):
        list(iter_text_records("folder", on_error="stop", path=str(tmp_path)))
    with pytest.raises(ValueError, match="paragraphs"):
        list(iter_text_records("folder", path=str(tmp_path), paragraphs=True))


def test_missing_debian_packages_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match="apt-get install python3.11-doc"):
        list(iter_text_records("python-docs", path=str(tmp_path / "absent")))
    with pytest.raises(MissingDependencyError, match="apt-get install fortunes"):
        list(iter_text_records("fortunes", path=str(tmp_path / "absent")))


@pytest.mark.skipif(not Path("/usr/share/doc/python3.11/html/_sources").is_dir(), reason="needs python3.11-doc")
def test_python_docs_source_reads_sections() -> None:
    docs = []
    for record in iter_text_records("python-docs", max_chars=1000):
        docs.append(record)
        if len(docs) == 200:
            break
    assert all(40 <= len(d.text) <= 1000 for d in docs)
    assert all(d.meta["file"].endswith(".rst.txt") for d in docs)
    assert not any(".. index::" in d.text for d in docs)
