"""Big-model loading of a MoM export through accelerate: ``from_pretrained(device_map=...)`` and
``init_empty_weights()`` + ``load_checkpoint_and_dispatch``, including a block offloaded to disk (accelerate's hooks
then place its weights at each module call). On CPU: the logits must equal the plainly loaded model's, A_log and D
stay fp32, and an automatic device map never splits a MoMBlock (``_no_split_modules``)."""

import pytest
import torch
from accelerate import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch
from helpers import interleaved_ids, tiny_config
from transformers import AutoModelForCausalLM

import mom
from mom.train.export import complete_export

SSM_FP32 = ("mixer.A_log", "mixer.D")
SPLIT = {"backbone.embeddings": "cpu", "backbone.layers.0": "cpu", "backbone.layers.1": "disk",
         "backbone.norm_f": "cpu", "lm_head": "cpu"}  # one block's weights read from disk at each call


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export")
    model = mom.MoMForCausalLM(tiny_config())
    model.save_pretrained(path)
    complete_export(path, model.config, None)  # config / generation ids and card, as mom-train's export
    return path


@pytest.fixture(scope="module")
def reference(export):
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    ids = interleaved_ids(model.config, 2, [(0, 6), (1, 9), (2, 5), (0, 4)], torch.Generator().manual_seed(1))
    seq_idx = torch.tensor([[0] * 12 + [1] * 12, [0] * 24])  # packed documents: conv and state restart at 12
    with torch.no_grad():
        return ids, seq_idx, model(input_ids=ids).logits, model(input_ids=ids, seq_idx=seq_idx).logits


def logits_of(model, reference):
    ids, seq_idx, *_ = reference
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids, seq_idx=seq_idx).logits


def ssm_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if n.endswith(SSM_FP32)}


@pytest.mark.parametrize("device_map", ["auto", "split"])
def test_from_pretrained_with_a_device_map(export, reference, device_map, tmp_path):
    dm = SPLIT if device_map == "split" else "auto"
    model = AutoModelForCausalLM.from_pretrained(export, device_map=dm, offload_folder=tmp_path / "offload").eval()
    if device_map == "split":
        assert model.hf_device_map == SPLIT
        assert model.backbone.layers[1].mixer.conv1d.weight.device.type == "meta"  # offloaded: placed at each call
    plain, packed = logits_of(model, reference)
    torch.testing.assert_close(plain, reference[2], rtol=0, atol=0)
    torch.testing.assert_close(packed, reference[3], rtol=0, atol=0)
    assert ssm_dtypes(model) == {torch.float32}


def test_bf16_device_map_keeps_a_log_and_d_fp32(export, reference):
    mapped = AutoModelForCausalLM.from_pretrained(export, device_map="auto", dtype=torch.bfloat16).eval()
    plain = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).eval()
    assert ssm_dtypes(mapped) == {torch.float32}
    assert mapped.backbone.layers[0].mixer.in_proj.text.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits_of(mapped, reference), logits_of(plain, reference), rtol=0, atol=0)


@pytest.mark.parametrize("device_map", ["auto", "split"])
def test_init_empty_weights_then_load_checkpoint_and_dispatch(export, reference, device_map, tmp_path):
    config = mom.MoMConfig.from_pretrained(export)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    assert {p.device.type for p in model.parameters()} == {"meta"}  # nothing allocated
    model.tie_weights()  # as for every transformers model: from_config under init_empty_weights leaves them untied
    model = load_checkpoint_and_dispatch(model, str(export), device_map=SPLIT if device_map == "split" else "auto",
                                         no_split_module_classes=model._no_split_modules,
                                         offload_folder=str(tmp_path / "offload")).eval()
    if device_map == "auto":
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert model.lm_head.weight is model.backbone.embeddings.weight  # still tied
    plain, packed = logits_of(model, reference)
    torch.testing.assert_close(plain, reference[2], rtol=0, atol=0)
    torch.testing.assert_close(packed, reference[3], rtol=0, atol=0)
    assert ssm_dtypes(model) == {torch.float32}


def test_an_automatic_map_never_splits_a_block(export):
    config = mom.MoMConfig.from_pretrained(export)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    block = sum(p.numel() * p.element_size() for p in model.backbone.layers[0].parameters())
    device_map = infer_auto_device_map(model, max_memory={"cpu": int(1.5 * block)},
                                       no_split_module_classes=model._no_split_modules)
    assert "disk" in device_map.values()  # the budget forced a split somewhere
    for name in device_map:
        assert ".mixer" not in name and ".norm." not in name, device_map  # whole blocks (or larger) only


def test_generate_with_an_offloaded_block_equals_the_plain_model(export, reference, tmp_path):
    """Decoding calls the offloaded block's modules (accelerate places their weights at each call), so it gives the
    plainly loaded model's tokens."""
    ids = reference[0][:, :10]
    plain = AutoModelForCausalLM.from_pretrained(export).eval()
    split = AutoModelForCausalLM.from_pretrained(export, device_map=SPLIT, offload_folder=tmp_path / "offload").eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(split.generate(ids, **kwargs), plain.generate(ids, **kwargs))
