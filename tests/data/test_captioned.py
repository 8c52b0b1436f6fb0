"""`mom.data.captioned`: the discrete corpus of captioned images as VQ codes beside another corpus's text documents
(`build_code_corpus`, `mom-data codes`): its documents, its loader, and clear errors. The Transfusion corpus built on
the same core: tests/data/test_transfusion_data.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mom.cli.data import main
from mom.data.captioned import build_code_corpus
from mom.data.corpus import build_loader
from mom.data.images import iter_image_records
from mom.data.loader import DataConfig, PackedLoader, read_manifest
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.tokenization.special import BOI_ID, BOS_ID, EOI_ID, EOS_ID
from mom.utils.errors import BadInputError

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "data" / "small" / "raw" / "images"
SMALL = ROOT / "data" / "small"
TOKENIZERS = ROOT / "tokenizers" / "small"
TEXT_VOCAB, IMAGE_VOCAB, CODES = 2048, 512, 64  # tokenizers/small: 2,048 text ids, a 512-code VQ, 64 codes an image


def _raise(error):
    raise error


def records(limit: int = 20, size: int = 32) -> list:
    return list(iter_image_records("folder", path=str(IMAGES), size=size, limit=limit, on_error=_raise))


@pytest.fixture(scope="module")
def tokenizer() -> MultimodalTokenizer:
    return MultimodalTokenizer.load(TOKENIZERS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("codes") / "corpus"
    build_code_corpus(records(), tokenizer, out, validation_fraction=0.2, seed=0, text_from=SMALL)
    return out


def rows(corpus: Path) -> list[dict]:
    return [r for split in ("train", "validation") for r in pq.read_table(corpus / split / "shard-00000.parquet")
            .to_pylist()]


def test_image_documents_hold_the_tokenizers_codes_and_the_caption(corpus, tokenizer) -> None:
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["modalities"] == ["text", "image"] and manifest["vocab_sizes"] == [TEXT_VOCAB, IMAGE_VOCAB]
    assert manifest["vocab_offsets"] == [0, TEXT_VOCAB] and manifest["image_tokens"] == CODES
    by_id = {json.loads(r["meta"]).get("id"): r for r in rows(corpus) if r["kind"] != "text"}
    assert len(by_id) == 20
    for record in records()[:3]:
        row = by_id[record.meta["id"]]
        ids, modality = np.asarray(row["input_ids"]), np.asarray(row["modality_ids"])
        codes = tokenizer.encode_images([record.image])[0] + TEXT_VOCAB  # the oracle: the tokenizer itself
        caption = tokenizer.encode_text(record.caption)
        image = [BOI_ID, *codes.tolist(), EOI_ID]
        body = [*caption, *image] if row["kind"] == "caption_image" else [*image, *caption]
        assert ids.tolist() == [BOS_ID, *body, EOS_ID]
        assert modality.tolist() == [int(i >= TEXT_VOCAB) for i in ids]  # the layout's modality of every id


def test_text_documents_come_from_the_other_corpus_in_their_splits(corpus) -> None:
    small = json.loads((SMALL / "manifest.json").read_text())["splits"]
    manifest = json.loads((corpus / "manifest.json").read_text())["splits"]
    for split in ("train", "validation"):
        assert manifest[split]["documents_per_kind"]["text"] == small[split]["documents_per_kind"]["text"]
        images = manifest[split]["documents_per_kind"].get("image_caption", 0) + \
            manifest[split]["documents_per_kind"].get("caption_image", 0)
        assert manifest[split]["tokens_per_modality"]["image"] == images * CODES
    first_text = pq.read_table(SMALL / "train" / "shard-00000.parquet").to_pylist()
    first_text = next(r for r in first_text if r["kind"] == "text")
    assert any(r["input_ids"] == first_text["input_ids"] for r in rows(corpus) if r["kind"] == "text")  # ids kept


def test_the_corpus_loads_as_any_discrete_corpus(corpus) -> None:
    assert read_manifest(corpus).vocab_sizes == (TEXT_VOCAB, IMAGE_VOCAB)
    loader = build_loader(DataConfig(path=str(corpus), seq_len=64, batch_size=2))
    assert isinstance(loader, PackedLoader)
    batch = next(loader)
    ids, modality = batch["input_ids"], batch["modality_ids"]
    real = ids != 0  # padding aside
    assert bool(((ids >= TEXT_VOCAB) == (modality == 1))[real].all()) and int(ids.max()) < TEXT_VOCAB + IMAGE_VOCAB
    assert batch["input_ids"].dtype == torch.long


def test_errors_name_the_problem(corpus, tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="already exists"):
        build_code_corpus(records(2), tokenizer, corpus)
    with pytest.raises(BadInputError, match="images must be 32x32"):
        build_code_corpus(records(2, size=16), tokenizer, tmp_path / "small_images")
    other = MultimodalTokenizer.load(ROOT / "tokenizers" / "medium_img32")  # 8,192 text ids
    with pytest.raises(ValueError, match="its text vocabulary has 2048 ids, the captions' tokenizer 8192"):
        build_code_corpus(records(2, size=other.image.image_size), other, tmp_path / "other", text_from=SMALL)
    assert not (tmp_path / "small_images").exists() and not (tmp_path / "other").exists()


def test_mom_data_codes(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "t2i"
    assert main(["codes", "--tokenizer", str(TOKENIZERS), "--images", str(IMAGES), "--limit", "12", "--augment", "1",
                 "--text-from", str(SMALL), "--validation-fraction", "0.25", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"built {out}" in printed and "64 codes an image" in printed
    kinds = [r["kind"] for r in rows(out)]
    assert sum(k != "text" for k in kinds) == 24  # 12 images, each with one augmented variant
    assert main(["codes", "--tokenizer", str(TOKENIZERS), "--images", str(IMAGES), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    other = tmp_path / "other"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["codes", "--tokenizer", str(TOKENIZERS), "--images", str(IMAGES), "--out", str(other),
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mom-data: error: --device cuda: no CUDA device") and not other.exists()
