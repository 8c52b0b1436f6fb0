"""`mom-train` / `mom-flops` / `mom-compare` in the Transfusion setting: the recipe's ``model.setting``, a MoM and its
dense twin trained on a latent corpus, their comparison, and the sized recipes."""

from pathlib import Path

import pytest
import torch
from helpers import TinyVAE
from transformers import AutoModelForCausalLM

import mom
from mom.cli.flops import main as flops_main
from mom.cli.train import main as train_main
from mom.data.images import iter_image_records
from mom.data.latent_corpus import build_latent_corpus
from mom.evaluation.compare import read_run, report
from mom.tokenization.multimodal import MultimodalTokenizer
from mom.train.loop import train
from mom.train.recipe import load_recipe
from mom.train.resolve import resolve_model_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny_transfusion_mom.yaml"


def _raise(error):
    raise error


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    records = iter_image_records("folder", path=str(ROOT / "data" / "small" / "raw" / "images"), size=16, limit=24,
                                 on_error=_raise)
    out = tmp_path_factory.mktemp("latent") / "corpus"
    build_latent_corpus(records, TinyVAE(16), MultimodalTokenizer.load(ROOT / "tokenizers" / "small"), out,
                        patch_size=2, validation_fraction=0.2)
    return out




def test_mom_and_dense_train_and_compare(corpus, tmp_path, one_thread):
    fast = [f"data.path={corpus}", "model.latent_size=4", "model.d_model=16", "data.seq_len=32", "data.batch_size=2",
            "train.max_steps=4", "train.log_every=2", "train.eval_every=2", "train.eval_batches=1",
            "train.save_every=0", "train.tensorboard=false", "train.progress=false", "optim.warmup_steps=1"]
    runs = {}
    for name, decouple in (("mom", "[in_proj,x_proj,dt_proj,out_proj]"), ("dense", "[]")):
        recipe = load_recipe(TINY, [*fast, f"model.decouple={decouple}", f"train.out_dir={tmp_path / name}"])
        result = train(recipe)
        assert all(torch.isfinite(torch.tensor(result["validation"][k])) for k in ("loss/text", "loss/image"))
        runs[name] = tmp_path / name
    model = AutoModelForCausalLM.from_pretrained(runs["mom"] / "hf")
    assert isinstance(model, mom.MoMTransfusionForCausalLM) and model.config.decouple
    curves = [read_run(n, [runs[n]]) for n in ("mom", "dense")]
    text = report(curves, curves[1])
    assert "image" in text and "text" in text


def test_recipe_setting_and_sized_recipes(capsys):
    for name in ("t2i_160m_transfusion_mom.yaml", "t2i_160m_transfusion_dense.yaml"):
        config = resolve_model_config(load_recipe(ROOT / "recipes" / name))
        assert isinstance(config, mom.MoMTransfusionConfig) and config.d_model == 1024
        assert flops_main(["--config", str(ROOT / "recipes" / name)]) == 0
        assert "noise_head" in capsys.readouterr().out
        assert train_main(["--config", str(ROOT / "recipes" / name), "--dry-run"]) == 0
        assert "setting: transfusion" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"patch_size=2: unknown key \(a key of model.setting: transfusion\)"):
        load_recipe(ROOT / "recipes" / "tiny_mom.yaml", ["model.patch_size=2"])
    with pytest.raises(ValueError, match="model.setting"):
        load_recipe(TINY, ["model.setting=continuous"])


def test_lora_preset_reaches_the_image_experts_and_modules():
    from helpers import tiny_transfusion_config

    from mom.train.lora import LoraSettings, wrap

    model = mom.MoMTransfusionForCausalLM(tiny_transfusion_config())
    settings = LoraSettings(projections=["in_proj", "out_proj"], modalities=["image"], train_image_modules=True)
    peft_model = wrap(model, settings)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    for module in ("image_in", "time_embed", "noise_head"):
        assert any(f".{module}.modules_to_save." in n for n in trainable), module
    assert any("in_proj.image.lora_A" in n for n in trainable)
    assert not any("in_proj.text.lora_A" in n for n in trainable)
    cfg = model.config
    ids = torch.tensor([[2, 10, 4, *([cfg.image_token_id] * 4), 5, 3]])
    out = peft_model(input_ids=ids, labels=ids, latents=torch.randn(1, 9, 16))
    out.loss.backward()
    assert torch.isfinite(out.modality_losses["image"])
    with pytest.raises(ValueError, match="image_in"):  # a discrete base has no image modules
        wrap(mom.MoMForCausalLM(mom.MoMConfig(vocab_sizes=(40, 8, 8), d_model=16, n_layer=1)), settings)


def test_flops_of_a_saved_model_and_a_discrete_recipe_on_a_latent_corpus(corpus, tmp_path, capsys):
    from helpers import tiny_transfusion_config

    tiny_transfusion_config().save_pretrained(tmp_path)
    assert flops_main(["--model-json", str(tmp_path)]) == 0
    assert "noise_head" in capsys.readouterr().out
    with pytest.raises(ValueError, match="set model.setting: transfusion"):
        resolve_model_config(load_recipe(ROOT / "recipes" / "tiny_mom.yaml", [f"data.path={corpus}"]))
