"""Recipes: loading, overrides, validation errors naming the key, the bundled recipes and their dense twins."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import mom
from mom.cli.train import main
from mom.model.config import MIXER_PROJECTIONS
from mom.model.flops import count_params
from mom.train import resolve
from mom.train.distributed import Context, deepspeed_config
from mom.train.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = ROOT / "recipes" / "tiny_mom.yaml"
# The tokenizers data/large is built with (recipes/data/large.yaml): the sized recipes state their vocabulary.
LARGE_TOKENIZER = ROOT / yaml.safe_load((ROOT / "recipes" / "data" / "large.yaml").read_text())["tokenizer"]["dir"]
TARGETS = {"60m": 60e6, "160m": 160e6, "760m": 760e6, "1b4": 1.4e9}


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


MINIMAL = "model: {d_model: 32, n_layer: 1}\ndata: {path: data/small}\n"


def test_minimal_recipe_gets_defaults_and_derived_sizes(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["train.grad_accum=4", "data.batch_size=2", "data.seq_len=128"])
    assert r.train.grad_accum == 4 and r.optim.betas == (0.9, 0.95) and r.deepspeed.zero_stage == 0
    assert r.tokens_per_step(world_size=8) == 8 * 2 * 4 * 128
    assert r.total_tokens(world_size=8) == 8 * 2 * 4 * 128 * r.train.max_steps
    config = r.model_config(modalities=("text", "image"), vocab_sizes=(100, 50))
    assert isinstance(config, mom.MoMConfig) and config.vocab_size == 150 and config.d_model == 32
    assert Recipe.from_dict(r.to_dict()) == r


def test_auto_vocabulary_must_be_supplied(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.model == {"modalities": "auto", "vocab_sizes": "auto", "d_model": 32, "n_layer": 1}
    with pytest.raises(ValueError, match="model.modalities is 'auto'"):
        r.model_config()
    r = load_recipe(write(tmp_path, MINIMAL), ["model.modalities=[text, image]"])
    with pytest.raises(ValueError, match="model.vocab_sizes is 'auto'"):
        r.model_config()
    assert r.model_config(vocab_sizes=(10, 20)).modalities == ("text", "image")


@pytest.mark.parametrize(
    "text, message",
    [
        (MINIMAL + "train: {max_step: 10}\n", r"train\.max_step: unknown key"),
        (MINIMAL + "train: {max_steps: ten}\n", r"train\.max_steps: expected int, got str 'ten'"),
        (MINIMAL + "optim: {betas: [0.9]}\n", r"optim\.betas: expected list of 2 float"),
        (MINIMAL + "optim: {lr: -1}\n", r"optim\.lr: must be > 0"),
        (MINIMAL + "deepspeed: {zero_stage: 3, offload_param: disk}\n", r"deepspeed\.offload_param: expected one of"),
        (MINIMAL + "deepspeed: {zero_stage: 1, offload_param: cpu}\n", r"deepspeed\.offload_param: needs zero_stage 3"),
        (MINIMAL + "train: {device: tpu}\n", r"train\.device: expected one of 'auto', 'cpu', 'cuda'"),
        (MINIMAL + "deepspeed: {zero_stage: 4}\n", r"deepspeed\.zero_stage: must be 0, 1, 2, 3 or auto, got 4"),
        (MINIMAL + "deepspeed: {zero_stage: auto, offload_optimizer: cpu}\n",
         r"deepspeed\.offload_optimizer: needs zero_stage 1, 2 or 3"),
        (MINIMAL + "trainer: {}\n", r"trainer: unknown recipe section"),
        ("model: {d_model: 32, n_layers: 2}\ndata: {path: x}\n", r"model\.n_layers: unknown key"),
        ("model: {d_model: '32'}\ndata: {path: x}\n", r"model\.d_model: expected int, got str"),
        ("model: {decouple: [in_proj, q_proj]}\ndata: {path: x}\n", r"model\.decouple: unknown projection"),
        ("model: {}\ndata: {path: x, seq_len: 0}\n", r"data\.seq_len: must be an integer >= 1"),
        ("model: {}\ndata: {path: x, mixture: {audio: 1}}\n", r"data\.mixture\.audio: unknown document kind"),
        ("model: {}\n", r"data: section required"),
        ("- just\n- a list\n", r"must be a mapping of sections"),
        ("model: {d_model: 32\n", r"invalid YAML"),
    ],
)
def test_bad_recipe_files_name_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(write(tmp_path, text))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps", r"expected key=value"),
        ("=3", r"expected key=value"),
        ("train.max_stepz=3", r"override train\.max_stepz: unknown key"),
        ("trian.max_steps=3", r"unknown section 'trian'"),
        ("train=3", r"name a key inside the section"),
        ("train.max_steps.x=3", r"train\.max_steps is not a mapping"),
        ("train.max_steps=3.5", r"^override train\.max_steps=3\.5: expected int, got float 3\.5$"),
        ("train.export_hf=maybe", r"^override train\.export_hf=maybe: expected bool"),
        ("model.d_modl=64", r"override model\.d_modl: unknown key"),
        ("model.d_model=wide", r"^override model\.d_model=wide: expected int, got str 'wide'$"),
        ("data.mixture.speach=0", r"^override data\.mixture\.speach=0: unknown document kind"),
        ("data.mixture.text=lots", r"^override data\.mixture\.text=lots: expected float"),
        ("optim.lr=-1", r"^override optim\.lr=-1: must be > 0, got -1"),  # __post_init__'s check, same blame
    ],
)
def test_bad_overrides_name_the_override_not_the_file(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(write(tmp_path, MINIMAL), [override])


def test_a_bad_file_value_blames_the_file_even_with_overrides(tmp_path):
    path = write(tmp_path, MINIMAL + "optim: {lr: -1}\n")
    with pytest.raises(ValueError, match=r"^recipe .*recipe\.yaml: optim\.lr: must be > 0"):
        load_recipe(path, ["train.max_steps=3"])
    assert load_recipe(path, ["optim.lr=0.1"]).optim.lr == 0.1  # the override repairs it


def test_overrides_parse_yaml_values_and_reach_free_form_mappings(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), [
        "optim.betas=[0.8, 0.9]", "train.stop_after=null", "data.mixture.text=2",
        "deepspeed.extra.zero_optimization.overlap_comm=true", "deepspeed.zero_stage=2", "train.out_dir=a=b",
        "optim.lr=1e-3", "optim.eps=1E-6",  # YAML 1.2 floats (PyYAML alone would read strings)
    ])
    assert r.optim.lr == 0.001 and r.optim.eps == 1e-6
    assert r.optim.betas == (0.8, 0.9) and r.train.stop_after is None and r.data.mixture == {"text": 2.0}
    assert r.train.out_dir == "a=b"
    ctx = Context(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), precision="fp32")
    ds = deepspeed_config(r, ctx)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # extra merged key by key
    assert ds["train_batch_size"] == 2 * r.data.batch_size * r.train.grad_accum and not ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == r.optim.grad_clip  # ZeRO-2 with fp32 weights: DeepSpeed clips


def test_auto_zero_stage_and_precision_follow_the_world():
    r = load_recipe(ROOT / "recipes" / "t2i_160m_mom.yaml")
    assert r.deepspeed.zero_stage == "auto"
    assert [resolve.for_world(r, n).deepspeed.zero_stage for n in (1, 2, 8)] == [0, 1, 1]
    assert resolve.precision("auto", on_gpu=True, stage=0) == "autocast_bf16"  # torch's AdamW steps fp32 weights
    assert resolve.precision("auto", on_gpu=True, stage=1) == "bf16"
    assert resolve.precision("auto", on_gpu=False, stage=1) == "fp32"
    assert resolve.precision("bf16", on_gpu=True, stage=0) == "bf16"  # a stated dtype is kept
    for world, stage in ((1, 0), (2, 1)):  # DeepSpeed gets the resolved stage, never "auto"
        ctx = Context(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"), precision="fp32")
        assert deepspeed_config(r, ctx)["zero_optimization"]["stage"] == stage
    assert load_recipe(ROOT / "recipes" / "t2i_760m_mom.yaml").deepspeed.zero_stage == 2  # a stated stage is kept


def test_cli_rejects_a_bad_recipe_before_training(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["--config", str(TINY), f"train.out_dir={out}", "train.max_steps=-5"]) == 2
    assert capsys.readouterr().err == "mom-train: error: override train.max_steps=-5: must be >= 1, got -5\n"
    assert not out.exists()
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml not found" in capsys.readouterr().err


def test_every_bundled_recipe_loads_and_each_mom_has_its_dense_twin():
    names = {p.stem for p in RECIPES}
    moms = [p for p in RECIPES if p.stem.endswith("_mom")]
    assert {"tiny_mom", "tiny_dense", "t2i_760m_mom", "tis_1b4_dense"} <= names and len(moms) >= 9
    for path in moms:
        mom_recipe = load_recipe(path).to_dict()
        dense = load_recipe(path.with_name(path.name.replace("_mom.yaml", "_dense.yaml"))).to_dict()
        every = list(MIXER_PROJECTIONS[mom_recipe["model"].get("mixer", "mamba1")])  # every projection of its mixer
        assert mom_recipe["model"].pop("decouple") == every and dense["model"].pop("decouple") == []
        assert mom_recipe["train"].pop("out_dir") != dense["train"].pop("out_dir")
        assert mom_recipe == dense, path.name
        assert f"--config recipes/{path.name}" in path.read_text()  # the exact command is in the file


@pytest.mark.parametrize("size", sorted(TARGETS))
def test_sized_recipes_hit_their_parameter_targets(size):
    for setting, modalities in (("t2i", ("text", "image")), ("tis", ("text", "image", "speech"))):
        r = load_recipe(ROOT / "recipes" / f"{setting}_{size}_mom.yaml")
        config = r.model_config()  # the recipe states its vocabulary: no corpus needed
        assert config.modalities == modalities
        tokenizer = json.loads((LARGE_TOKENIZER / "config.json").read_text())
        sizes = dict(zip(tokenizer["modalities"], tokenizer["vocab_sizes"]))
        assert config.vocab_sizes == tuple(sizes[m] for m in modalities)  # those of the corpus's tokenizers
        total, active = count_params(config)
        assert abs(active / TARGETS[size] - 1) < 0.1, (setting, size, active)  # dense-equivalent size
        assert total > 1.9 * active  # every projection has one expert per modality
        assert r.tokens_per_step(8) == 524_288  # the documented 0.5M tokens per step on 8 GPUs


def test_tiny_recipe_is_tiny():
    r = load_recipe(TINY)
    assert r.model["d_model"] <= 128 and r.model["n_layer"] <= 4 and r.data.seq_len <= 256
    assert r.data.path == "data/small" and re.fullmatch(r"runs/tiny_mom", r.train.out_dir)
    assert yaml.safe_load(TINY.read_text())["model"]["vocab_sizes"] == "auto"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_dry_runs_without_data_large(path, tmp_path, monkeypatch, capsys):
    """Issue 18.2: --dry-run needs the corpus only for a recipe saying "auto" (the tiny ones: data/small, bundled)."""
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    stated = "auto" not in (recipe.model["modalities"], recipe.model["vocab_sizes"])
    assert stated or recipe.data.path == "data/small", path.name
    overrides = [] if recipe.data.path == "data/small" else [f"data.path={tmp_path / 'absent'}"]
    assert main(["--config", str(path), "--dry-run", *overrides]) == 0, capsys.readouterr().err
    assert "active per token" in capsys.readouterr().out
