"""LoRA on MoM (mom.train.lora): target resolution, freezing policy, save / load / merge round trips.

These tests also pin that LoRA on an expert takes effect in every forward path (routed training path, the
single-modality inference shortcut): a future fused GPU path must defer to module calls when adapters are present.
"""

import copy

import pytest
import torch
from helpers import interleaved_ids, tiny_config
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

import mom
from mom.train.lora import (
    EXTRA_PARAMS_FILE,
    LoraSettings,
    load_adapter,
    parameter_counts,
    preset_targets,
    resolve_targets,
    save_adapter,
    valid_target_names,
    wrap,
)

TEXT, IMAGE = 0, 1


def settings(**kw) -> LoraSettings:
    return LoraSettings.from_dict({"r": 2, "alpha": 4, **kw})


def model_of(**cfg) -> mom.MoMForCausalLM:
    return mom.MoMForCausalLM(tiny_config(**cfg)).eval()


def lora_modules(peft_model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def train_steps(peft_model, ids, steps=3, lr=0.05) -> None:
    """A few SGD steps on the trainable parameters (stand-in for the trainer)."""
    peft_model.train()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def mixed_ids():
    return interleaved_ids(tiny_config(), 2, [(TEXT, 5), (IMAGE, 7), (TEXT, 4)])


# ---- settings --------------------------------------------------------------------------------------
def test_settings_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="lora.rank: unknown key"):
        LoraSettings.from_dict({"rank": 4, "projections": ["in_proj"]})
    with pytest.raises(ValueError, match="lora.r"):
        settings(r=0, projections=["in_proj"])
    with pytest.raises(ValueError, match="lora.dropout"):
        settings(dropout=1.5, projections=["in_proj"])
    with pytest.raises(ValueError, match="unknown projection.*'conv'"):
        settings(projections=["conv"])
    with pytest.raises(ValueError, match="nothing to adapt"):
        settings()
    with pytest.raises(ValueError, match="lora.modalities: only used with projections"):
        settings(modalities=["image"], target_modules=["x_proj.text"])
    with pytest.raises(ValueError, match="train_conv"):
        settings(projections=["in_proj"], train_conv="yes")


# ---- target names ----------------------------------------------------------------------------------
def test_preset_targets_per_modality_and_shared():
    config = tiny_config(decouple=("in_proj", "out_proj"))
    assert preset_targets(config, ["in_proj", "out_proj"], ["image"]) == ["in_proj.image", "out_proj.image"]
    assert preset_targets(config, ["in_proj", "x_proj"], None) == ["in_proj.text", "in_proj.image",
                                                                    "in_proj.speech", "x_proj"]
    with pytest.raises(ValueError, match="'x_proj' is shared by all modalities.*target_modules: \\[x_proj\\]"):
        preset_targets(config, ["x_proj"], ["image"])
    with pytest.raises(ValueError, match="unknown modality.*'video'.*'text', 'image', 'speech'"):
        preset_targets(config, ["in_proj"], ["video"])


def test_dotted_suffix_targets_exactly_the_image_experts():
    peft_model = wrap(model_of(), settings(projections=["in_proj", "out_proj"], modalities=["image"]))
    expected = {f"backbone.layers.{i}.mixer.{p}.image" for i in range(2) for p in ("in_proj", "out_proj")}
    assert lora_modules(peft_model) == expected


def test_shared_projection_targeted_when_asked_for_every_modality():
    base = model_of(decouple=("in_proj",))
    peft_model = wrap(base, settings(projections=["out_proj"]))
    assert lora_modules(peft_model) == {f"backbone.layers.{i}.mixer.out_proj" for i in range(2)}


