"""mom-finetune: recipes, CLI errors before training, adapter-only training with the real trainer, and the
held-out image class example (recipes/finetune/heldout_class.yaml) end to end on CPU."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

import mom
from mom.cli.finetune import main
from mom.train.export import complete_export, load_tokenizer
from mom.train.finetune import SUMMARY_FILE, load_finetune_recipe
from mom.train.loop import train
from mom.train.recipe import Recipe

REPO = Path(__file__).resolve().parents[2]
HELDOUT_RECIPE = REPO / "recipes" / "finetune" / "heldout_class.yaml"

# ---- a synthetic corpus with image classes ----------------------------------------------------------------------
# Text: a noisy Markov chain over the text ids. Image class c: 16 codes, each the previous plus (c + 1) modulo the
# image vocabulary (90% of the time), followed by a 3-token caption naming the class: like a digit with its label.
MODALITIES, VOCAB_SIZES = ["text", "image", "speech"], [48, 32, 8]
IMAGE_OFFSET, IMAGE_LEN, CLASSES, HELD_OUT = 48, 16, 10, 9
BOS, EOS, BOI, EOI, FIRST_WORD = 2, 3, 4, 5, 8
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("modality_ids", pa.list_(pa.int8())), ("doc_id", pa.int64()),
                    ("kind", pa.string()), ("source", pa.string()), ("meta", pa.string())])


def text_doc(rng) -> tuple[str, dict, list[int]]:
    words = [int(rng.integers(FIRST_WORD, 48))]
    for _ in range(int(rng.integers(20, 40))):
        rule = FIRST_WORD + (words[-1] * 5 + 3) % (48 - FIRST_WORD)
        words.append(rule if rng.random() < 0.8 else int(rng.integers(FIRST_WORD, 48)))
    return "text", {}, [BOS, *words, EOS]


def image_doc(rng, cls: int) -> tuple[str, dict, list[int]]:
    codes = [int(rng.integers(0, 32))]
    for _ in range(IMAGE_LEN - 1):
        codes.append((codes[-1] + cls + 1) % 32 if rng.random() < 0.9 else int(rng.integers(0, 32)))
    caption = [FIRST_WORD + cls, 20, 30]
    return "image_caption", {"class": cls}, [BOS, BOI, *[IMAGE_OFFSET + c for c in codes], EOI, *caption, EOS]


def write_corpus(root: Path, splits: dict[str, list]) -> Path:
    """Parquet shards + manifest.json (written last) in the contracted layout."""
    manifest = {"format": "mom-corpus", "version": 1, "modalities": MODALITIES, "vocab_sizes": VOCAB_SIZES,
                "splits": {}}
    doc_id = 0
    for split, docs in splits.items():
        (root / split).mkdir(parents=True)
        rows = []
        for kind, meta, ids in docs:
            modality = [1 if IMAGE_OFFSET <= i < IMAGE_OFFSET + 32 else 0 for i in ids]
            rows.append({"input_ids": ids, "modality_ids": modality, "doc_id": doc_id, "kind": kind,
                         "source": "synthetic", "meta": json.dumps(meta)})
            doc_id += 1
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / split / "shard-00000.parquet",
                       row_group_size=64)
        manifest["splits"][split] = {"shards": [f"{split}/shard-00000.parquet"], "documents": len(rows)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """``base``: text + image classes 0-8 (class 9 held out). ``heldout``: train split = class 9 images plus a
    replay of 7 images per seen class (against forgetting them), validation split = class 9 images only."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("corpora")
    seen = range(CLASSES - 1)

    def base(n_text, n_per_class):
        return [text_doc(rng) for _ in range(n_text)] + [image_doc(rng, c) for c in seen for _ in range(n_per_class)]

    held = [image_doc(rng, HELD_OUT) for _ in range(60)]
    replay = [image_doc(rng, c) for c in seen for _ in range(7)]
    return {
        "base": write_corpus(root / "base", {"train": base(300, 30), "validation": base(40, 4)}),
        "heldout": write_corpus(root / "heldout", {
            "train": held + replay,
            "validation": [image_doc(rng, HELD_OUT) for _ in range(24)],
        }),
    }




def tiny_config() -> mom.MoMConfig:
    return mom.MoMConfig(modalities=MODALITIES, vocab_sizes=VOCAB_SIZES, d_model=32, n_layer=2, d_state=8)


