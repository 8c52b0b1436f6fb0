"""LoRA's ``train_A_D`` reaches every SSM decay / skip parameter the model lists (`ssm_parameters`): Mamba-1's and
Mamba-2's mixers (with Mamba-2's dt_bias) and the selective channel mixer; they train, get gradients and stay fp32."""

import pytest
import torch
from helpers import interleaved_ids, tiny_config
from transformers import AutoModelForCausalLM

import mom
from mom.train.lora import EXTRA_PARAMS_FILE, LoraSettings, adapter_filter, load_adapter, save_adapter, ssm_params, wrap

RUNS = [(0, 5), (1, 7), (2, 4)]
SELECTIVE = dict(channel_mixer="selective", channel_groups=4, channel_d_state=3)
MAMBA2 = dict(mixer="mamba2", d_model=16, d_state=4, headdim=8, ngroups=2, chunk_size=8)
# (config overrides, the SSM parameter names of layer 0, written out by hand: what train_A_D must reach)
CASES = {
    "mamba": ({}, {"mixer.A_log", "mixer.D"}),
    "mamba2": (MAMBA2, {"mixer.A_log", "mixer.D", "mixer.dt_bias"}),
    "selective": (SELECTIVE, {"mixer.A_log", "mixer.D", "channel_mixer.A_log", "channel_mixer.D"}),
    "mamba2+selective": ({**MAMBA2, **SELECTIVE}, {"mixer.A_log", "mixer.D", "mixer.dt_bias", "channel_mixer.A_log",
                                                   "channel_mixer.D"}),
}


def settings(**kw) -> LoraSettings:
    return LoraSettings.from_dict({"r": 2, "alpha": 4, "projections": ["in_proj"], "modalities": ["image"], **kw})


def expected_names(config: mom.MoMConfig, layer0: set[str]) -> set[str]:
    return {f"backbone.layers.{i}.{n}" for i in range(config.n_layer) for n in layer0}


def bf16_base(tmp_path, overrides) -> tuple[mom.MoMForCausalLM, torch.Tensor]:
    """A base saved and loaded in bf16 (as a fine-tuning run loads it), and interleaved ids."""
    torch.manual_seed(0)
    mom.MoMForCausalLM(tiny_config(**overrides)).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    ids = interleaved_ids(base.config, 2, RUNS, generator=torch.Generator().manual_seed(0))
    return base, ids


@pytest.mark.parametrize("case", list(CASES))
def test_ssm_parameters_are_every_decay_and_skip_parameter(case):
    overrides, layer0 = CASES[case]
    model = mom.MoMForCausalLM(tiny_config(**overrides))
    names = {n for n, _ in model.ssm_parameters()}
    assert names == expected_names(model.config, layer0)
    params = dict(model.named_parameters())
    assert all(p is params[n] for n, p in model.ssm_parameters())  # the model's own Parameters, by their names


@pytest.mark.parametrize("case", ["mamba", "mamba2", "selective"])
def test_train_A_D_trains_every_ssm_parameter_in_fp32(case, tmp_path):
    overrides, layer0 = CASES[case]
    base, ids = bf16_base(tmp_path, overrides)
    s = settings(train_A_D=True)
    peft_model = wrap(base, s)
    ssm = dict(ssm_params(peft_model))
    assert set(ssm) == expected_names(base.config, layer0)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in ssm.values())
    assert base.backbone.layers[0].mixer.in_proj.image.base_layer.weight.dtype == torch.bfloat16  # the rest: bf16
    allowed = adapter_filter(peft_model, s)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in peft_model.named_parameters() if allowed(n, p)}
    assert {n.removeprefix("base_model.model.") for n in trainable if ".lora_" not in n} == set(ssm)

    before = {n: p.detach().clone() for n, p in ssm.items()}
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    for n, p in ssm.items():
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, n
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1).step()
    for n, p in ssm.items():
        assert p.dtype == torch.float32 and not torch.equal(p.detach(), before[n]), n

    # without train_A_D they stay frozen, and the policy refuses them
    frozen = wrap(AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16), settings())
    assert not any(p.requires_grad for _, p in ssm_params(frozen))
    assert not any(adapter_filter(frozen, settings())(n, p) for n, p in ssm_params(frozen))


def test_channel_mixer_and_mamba2_ssm_params_round_trip_through_the_adapter(tmp_path):
    overrides = {**MAMBA2, **SELECTIVE}
    base, ids = bf16_base(tmp_path, overrides)
    s = settings(train_A_D=True)
    peft_model = wrap(base, s)
    with torch.no_grad():
        for _, p in ssm_params(peft_model):
            p.add_(0.25)  # a trained value the fresh base does not have
    adapter = save_adapter(peft_model, tmp_path / "adapter", s)
    assert (adapter / EXTRA_PARAMS_FILE).is_file()
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    reloaded = load_adapter(fresh, adapter)
    tuned, restored = dict(ssm_params(peft_model)), dict(ssm_params(reloaded))
    assert set(restored) == expected_names(fresh.config, CASES["mamba2+selective"][1])
    for n, p in restored.items():
        assert p.dtype == torch.float32 and torch.equal(p, tuned[n]), n
