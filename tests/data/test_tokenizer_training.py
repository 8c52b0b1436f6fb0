"""Tokenizer training recipes of the data layer: loading, validation, and the data they read from sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mom.data.tokenizer_training import (
    ImageSourceSpec,
    ImageTokenizerRecipe,
    SpeechDataSpec,
    SpeechTokenizerRecipe,
    TextTokenizerRecipe,
    recipe_texts,
)
from mom.tokenization.text import TextTrainingConfig

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "tokenizers" / "recipes"
RAW = REPO / "data" / "small" / "raw"


# ---- text ----------------------------------------------------------------------------------------------------------
def test_text_recipe_rejects_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("vocab_size: 400\nvocab: 3\n")
    with pytest.raises(ValueError, match="vocab"):
        TextTokenizerRecipe.from_yaml(path)
    path.write_text("vocab_size: many\n")
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizerRecipe.from_yaml(path)
    with pytest.raises(ValueError, match="vocab_size"):
        TextTokenizerRecipe(vocab_size=100)  # the training settings are validated too
    with pytest.raises(ValueError, match=r"sources\[0\]"):
        TextTokenizerRecipe(sources=[{"path": "x"}])
    with pytest.raises(ValueError, match="max_documents"):
        TextTokenizerRecipe(max_documents=-1)


def test_committed_text_recipe_is_a_training_config() -> None:
    recipe = TextTokenizerRecipe.from_yaml(RECIPES / "text_small.yaml")
    assert isinstance(recipe, TextTrainingConfig) and recipe.vocab_size == 2048
    assert [s["source"] for s in recipe.sources] == ["python-docs", "fortunes"]


def test_recipe_texts_caps_documents_per_source() -> None:
    folder = {"source": "folder", "path": str(RAW / "text"), "split": "paragraph"}
    recipe = TextTokenizerRecipe(vocab_size=400, max_documents=3, sources=[folder, folder])
    texts = list(recipe_texts(recipe))
    assert len(texts) == 6 and texts[:3] == texts[3:] and all(isinstance(t, str) and t for t in texts)


# ---- image ---------------------------------------------------------------------------------------------------------
def test_image_recipes_load_and_reject_unknown_keys(tmp_path: Path) -> None:
    small = ImageTokenizerRecipe.from_yaml(RECIPES / "image_small.yaml")
    assert small.tokenizer.tokens_per_image == 64 and small.training.device == "cpu"
    large = ImageTokenizerRecipe.from_yaml(RECIPES / "image_large.yaml")
    assert large.tokenizer.tokens_per_image == 256 and {s.source for s in large.sources} >= {"openmoji", "digits"}
    text = (RECIPES / "image_small.yaml").read_text()
    for bad, key in [("  seed: 0\n", "  seeds: 0\n"), ("  code_dim: 16\n", "  code_dims: 16\n")]:
        (tmp_path / "r.yaml").write_text(text.replace(bad, key))
        with pytest.raises(ValueError, match=key.strip().split(":")[0]):
            ImageTokenizerRecipe.from_yaml(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text(text.replace("steps: 1500", "steps: many"))
    with pytest.raises(ValueError, match="training.steps"):
        ImageTokenizerRecipe.from_yaml(tmp_path / "r.yaml")


def test_image_recipe_holds_out_unmarked_sources_without_leaking_variants() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install scikit-learn)")
    recipe = ImageTokenizerRecipe(
        sources=(ImageSourceSpec("digits", {"limit": 20, "augment": 1}),
                 ImageSourceSpec("folder", {"path": str(RAW / "images")})),
        held_out_fraction=0.25,
    )  # fmt: skip
    train, held = recipe.load_images()
    assert len(held) == 5 + 70  # 25% of the 20 digits + the folder's images marked "validation"
    assert len(train) == 15 * 2 + 630  # the other digits with one augmented variant each + the folder's train split
    held_pixels = {np.asarray(im).tobytes() for im in held}
    assert not any(np.asarray(im).tobytes() in held_pixels for im in train)


# ---- speech --------------------------------------------------------------------------------------------------------
def test_speech_recipe_validation(tmp_path: Path) -> None:
    text = (RECIPES / "speech_small.yaml").read_text()
    (tmp_path / "typo.yaml").write_text(text.replace("n_mels:", "n_mel:"))
    with pytest.raises(ValueError, match="tokenizer.n_mel"):
        SpeechTokenizerRecipe.from_yaml(tmp_path / "typo.yaml")
    (tmp_path / "type.yaml").write_text(text.replace("num_units: 256", "num_units: many"))
    with pytest.raises(ValueError, match="tokenizer.num_units: expected int"):
        SpeechTokenizerRecipe.from_yaml(tmp_path / "type.yaml")
    (tmp_path / "top.yaml").write_text(text + "epochs: 3\n")
    with pytest.raises(ValueError, match="epochs"):
        SpeechTokenizerRecipe.from_yaml(tmp_path / "top.yaml")
    assert SpeechTokenizerRecipe.from_yaml(RECIPES / "speech_large.yaml").tokenizer.num_units == 1024


def test_speech_data_spec_reads_its_source_and_reports_bad_clips(tmp_path: Path) -> None:
    clips = SpeechDataSpec("folder", {"path": str(RAW / "speech" / "clips"), "split": "validation"})
    records = list(clips.records(pytest.fail))
    assert records and all(r.sample_rate == 16000 and r.transcript for r in records)
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wave file")
    (tmp_path / "bad.txt").write_text("a transcript")
    skipped: list = []
    assert list(SpeechDataSpec("folder", {"path": str(tmp_path)}).records(skipped.append)) == []
    assert [Path(e.path).name for e in skipped] == ["bad.wav"]
