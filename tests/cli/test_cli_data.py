"""`mom-data build|images|speech ...`: the corpus build and the raw-source tools from the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mom.cli.data import DEFAULT_RECIPE, main, source_options
from mom.data import build as build_module
from mom.data import speech as speech_module

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT / "data" / "small" / "raw"
SMALL_TOKENIZERS = ROOT / "tokenizers" / "small"


def _text_recipe(tmp_path: Path, out: Path, **overrides) -> Path:
    recipe = {
        "name": "cli",
        "out": str(out),
        "tokenizer": {"dir": str(SMALL_TOKENIZERS)},
        "text": [{"source": "folder", "options": {"path": str(RAW / "text"), "split": "paragraph"}, "max_records": 8}],
        "validation_fraction": 0.25,
        "shard_size": 4,
        **overrides,
    }
    path = tmp_path / f"recipe-{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_build_prints_the_summary_and_refuses_a_complete_corpus(tmp_path: Path, capsys) -> None:
    recipe = _text_recipe(tmp_path, tmp_path / "corpus")
    assert main(["build", "--recipe", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"built {tmp_path / 'corpus'}: 8 documents" in out and "documents per kind:" in out
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == 8
    assert main(["build", "--recipe", str(recipe)]) == 2
    assert capsys.readouterr().err == f"mom-data: error: {tmp_path / 'corpus' / 'manifest.json'} exists: the corpus " \
        "is complete (pass --restart to rebuild it)\n"
    assert main(["build", "--recipe", str(recipe), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "manifest.json").is_file()


def test_build_stopping_on_bad_input_names_the_file(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (images / "captions.jsonl").write_text(json.dumps({"file": "corrupt.png", "caption": "a broken file"}) + "\n")
    recipe = _text_recipe(tmp_path, tmp_path / "stopped", on_error="stop",
                          image=[{"source": "folder", "options": {"path": str(images)}}])  # fmt: skip
    assert main(["build", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.splitlines()[-1].split("mom-data: error: ")  # after the progress bar
    assert len(err) == 2 and "corrupt.png" in err[1] and "on_error: skip" in err[1]
    assert not (tmp_path / "stopped" / "manifest.json").exists()


def test_check_defaults_to_the_small_recipe(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(build_module, "missing_requirements", lambda recipe: [])
    assert main(["build", "--check"]) == 0
    assert capsys.readouterr().out == f"{DEFAULT_RECIPE}: OK, every requirement is installed\n"
    missing = ["apt-get install fortunes", "pip install x"]
    monkeypatch.setattr(build_module, "missing_requirements", lambda recipe: missing)
    assert main(["build", "--check"]) == 2
    assert capsys.readouterr().err == "mom-data: error: the recipe needs, missing here:\n  apt-get install fortunes\n" \
        "  pip install x\n"
    monkeypatch.chdir(tmp_path)
    assert main(["build", "--check"]) == 2
    assert "run from the repository root or pass --recipe" in capsys.readouterr().err


def test_images_export_from_a_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "images"
    folder = f"folder.path={RAW / 'images'}"
    assert main(["images", "export", "--out", str(out), "--source", "folder:6", "--opt", folder,
                 "--held-out", "0.5", "--size", "16"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    per_split = summary["per_source_split"]  # keyed by the source each image was first exported from
    assert summary["images"] == 6 and sum(n for k, n in per_split.items() if k.endswith("/validation")) == 3
    lines = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(Image.open(out / e["file"]).size == (16, 16) and e["caption"] for e in lines)
    assert main(["images", "export", "--out", str(out), "--source", "folder:2", "--opt", f"folder.path={RAW}"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["images", "export", "--out", str(tmp_path / "x"), "--source", "folder:two"]) == 2
    assert "NAME[:COUNT]" in capsys.readouterr().err
    assert main(["images", "export", "--out", str(tmp_path / "x"), "--source", "folder",
                 "--opt", "digits.limit=3"]) == 2  # fmt: skip
    assert "not given with --source: ['digits']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_speech_commands_without_espeak_say_how_to_install_it(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(speech_module.shutil, "which", lambda name: None)
    assert main(["speech", "voices"]) == 2
    assert "apt-get" in capsys.readouterr().err
    (tmp_path / "texts.txt").write_text("hello there\n")
    assert main(["speech", "synth", "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "clips")]) == 2
    assert "espeak-ng" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "clips").exists()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_speech_synth_writes_a_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "texts.txt").write_text("hello there\nthe quick brown fox\n")
    assert main(["speech", "synth", "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "clips"),
                 "--format", "wav"]) == 0  # fmt: skip
    assert "wrote 2 clips" in capsys.readouterr().out
    assert len((tmp_path / "clips" / "transcripts.jsonl").read_text().splitlines()) == 2


def test_source_options_parse_yaml_values() -> None:
    assert source_options(["a.path=./x", "a.limit=3", "b.flip=true", "b.size=[1, 2]", "c.k=a: b: c"]) == {
        "a": {"path": "./x", "limit": 3}, "b": {"flip": True, "size": [1, 2]}, "c": {"k": "a: b: c"}}
    for bad in ("path=./x", "a.path", ".path=1", "a.=1"):
        with pytest.raises(ValueError, match="SOURCE.KEY=VALUE"):
            source_options([bad])


def test_latents_from_several_folders_with_augmented_variants(tmp_path, capsys):
    """`mom-data latents --images A --images B --augment 1`: every folder's images, each with one variant that stays
    in its original's split (a medium corpus's images come as two exported folders)."""
    import pyarrow.parquet as pq

    raw = ROOT / "data/small/raw/images"
    lines = (raw / "captions.jsonl").read_text().splitlines()
    folders = []
    for name, part in (("a", lines[:5]), ("b", lines[5:9])):
        folder = tmp_path / name
        folder.mkdir()
        for line in part:
            shutil.copy(raw / json.loads(line)["file"], folder)
        (folder / "captions.jsonl").write_text("\n".join(part) + "\n")
        folders += ["--images", str(folder)]
    out = tmp_path / "latent"
    assert main(["latents", "--vae", str(ROOT / "tokenizers/small/vae"), *folders, "--augment", "1",
                 "--validation-fraction", "0.3", "--device", "cpu", "--out", str(out)]) == 0, capsys.readouterr().err
    docs = [d for split in ("train", "validation") for d in pq.read_table(out / split / "shard-00000.parquet")
            .select(["kind", "meta"]).to_pylist()]
    images = [json.loads(d["meta"]) for d in docs if d["kind"] in ("image_caption", "caption_image")]
    assert len(images) == 2 * (5 + 4) and sum(m.get("variant", 0) == 1 for m in images) == 9
    splits = {}
    for split in ("train", "validation"):
        for d in pq.read_table(out / split / "shard-00000.parquet").select(["meta"]).to_pylist():
            splits.setdefault(json.loads(d["meta"])["id"], set()).add(split)
    assert all(len(s) == 1 for s in splits.values())  # a variant is never in the other split than its original
