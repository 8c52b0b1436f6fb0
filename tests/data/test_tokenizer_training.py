"""Tokenizer training recipes of the data layer: loading, validation, and the data they read from sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mom.data.tokenizer_training import (
    ImageSourceSpec,
    ImageTokenizerRecipe,
    SpeechDataSpec,
    SpeechTokenizerRecipe,
    TextTokenizerRecipe,
    VAERecipe,
    recipe_texts,
)
from mom.tokenization import vae as vae_module
from mom.tokenization.text import TextTrainingConfig

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "tokenizers" / "recipes"
RAW = REPO / "data" / "small" / "raw"
VAE_RECIPES = sorted(RECIPES.glob("vae_*.yaml"))


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


def test_image_recipes_name_a_bad_source_or_fraction(tmp_path: Path) -> None:
    text = (RECIPES / "image_small.yaml").read_text()
    for bad, good, message in [
        ("source: folder", "source: fodler", r"sources\[0\]\.source: unknown image source 'fodler'"),
        ("held_out_fraction: 0.1", "held_out_fraction: 1.0", r"held_out_fraction: must be in \[0, 1\)"),
    ]:
        (tmp_path / "r.yaml").write_text(text.replace(bad, good))
        with pytest.raises(ValueError, match=message):
            ImageTokenizerRecipe.from_yaml(tmp_path / "r.yaml")
    with pytest.raises(ValueError, match="sources: list at least one"):
        ImageTokenizerRecipe(sources=())


# ---- continuous image VAE (the Transfusion setting) ------------------------------------------------------------------
@pytest.mark.parametrize("path", VAE_RECIPES, ids=lambda p: p.name)
def test_every_committed_vae_recipe_parses(path: Path) -> None:
    recipe = VAERecipe.from_yaml(path)
    assert recipe.sources and all(isinstance(s, ImageSourceSpec) for s in recipe.sources)
    assert recipe.vae.image_size % recipe.vae.downsample == 0 and 0 <= recipe.held_out_fraction < 1


def test_the_vae_recipes_are_found() -> None:  # the test above is not left with nothing to check
    assert {"vae_small.yaml", "vae_large.yaml"} <= {p.name for p in VAE_RECIPES}


def test_vae_recipe_errors_name_the_bad_field(tmp_path: Path) -> None:
    text = (RECIPES / "vae_small.yaml").read_text()
    for bad, good, message in [
        ("  base_width: 16", "  base_widht: 16", "vae.base_widht: unknown key"),
        ("  steps: 3000", "  steps: many", "training.steps: expected int"),
        ("  recon_loss: mse", "  recon_loss: ssim", "training.recon_loss"),
        ("  downsample: 4 ", "  downsample: 3 ", "vae.downsample: must be a power of two"),
        ("source: folder", "source: fodler", r"sources\[0\]\.source: unknown image source"),
        ("held_out_fraction: 0.1", "held_out_fraction: -0.1", "held_out_fraction: must be in"),
    ]:
        assert bad in text, bad
        (tmp_path / "r.yaml").write_text(text.replace(bad, good))
        with pytest.raises(ValueError, match=message) as error:
            VAERecipe.from_yaml(tmp_path / "r.yaml")
        assert str(error.value).startswith(str(tmp_path / "r.yaml"))  # and the file
    (tmp_path / "r.yaml").write_text("vae: {image_size: 32}\n")
    with pytest.raises(ValueError, match="sources: required key missing"):
        VAERecipe.from_yaml(tmp_path / "r.yaml")


def test_vae_and_vq_recipes_hold_out_the_same_images() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install scikit-learn)")
    sources = (ImageSourceSpec("digits", {"limit": 20, "augment": 1}),)
    vq = ImageTokenizerRecipe(sources=sources, held_out_fraction=0.25)
    vae = VAERecipe(sources=sources, held_out_fraction=0.25)
    assert vq.tokenizer.image_size == vae.vae.image_size and vq.training.seed == vae.training.seed

    def pixels(images: list) -> list[bytes]:
        return [np.asarray(im).tobytes() for im in images]

    (vq_train, vq_held), (vae_train, vae_held) = vq.load_images(), vae.load_images()
    assert len(vae_held) == 5 and len(vae_train) == 15 * 2
    assert pixels(vae_held) == pixels(vq_held) and pixels(vae_train) == pixels(vq_train)
    reseeded = VAERecipe(sources=sources, held_out_fraction=0.25)
    reseeded.training.seed = 1
    assert pixels(reseeded.load_images()[1]) != pixels(vae_held)  # the seed draws the held-out items


def test_committed_vae_was_built_from_its_recipe() -> None:
    small_vae = REPO / "tokenizers" / "small" / "vae"
    recipe = VAERecipe.from_yaml(RECIPES / "vae_small.yaml")
    saved = json.loads((small_vae / "config.json").read_text())
    measured = ("scaling_factor", "shift_factor")
    assert {k: v for k, v in saved.items() if k in recipe.vae.to_dict() and k not in measured} == {
        k: v for k, v in recipe.vae.to_dict().items() if k not in measured
    }
    report = json.loads((small_vae / vae_module.REPORT_FILE).read_text())
    assert (report["recipe"], report["steps"]) == ("tokenizers/recipes/vae_small.yaml", recipe.training.steps)
    large = VAERecipe.from_yaml(RECIPES / "vae_large.yaml")
    assert (large.vae.image_size, large.training.device) == (64, "cuda")


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