@pytest.fixture(scope="module")
def random_base(tmp_path_factory):
    """An untrained MoM checkpoint (Hugging Face directory) for the quick tests."""
    path = tmp_path_factory.mktemp("random_base")
    mom.MoMForCausalLM(tiny_config()).save_pretrained(path)
    return path


def ft_args(tmp_path, corpus, *extra) -> list[str]:
    """Overrides for a short, quiet run of the held-out recipe in ``tmp_path``."""
    return [f"data.path={corpus}", f"train.out_dir={tmp_path / 'run'}", "train.progress=false",
            "train.tensorboard=false", "train.device=cpu", *extra]


# ---- recipes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    ft = load_finetune_recipe(path)
    assert ft.lora.projections or ft.lora.target_modules
    assert ft.recipe.optim.weight_decay == 0.0  # LoRA factors are not decayed in our recipes


def test_recipe_sections_and_overrides(tmp_path):
    ft = load_finetune_recipe(HELDOUT_RECIPE, ["lora.r=16", "lora.modalities=[image, speech]", "optim.lr=5e-1",
                                               "lora.alpha=1e1"])
    assert (ft.lora.r, ft.lora.modalities, ft.lora.alpha, ft.recipe.optim.lr) == (16, ["image", "speech"], 10.0, 0.5)
    with pytest.raises(ValueError, match="override lora.rank: unknown key; valid keys of lora are"):
        load_finetune_recipe(HELDOUT_RECIPE, ["lora.rank=4"])
    with pytest.raises(ValueError, match="override model.d_model: the base checkpoint defines the model"):
        load_finetune_recipe(HELDOUT_RECIPE, ["model.d_model=8"])
    with pytest.raises(ValueError, match=r"^override lora\.alpha=big: expected float, got str 'big'$"):
        load_finetune_recipe(HELDOUT_RECIPE, ["lora.alpha=big"])
    with pytest.raises(ValueError, match=r"^override lora\.r=0: must be an integer >= 1, got 0$"):
        load_finetune_recipe(HELDOUT_RECIPE, ["lora.r=0"])  # LoraSettings' own check, blamed on the override
    raw = yaml.safe_load(HELDOUT_RECIPE.read_text())
    (tmp_path / "no_lora.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "lora"}))
    with pytest.raises(ValueError, match="lora: section required"):
        load_finetune_recipe(tmp_path / "no_lora.yaml")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({**raw, "model": {"d_model": 8}}))
    with pytest.raises(ValueError, match="model: the base checkpoint .* defines the model"):
        load_finetune_recipe(tmp_path / "model.yaml")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**raw, "lora": {**raw["lora"], "rnak": 2}}))
    with pytest.raises(ValueError, match="lora.rnak: unknown key"):
        load_finetune_recipe(tmp_path / "typo.yaml")


# ---- the command line: errors come before any training ------------------------------------------------------------
def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--base" in out and "--config" in out and "--compare" in out and "key=value" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.target_modules=[in_proj.video]", r"'in_proj\.video' matches no module.*valid names: \[.*in_proj\.image"),
        ("lora.modalities=[video]", r"unknown modality.*'video'.*\['text', 'image', 'speech'\]"),
        ("lora.projections=[in_proj, mixer]", r"unknown projection.*'mixer'"),
    ],
)
def test_bad_targets_fail_before_training(tmp_path, capsys, corpora, random_base, override, message):
    code = main(["--base", str(random_base), "--config", str(HELDOUT_RECIPE),
                 *ft_args(tmp_path, corpora["heldout"], override)])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_shared_projection_cannot_take_a_modality_preset(tmp_path, capsys, corpora):
    shared = tmp_path / "shared_base"
    config = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=VOCAB_SIZES, d_model=16, n_layer=1, d_state=4,
                           decouple=["x_proj"])
    mom.MoMForCausalLM(config).save_pretrained(shared)
    code = main(["--base", str(shared), "--config", str(HELDOUT_RECIPE), *ft_args(tmp_path, corpora["heldout"])])
    assert code == 2
    assert "'in_proj' is shared by all modalities" in capsys.readouterr().err


