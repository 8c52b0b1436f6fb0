"""mom-data build: a tiny corpus from the committed raw data, resumption, bad inputs, requirements; and the
committed data/small corpus checked against its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mom import MoMConfig
from mom.data import build as build_module
from mom.data.build import BuildRecipe, build, format_summary, missing_requirements, write_split
from mom.data.kinds import KIND_MODALITIES
from mom.tokenization.special import BOS_ID, EOS_ID
from mom.utils.errors import BadInputError, MissingDependencyError

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT / "data" / "small" / "raw"
SMALL_TOKENIZERS = ROOT / "tokenizers" / "small"
SMALL_CORPUS = ROOT / "data" / "small"
N_IMAGES, N_CLIPS = 10, 6


def _copy_jsonl_folder(src: Path, index_file: str, dst: Path, n: int) -> list[dict]:
    """Copy the first ``n`` entries of a folder described by a jsonl index (file + caption/transcript)."""
    dst.mkdir(parents=True)
    entries = [json.loads(line) for line in (src / index_file).read_text().splitlines()[:n]]
    for entry in entries:
        shutil.copy(src / entry["file"], dst / entry["file"])
    return entries


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    """Tiny raw inputs: committed images (+ a corrupt file and an empty caption), clips and text."""
    images = _copy_jsonl_folder(RAW / "images", "captions.jsonl", tmp_path / "images", N_IMAGES)
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    shutil.copy(tmp_path / "images" / images[0]["file"], tmp_path / "images" / "uncaptioned.png")
    images += [{"file": "corrupt.png", "caption": "a broken file"}, {"file": "uncaptioned.png", "caption": "  "}]
    (tmp_path / "images" / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in images))
    clips = _copy_jsonl_folder(RAW / "speech" / "clips", "transcripts.jsonl", tmp_path / "speech", N_CLIPS)
    (tmp_path / "speech" / "transcripts.jsonl").write_text("".join(json.dumps(e) + "\n" for e in clips))
    return tmp_path


def _recipe(raw: Path, out: Path, **overrides) -> Path:
    recipe = {
        "name": "tiny",
        "out": str(out),
        "tokenizer": {"dir": str(SMALL_TOKENIZERS)},
        "text": [{"source": "folder", "options": {"path": str(RAW / "text"), "split": "paragraph"}, "max_records": 12}],
        "image": [{"source": "folder", "options": {"path": str(raw / "images")}}],
        "speech": [{"source": "folder", "options": {"path": str(raw / "speech")}}],
        "documents": {"mixed": 2, "mixed_spans": [2, 3]},
        "validation_fraction": 0.3,
        "seed": 3,
        "shard_size": 4,
        "chunk_size": 4,
        **overrides,
    }
    path = raw / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _read_corpus(root: Path) -> tuple[dict, dict[str, list[dict]]]:
    manifest = json.loads((root / "manifest.json").read_text())
    rows = {s: [r for shard in v["shards"] for r in pq.read_table(root / shard).to_pylist()] for s, v in
            manifest["splits"].items()}  # fmt: skip
    return manifest, rows


def _check_corpus(root: Path) -> tuple[dict, dict[str, list[dict]]]:
    """Assert the manifest matches the shards and every document is well formed; return both."""
    manifest, rows = _read_corpus(root)
    config = MoMConfig(modalities=manifest["modalities"], vocab_sizes=manifest["vocab_sizes"])
    doc_ids = {}
    for split, entry in manifest["splits"].items():
        docs = rows[split]
        assert entry["documents"] == len(docs)
        kinds = {k: sum(d["kind"] == k for d in docs) for k in entry["documents_per_kind"]}
        assert kinds == entry["documents_per_kind"]
        tokens = {m: 0 for m in manifest["modalities"]}
        for doc in docs:
            ids = torch.tensor(doc["input_ids"])
            assert doc["input_ids"][0] == BOS_ID and doc["input_ids"][-1] == EOS_ID
            assert doc["modality_ids"] == config.modality_of(ids).tolist()
            for i, m in enumerate(manifest["modalities"]):
                tokens[m] += doc["modality_ids"].count(i)
            held = {manifest["modalities"][i] for i in doc["modality_ids"]}
            allowed = KIND_MODALITIES[doc["kind"]]
            assert allowed is None or held <= allowed, (doc["kind"], held)
            json.loads(doc["meta"])
        assert tokens == entry["tokens_per_modality"] and sum(tokens.values()) == entry["tokens"]
        doc_ids[split] = {d["doc_id"] for d in docs}
        assert len(doc_ids[split]) == len(docs)
    assert not doc_ids["train"] & doc_ids["validation"]
    return manifest, rows


def test_tiny_build_matches_manifest_and_skips_bad_inputs(raw: Path) -> None:
    built = build(BuildRecipe.from_yaml(_recipe(raw, raw / "corpus")))
    printed = format_summary(built)
    manifest, rows = _check_corpus(raw / "corpus")
    assert manifest["splits"] == built["splits"]
    kinds = {d["kind"] for split in rows.values() for d in split}
    assert {"text", "mixed"} <= kinds and kinds & {"image_caption", "caption_image"}
    assert kinds & {"speech_transcript", "transcript_speech"}
    used = {"image": 0, "speech": 0}  # every good media record is in exactly one document
    for doc in (d for split in rows.values() for d in split):
        if doc["kind"] == "mixed":
            for part in json.loads(doc["meta"])["parts"]:
                used[part["modality"]] = used.get(part["modality"], 0) + 1
        elif doc["kind"] != "text":
            used["image" if "caption" in doc["kind"] else "speech"] += 1
    assert used["image"] == N_IMAGES and used["speech"] == N_CLIPS
    skipped = manifest["skipped"]
    assert skipped["total"] == 2
    examples = [path for entry in skipped["by_reason"].values() for path in entry["examples"]]
    assert any("corrupt.png" in p for p in examples) and any("uncaptioned.png" in p for p in examples)
    assert "corrupt.png" in printed and "skipped inputs: 2" in printed
    # the same source item never lands in both splits
    groups = {s: {json.loads(d["meta"]).get("file") for d in v if d["kind"] != "mixed"} for s, v in rows.items()}
    assert not (groups["train"] & groups["validation"]) - {None}


def test_on_error_stop_names_the_file(raw: Path) -> None:
    recipe = BuildRecipe.from_yaml(_recipe(raw, raw / "stopped", on_error="stop"))
    with pytest.raises(BadInputError, match="corrupt.png"):
        build(recipe)
    assert not (raw / "stopped" / "manifest.json").exists()


def test_resume_after_interruption_gives_identical_shards(raw: Path, monkeypatch) -> None:
    recipe = BuildRecipe.from_yaml(_recipe(raw, raw / "fresh"))
    build(recipe)
    write, calls = build_module._write_parquet, {"chunk": 0, "shard": 0}

    def interrupted(table, path, *args, **kwargs):
        kind = "shard" if path.name.startswith("shard-") else "chunk"
        calls[kind] += 1
        if (kind, calls[kind]) in (("chunk", 3), ("shard", 2)):  # once while encoding, once while writing shards
            raise KeyboardInterrupt
        write(table, path, *args, **kwargs)

    monkeypatch.setattr(build_module, "_write_parquet", interrupted)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            build(recipe, raw / "resumed")
        assert not (raw / "resumed" / "manifest.json").exists()
    build(recipe, raw / "resumed")
    fresh, _ = _read_corpus(raw / "fresh")
    resumed, _ = _read_corpus(raw / "resumed")
    assert fresh["splits"] == resumed["splits"] and fresh["skipped"] == resumed["skipped"]
    for shard in (s for v in fresh["splits"].values() for s in v["shards"]):
        assert pq.read_table(raw / "fresh" / shard).equals(pq.read_table(raw / "resumed" / shard))
    assert not (raw / "resumed" / ".build").exists()
    with pytest.raises(FileExistsError, match="--restart"):
        build(recipe, raw / "resumed")


def test_shards_of_a_build_before_the_modality_ids_rename_ask_for_restart(raw: Path) -> None:
    recipe = BuildRecipe.from_yaml(_recipe(raw, raw / "old"))
    (raw / "old" / "train").mkdir(parents=True)
    old = {"input_ids": [[BOS_ID, EOS_ID]], "modality": [[0, 0]], "doc_id": [0], "kind": ["text"], "source": ["x"],
           "meta": ["{}"]}  # fmt: skip
    pq.write_table(pa.table(old), raw / "old" / "train" / "shard-00000.parquet")
    with pytest.raises(ValueError, match="no modality_ids column.*--restart"):
        write_split("train", [None], 0, SimpleNamespace(modalities=("text",)), recipe, raw / "old")


def test_missing_requirements_are_listed_together(raw: Path, monkeypatch) -> None:
    monkeypatch.setattr(build_module.shutil, "which", lambda name: None)
    recipe = _recipe(
        raw,
        raw / "never",
        text=[{"source": "python-docs", "options": {"path": str(raw / "no-docs")}}],
        speech=[{"source": "espeak", "texts_from": {"source": "fortunes", "path": str(raw / "no-fortunes")}}],
    )
    hints = missing_requirements(BuildRecipe.from_yaml(recipe))
    assert any("python3.11-doc" in h for h in hints) and any("espeak-ng" in h for h in hints)
    assert any("fortunes" in h for h in hints)
    with pytest.raises(MissingDependencyError, match="(?s)apt-get install python3.11-doc.*apt-get install espeak-ng"):
        build(BuildRecipe.from_yaml(recipe))
    assert not (raw / "never").exists()


def test_recipe_errors_name_the_key(raw: Path) -> None:
    path = _recipe(raw, raw / "x", shard_sise=3)
    with pytest.raises(ValueError, match="shard_sise"):
        BuildRecipe.from_yaml(path)
    path = _recipe(raw, raw / "x", documents={"text": "ten"})
    with pytest.raises(ValueError, match="documents.text"):
        BuildRecipe.from_yaml(path)
    path = _recipe(raw, raw / "x", on_error="ignore")
    with pytest.raises(ValueError, match="on_error"):
        BuildRecipe.from_yaml(path)
    path = _recipe(raw, raw / "too-many", documents={"text": 500})
    with pytest.raises(ValueError, match="text documents wanted"):
        build(BuildRecipe.from_yaml(path))


def test_committed_small_corpus_is_consistent() -> None:
    manifest, rows = _check_corpus(SMALL_CORPUS)
    assert manifest["modalities"] == ["text", "image", "speech"]
    tokenizer_dir = (SMALL_CORPUS / manifest["tokenizer_dir"]).resolve()
    assert tokenizer_dir == SMALL_TOKENIZERS.resolve()
    tokenizer_config = json.loads((tokenizer_dir / "config.json").read_text())
    assert tokenizer_config["vocab_sizes"] == manifest["vocab_sizes"]
    for split in rows.values():
        assert len({d["kind"] for d in split}) == 6  # every kind in both splits
    lengths = np.array([len(d["input_ids"]) for d in rows["train"]])
    assert lengths.min() >= 3