def test_raw_targets_validated_before_training():
    base = model_of(decouple=("in_proj",))
    valid = valid_target_names(base)
    assert {"in_proj.image", "x_proj", "conv1d"} <= set(valid)
    with pytest.raises(ValueError, match=r"'in_proj\.video' matches no module.*in_proj\.image"):
        resolve_targets(base, settings(target_modules=["in_proj.video"]))
    with pytest.raises(ValueError, match="per-modality projection.*'in_proj.text'"):
        resolve_targets(base, settings(target_modules=["in_proj"]))
    with pytest.raises(ValueError, match="'mixer'.*MoMMixer.*cannot wrap"):
        resolve_targets(base, settings(target_modules=["mixer"]))
    with pytest.raises(ValueError, match="tied"):
        resolve_targets(base, settings(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="both a LoRA target"):
        resolve_targets(base, settings(target_modules=["in_proj.image"], modules_to_save=["in_proj"]))
    with pytest.raises(ValueError, match="modules_to_save: 'conv2d' matches no module"):
        resolve_targets(base, settings(projections=["x_proj"], modules_to_save=["conv2d"]))
    with pytest.raises(ValueError, match="regex.*matches no module"):
        resolve_targets(base, settings(target_modules=r".*\.nothing"))


def test_regex_target():
    peft_model = wrap(model_of(), settings(target_modules=r"backbone\.layers\.1\.mixer\.x_proj\.(image|speech)"))
    assert lora_modules(peft_model) == {"backbone.layers.1.mixer.x_proj.image", "backbone.layers.1.mixer.x_proj.speech"}


# ---- freezing policy and counts ----------------------------------------------------------------------
def test_only_lora_factors_train_by_default_and_counts_are_exact():
    base = model_of()
    total_base = sum(p.numel() for p in base.parameters())
    peft_model = wrap(base, settings(projections=["in_proj", "out_proj"], modalities=["image"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    cfg = base.config
    per_layer = 2 * (cfg.d_model + 2 * cfg.d_inner) + 2 * (cfg.d_inner + cfg.d_model)  # r=2: r * (in + out) each
    assert parameter_counts(peft_model) == (cfg.n_layer * per_layer, total_base + cfg.n_layer * per_layer)


def test_conv_and_ssm_params_train_only_when_asked():
    peft_model = wrap(model_of(), settings(projections=["in_proj"], modalities=["image"], train_conv=True,
                                           train_A_D=True))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert "base_model.model.backbone.layers.0.mixer.conv1d.modules_to_save.default.weight" in trainable
    assert "base_model.model.backbone.layers.1.mixer.A_log" in trainable
    assert "base_model.model.backbone.layers.1.mixer.D" in trainable
    assert not any("conv1d.original_module" in n or "base_layer" in n for n in trainable)


# ---- behaviour pinned for every forward path -----------------------------------------------------------
def test_image_adapter_leaves_pure_text_untouched_and_applies_on_every_image_path(mixed_ids):
    base = model_of()
    # Frozen like the wrapped base: PyTorch's matmul may take another (equally exact) kernel for a weight that
    # requires grad, which changes the last bits.
    reference = copy.deepcopy(base).requires_grad_(False)
    peft_model = wrap(base, settings(projections=["in_proj", "out_proj"], modalities=["image"]))
    for n, p in peft_model.named_parameters():
        if ".lora_B." in n:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero update (LoRA B starts at zero)
    text = interleaved_ids(base.config, 2, [(TEXT, 12)])
    image = interleaved_ids(base.config, 2, [(IMAGE, 12)])
    assert torch.equal(logits(peft_model, text), logits(reference, text))
    assert not torch.allclose(logits(peft_model, image), logits(reference, image))  # single-modality shortcut
    assert not torch.allclose(logits(peft_model, mixed_ids), logits(reference, mixed_ids))  # routed path
    with torch.enable_grad():  # training path routes even one modality
        assert not torch.allclose(peft_model(input_ids=image).logits, reference(input_ids=image).logits)


# ---- only adapters change; save / load / merge / export --------------------------------------------------
def test_training_changes_only_adapters_and_round_trips(tmp_path, mixed_ids):
    base_dir = tmp_path / "base"
    model_of().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = {n: p.detach().clone() for n, p in base.state_dict().items()}
    s = settings(projections=["in_proj", "out_proj", "x_proj"], modalities=["image"], dropout=0.1)
    peft_model = wrap(base, s)
    untrained = logits(peft_model, mixed_ids)
    train_steps(peft_model, mixed_ids)
    tuned = logits(peft_model, mixed_ids)
    assert not torch.allclose(tuned, untrained)
    after = peft_model.get_base_model().state_dict()
    for name, value in before.items():  # base weights bit-identical (peft names base weights `*.base_layer.*`)
        key = name if name in after else name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert torch.equal(after[key], value), name

    adapter = save_adapter(peft_model, tmp_path / "adapter", s)
    with pytest.raises(FileExistsError, match="already exists"):
        save_adapter(peft_model, adapter, s)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    torch.testing.assert_close(logits(reloaded, mixed_ids), tuned, rtol=0, atol=0)

    merged = reloaded.merge_and_unload()
    assert type(merged) is mom.MoMForCausalLM
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, mixed_ids), tuned, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(exported) is mom.MoMForCausalLM
    torch.testing.assert_close(logits(exported, mixed_ids), tuned, rtol=1e-5, atol=1e-5)


def test_conv_and_ssm_training_round_trip(tmp_path, mixed_ids):
    base_dir = tmp_path / "base"
    model_of().save_pretrained(base_dir)
    s = settings(projections=["in_proj"], modalities=["image"], train_conv=True, train_A_D=True)
    peft_model = wrap(AutoModelForCausalLM.from_pretrained(base_dir), s)
    train_steps(peft_model, mixed_ids)
    tuned = logits(peft_model, mixed_ids)
    adapter = save_adapter(peft_model, tmp_path / "adapter", s)
    assert (adapter / EXTRA_PARAMS_FILE).is_file()

    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    a_log = fresh.backbone.layers[0].mixer.A_log.detach().clone()
    reloaded = load_adapter(fresh, adapter).eval()
    assert not torch.equal(reloaded.get_base_model().backbone.layers[0].mixer.A_log, a_log)  # A_log restored
    torch.testing.assert_close(logits(reloaded, mixed_ids), tuned, rtol=0, atol=0)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(logits(merged, mixed_ids), tuned, rtol=1e-5, atol=1e-5)


def test_load_adapter_rejects_non_adapter_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model_of(), tmp_path)


# ---- on CUDA in bf16 the adapters must act and merge exactly as on CPU ----------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_adapters_are_honoured_and_merge_matches():
    """On CUDA in bf16 (where a fast routed path may one day read expert weights directly) the adapters must act,
    and the adapted model must match its merged twin."""
    config = tiny_config(d_model=32, dt_rank=16, d_state=8)
    base = mom.MoMForCausalLM(config).cuda().to(torch.bfloat16).eval()
    ids = interleaved_ids(config, 2, [(TEXT, 24), (IMAGE, 40), (TEXT, 16)]).cuda()
    base_logits = logits(base, ids)
    peft_model = wrap(base, settings(projections=list(mom.model.config.PROJECTIONS), modalities=["image"]))
    for n, p in peft_model.named_parameters():
        if ".lora_B." in n:
            torch.nn.init.normal_(p, std=0.2)
    adapted = logits(peft_model, ids)
    merged_logits = logits(peft_model.merge_and_unload(), ids)
    assert (adapted - base_logits).abs().max() > 0.5
    torch.testing.assert_close(merged_logits, adapted, rtol=0.05, atol=0.1)  # bf16 rounding of merged weights