def test_base_and_corpus_must_agree(tmp_path, capsys, corpora):
    other = tmp_path / "other_base"
    mom.MoMForCausalLM(mom.MoMConfig(modalities=MODALITIES, vocab_sizes=[48, 64, 8], d_model=16, n_layer=1,
                                     d_state=4)).save_pretrained(other)
    assert main(["--base", str(other), "--config", str(HELDOUT_RECIPE), *ft_args(tmp_path, corpora["heldout"])]) == 2
    assert "vocab sizes [48, 32, 8], the base has" in capsys.readouterr().err
    assert main(["--base", str(tmp_path / "nowhere"), "--config", str(HELDOUT_RECIPE),
                 *ft_args(tmp_path, corpora["heldout"])]) == 2
    assert "config.json not found" in capsys.readouterr().err


# ---- training with the real trainer -------------------------------------------------------------------------------
def test_only_adapters_train_and_outputs_round_trip(tmp_path, corpora, random_base, one_thread):
    merged_dir = tmp_path / "merged"
    code = main(["--base", str(random_base), "--config", str(HELDOUT_RECIPE), "--merged-out", str(merged_dir),
                 *ft_args(tmp_path, corpora["heldout"], "train.max_steps=4", "train.eval_batches=1",
                          "train.log_every=2", "optim.warmup_steps=1", "lora.train_conv=true")])
    assert code == 0
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    base = AutoModelForCausalLM.from_pretrained(random_base).eval()
    total = sum(p.numel() for p in base.parameters())
    cfg = base.config
    lora = 2 * 8 * ((cfg.d_model + 2 * cfg.d_inner) + (cfg.d_inner + cfg.d_model))  # r=8, in_proj + out_proj
    conv = 2 * (cfg.d_inner * cfg.d_conv + cfg.d_inner)  # the trained copy of each layer's conv1d
    assert (summary["trainable_params"], summary["total_params"]) == (lora + conv, total + lora + conv)

    ids = torch.tensor([[BOS, BOI, *range(IMAGE_OFFSET, IMAGE_OFFSET + 16), EOI, 9, 20, 30, EOS]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    adapted = PeftModel.from_pretrained(base, summary["adapter_dir"]).eval()
    with torch.no_grad():
        tuned = adapted(input_ids=ids).logits
    assert not torch.allclose(tuned, base_logits)  # training changed the adapter
    fresh = AutoModelForCausalLM.from_pretrained(random_base).state_dict()
    for name, value in adapted.get_base_model().state_dict().items():  # base weights bit-identical
        if "lora_" not in name and "modules_to_save" not in name:
            key = name.replace(".base_layer.", ".").replace(".original_module.", ".")
            assert torch.equal(value, fresh[key]), name
    exported = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(exported) is mom.MoMForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, tuned, rtol=1e-5, atol=1e-5)

    # A second run into the same directories is refused before training.
    assert main(["--base", str(random_base), "--config", str(HELDOUT_RECIPE),
                 *ft_args(tmp_path, corpora["heldout"], "train.max_steps=4")]) == 2


def test_merged_export_is_a_complete_hf_export(tmp_path, one_thread):
    """--merged-out writes what the trainer's export writes: tokenizer files (AutoTokenizer), processor config
    (AutoProcessor), special ids, generation config, model card and the fine-tuning recipe."""
    small_tokenizer, small_corpus = REPO / "tokenizers" / "small", REPO / "data" / "small"
    if not (small_corpus / "manifest.json").is_file():
        pytest.skip("data/small is not built")
    config = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=[2048, 512, 256], d_model=16, n_layer=1, d_state=4)
    base_dir = tmp_path / "base"
    mom.MoMForCausalLM(config).save_pretrained(base_dir)
    complete_export(base_dir, config, load_tokenizer(small_tokenizer, config))  # as mom-train's
    merged_dir = tmp_path / "merged"
    code = main(["--base", str(base_dir), "--config", str(HELDOUT_RECIPE), "--merged-out", str(merged_dir),
                 *ft_args(tmp_path, small_corpus, "train.max_steps=2", "train.eval_batches=1", "data.seq_len=64",
                          "data.batch_size=2")])
    assert code == 0
    base_files = {p.name for p in base_dir.iterdir()}
    assert {p.name for p in merged_dir.iterdir()} == base_files | {"recipe.yaml"}
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json", "tokenizer", "README.md",
            "generation_config.json"} <= base_files
    saved = json.loads((merged_dir / "config.json").read_text())
    assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (2, 3, 0)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer("the cat").input_ids == AutoTokenizer.from_pretrained(base_dir)("the cat").input_ids
    assert tokenizer("the cat").input_ids[0] == 2  # <s>
    processor = AutoProcessor.from_pretrained(merged_dir)
    ids = processor(text="the cat")["input_ids"]
    assert ids == AutoProcessor.from_pretrained(base_dir)(text="the cat")["input_ids"] and len(ids) > 2
    card = (merged_dir / "README.md").read_text()
    assert "## Fine-tuning" in card and "LoRA (r 8, alpha 16.0; in_proj, out_proj of image)" in card
    assert "AutoTokenizer.from_pretrained" in card and "2 steps of 2 x 64 tokens" in card
    reloaded = load_finetune_recipe(merged_dir / "recipe.yaml")  # the fine-tuning recipe, lora: included
    assert reloaded.lora.modalities == ["image"] and reloaded.recipe.train.max_steps == 2
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(model) is mom.MoMForCausalLM and tuple(model.config.vocab_sizes) == (2048, 512, 256)


