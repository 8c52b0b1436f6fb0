"""`mom-flops`: a saved config.json or a recipe, sized by the trainer's resolver; one-line errors."""

import json
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config

from mom.cli.flops import main
from mom.model import flops
from mom.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def manifest_corpus(root: Path, modalities=("text", "image", "speech"), sizes=(40, 24, 16)) -> Path:
    from mom.data.loader import MANIFEST_FORMAT, MANIFEST_VERSION

    root.mkdir()
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "modalities": list(modalities),
                "vocab_sizes": list(sizes), "splits": {"train": {"shards": []}}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def write_recipe(tmp_path: Path, corpus: Path, **model) -> Path:
    recipe = {
        "model": {"modalities": "auto", "vocab_sizes": "auto", "d_model": 16, "n_layer": 2, "d_state": 4,
                  "dt_rank": 3, **model},
        "data": {"path": str(corpus), "seq_len": 32, "batch_size": 2},
        "train": {"max_steps": 10, "grad_accum": 3},
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mom-flops: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_saved_model_config(tmp_path, capsys):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    assert main(["--model-json", str(tmp_path), "--tokens", "1e9", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    table = flops.flop_table(config)
    for row in table.rows:
        assert row.component in out
    assert f"{table.forward_flops:,}" in out
    assert f"{table.total_params:,}" in out and f"{table.active_params:,}" in out
    assert f"{flops.training_flops(config, 10**9):.3e}" in out
    assert "H100 SXM" in out and "on 2 GPU(s) at 40% MFU" in out

    assert main(["--model-json", str(tmp_path / "config.json"), "model.d_model=32"]) == 0
    out = capsys.readouterr().out
    assert f"{flops.forward_flops_per_token(tiny_config(d_model=32)):,}" in out
    assert "no token budget" in out


@pytest.mark.parametrize(
    "args, needles",
    [
        (["model.d_modle=32"], ["override model.d_modle: unknown key"]),
        (["model.d_model=wide"], ["override model.d_model=wide: expected int, got str 'wide'"]),
        (["model.decouple=[q_proj]"], ["override model.decouple=[q_proj]:", "q_proj"]),
        (["d_model=32"], ["override d_model: unknown section 'd_model'"]),
    ],
)
def test_saved_model_config_errors_blame_the_override(tmp_path, capsys, args, needles):
    tiny_config().save_pretrained(tmp_path)
    assert main(["--model-json", str(tmp_path), *args]) == 2
    one_error_line(capsys, *needles)


def test_missing_model_json_is_one_line(tmp_path, capsys):
    assert main(["--model-json", str(tmp_path / "missing")]) == 2
    one_error_line(capsys, "missing")


def test_recipe_uses_its_budget_world_size_and_corpus_vocab(tmp_path, capsys):
    path = write_recipe(tmp_path, manifest_corpus(tmp_path / "corpus"))
    assert main(["--config", str(path), "--world-size", "4", "model.d_model=32"]) == 0
    out = capsys.readouterr().out
    config = tiny_config(d_model=32)  # vocab sizes from the manifest, d_model from the override
    assert f"{flops.forward_flops_per_token(config):,}" in out
    tokens = 4 * 2 * 3 * 32 * 10  # world size * batch * grad_accum * seq_len * steps
    assert f"training on {tokens:,} tokens" in out
    assert f"{flops.training_flops(config, tokens):.3e}" in out
    assert "on 4 GPU(s)" in out
    assert main(["--config", str(path), "model.d_modle=32"]) == 2
    one_error_line(capsys, "override model.d_modle: unknown key")


def test_explicit_modalities_take_a_leading_subset_of_the_corpus(tmp_path, capsys):
    """Issue 18.2: a text+image model on a three-modality corpus keeps two modalities (was: every manifest size)."""
    corpus = manifest_corpus(tmp_path / "corpus")
    no_speech = "data.mixture={speech_transcript: 0, transcript_speech: 0, mixed: 0}"
    path = write_recipe(tmp_path, corpus, modalities=["text", "image"])
    assert main(["--config", str(path), no_speech]) == 0
    out = capsys.readouterr().out
    assert "modalities=text,image " in out and "vocab=64 " in out
    assert f"{flops.forward_flops_per_token(tiny_config(modalities=('text', 'image'), vocab_sizes=(40, 24))):,}" in out


def test_a_stated_vocabulary_needs_no_corpus(tmp_path, capsys):
    path = write_recipe(tmp_path, tmp_path / "unbuilt", modalities=["text", "image"], vocab_sizes=[40, 24])
    assert main(["--config", str(path)]) == 0
    assert "modalities=text,image " in capsys.readouterr().out


def test_auto_vocabulary_without_a_corpus_names_the_fix(tmp_path, capsys):
    path = write_recipe(tmp_path, tmp_path / "unbuilt", modalities=["text", "image"])
    assert main(["--config", str(path)]) == 2
    err = one_error_line(capsys, "model.vocab_sizes is 'auto'", "model.modalities=[text, image]", "tokenizer_dir")
    assert "speech" not in err  # the hint keeps the recipe's modalities (issue 18.2)


def test_auto_vocabulary_from_the_tokenizer(tmp_path, capsys):
    tokenizer = ROOT / "tokenizers" / "small"
    path = write_recipe(tmp_path, tmp_path / "unbuilt")
    assert main(["--config", str(path), f"train.tokenizer_dir={tokenizer}"]) == 0
    sizes = json.loads((tokenizer / "config.json").read_text())["vocab_sizes"]
    assert f"vocab={sum(sizes)} modalities=text,image,speech" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted([*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "recipes/study").glob("*.yaml")]),
                         ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_every_recipe_is_sized_without_data_large(path, capsys, tmp_path, monkeypatch):
    """Issue 18.2: mom-flops works on every recipe with no data/large (tiny ones need data/small, bundled)."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    if recipe.data.path != "data/small":
        assert "auto" not in (recipe.model["modalities"], recipe.model["vocab_sizes"]), path.name
        overrides = [f"data.path={tmp_path / 'absent'}"]  # as on a machine without data/large
    else:
        overrides = []
    assert main(["--config", str(path), *overrides]) == 0, capsys.readouterr().err
    assert "training FLOPs/token" in capsys.readouterr().out


def test_hardware_prints_the_recompute_and_counts_hardware_flops(tmp_path, capsys):
    config = tiny_config(mixer="mamba2", headdim=8, ngroups=2, chunk_size=8)
    config.save_pretrained(tmp_path)
    assert main(["--model-json", str(tmp_path), "--tokens", "1e9", "--hardware"]) == 0
    out = capsys.readouterr().out
    table = flops.flop_table(config)
    assert "hardware recompute in the backward (fused path" in out and "_chunk_state_fwd" in out
    assert f"{table.recomputed_flops:,}" in out
    hardware = flops.training_flops(config, 10**9, hardware=True)
    assert hardware > flops.training_flops(config, 10**9)
    assert f"{hardware:.3e} FLOPs (hardware FLOPs" in out and "40% HFU" in out
    assert main(["--model-json", str(tmp_path), "--tokens", "1e9"]) == 0  # without: model FLOPs, no recompute table
    out = capsys.readouterr().out
    assert "hardware recompute" not in out and f"{flops.training_flops(config, 10**9):.3e} FLOPs (model FLOPs" in out