def test_stopped_run_saves_no_adapter_and_resumes(tmp_path, capsys, corpora, random_base, one_thread):
    args = ["--base", str(random_base), "--config", str(HELDOUT_RECIPE),
            *ft_args(tmp_path, corpora["heldout"], "train.max_steps=4", "train.eval_batches=1")]
    assert main([*args, "train.stop_after=2"]) == 0
    assert "stopped at step 2 of 4" in capsys.readouterr().out
    assert not (tmp_path / "run" / "adapter").exists()
    assert main(args) == 0  # train.resume=auto: continues from the step-2 checkpoint
    out = capsys.readouterr().out
    assert "resumed from" in out and "adapter:" in out
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert summary["step"] == 4 and Path(summary["adapter_dir"], "adapter_model.safetensors").is_file()


# ---- the downstream example -----------------------------------------------------------------------------------------
TEXT_FORGETTING_BOUND = 0.05  # nats: largest allowed rise of the base corpus's validation text loss
IMAGE_FORGETTING_BOUND = 0.25  # nats: largest allowed rise of its image loss (seen classes; replay keeps it low)
HELDOUT_GAIN = 0.3  # nats: least required fall of the held-out class's validation image loss


def test_heldout_class_example(tmp_path, corpora, one_thread):
    """Pretrain a tiny base without class 9, adapt only its image experts to class 9 (recipes/finetune/
    heldout_class.yaml): the held-out image loss falls, the base's text loss stays within the bound."""
    base_recipe = Recipe.from_dict({
        "model": {"modalities": "auto", "vocab_sizes": "auto", "d_model": 32, "n_layer": 2, "d_state": 8},
        "data": {"path": str(corpora["base"]), "seq_len": 64, "batch_size": 8},
        "optim": {"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.0},
        "train": {"max_steps": 150, "log_every": 50, "eval_batches": 4, "out_dir": str(tmp_path / "base"),
                  "progress": False, "tensorboard": False, "device": "cpu", "tokenizer_dir": None},
    })
    base_dir = train(base_recipe)["hf_export"]

    code = main(["--base", base_dir, "--config", str(HELDOUT_RECIPE), "--compare", str(corpora["base"]),
                 *ft_args(tmp_path, corpora["heldout"], "data.seq_len=64", "train.max_steps=60")])
    assert code == 0
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    heldout = summary["comparison"][str(corpora["heldout"])]
    base = summary["comparison"][str(corpora["base"])]
    print("held-out image loss", heldout["before"]["loss/image"], "->", heldout["after"]["loss/image"])
    print("base text loss", base["before"]["loss/text"], "->", base["after"]["loss/text"])
    print("base image loss", base["before"]["loss/image"], "->", base["after"]["loss/image"])
    print("trainable / total", summary["trainable_params"], summary["total_params"])
    assert heldout["after"]["loss/image"] < heldout["before"]["loss/image"] - HELDOUT_GAIN
    assert base["after"]["loss/text"] < base["before"]["loss/text"] + TEXT_FORGETTING_BOUND
    assert base["after"]["loss/image"] < base["before"]["loss/image"] + IMAGE_FORGETTING_BOUND
