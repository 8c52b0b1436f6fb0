"""The model follows transformers' conventions: load dtypes, special ids in the config, resizing the vocabulary,
return_dict / output_hidden_states from the config, inputs_embeds, shift_labels, logits_to_keep, checkpointing
layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import interleaved_ids, tiny_config
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

import mom
from mom.model.modeling import MoMBlock

RUNS = [(0, 5), (1, 6), (0, 2), (2, 5)]


def _model(seed: int = 0, **overrides) -> mom.MoMForCausalLM:
    torch.manual_seed(seed)
    return mom.MoMForCausalLM(tiny_config(**overrides)).eval()


def _ssm_param_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if n.endswith((".A_log", ".D"))}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_log_and_d_stay_fp32_under_every_load_dtype(tmp_path, dtype):
    _model().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert _ssm_param_dtypes(loaded) == {torch.float32}
    assert loaded.lm_head.weight.dtype == dtype
    assert loaded.backbone.layers[0].mixer.in_proj["text"].weight.dtype == dtype
    built = AutoModelForCausalLM.from_config(tiny_config(), dtype=dtype)
    assert _ssm_param_dtypes(built) == {torch.float32} and built.lm_head.weight.dtype == dtype
    if dtype == torch.bfloat16:  # and the mixed-dtype model runs
        ids = interleaved_ids(loaded.config, 1, RUNS)
        with torch.no_grad():
            assert torch.isfinite(loaded.eval()(ids).logits).all()


def test_dense_warm_start_keeps_a_log_and_d_fp32():
    config = tiny_config()
    dense_config = MambaConfig(vocab_size=config.vocab_size, hidden_size=16, num_hidden_layers=2, state_size=4,
                               conv_kernel=4, expand=2, time_step_rank=3)
    dense = MambaForCausalLM(dense_config).to(torch.bfloat16)
    model = mom.MoMForCausalLM.from_dense_mamba(dense, config)
    assert _ssm_param_dtypes(model) == {torch.float32} and model.lm_head.weight.dtype == torch.bfloat16
    mixer, dense_mixer = model.backbone.layers[0].mixer, dense.backbone.layers[0].mixer
    assert torch.equal(mixer.A_log, dense_mixer.A_log.float())


def test_config_round_trips_the_special_ids(tmp_path):
    model = _model(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, value in (("bos_token_id", 2), ("eos_token_id", 3), ("pad_token_id", 0)):
        assert getattr(loaded.config, name) == value, name
        assert getattr(loaded.generation_config, name) == value, name
    with pytest.raises(ValueError, match="eos_token_id"):
        tiny_config(eos_token_id=80)  # the unified vocabulary has 80 ids


@pytest.mark.parametrize("tied", [True, False])
def test_resize_grows_the_text_vocabulary_and_shifts_the_other_modalities(tied):
    model = _model(tie_word_embeddings=tied)
    ids = interleaved_ids(model.config, 2, RUNS)
    with torch.no_grad():
        before = model(ids).logits
    embeddings = model.resize_token_embeddings(85)
    assert model.config.vocab_sizes == (45, 24, 16) and model.config.vocab_size == 85
    assert embeddings is model.get_input_embeddings() and embeddings.weight.shape == (85, 16)
    assert model.lm_head.weight.shape == (85, 16)
    assert (model.lm_head.weight is embeddings.weight) == tied
    shifted = torch.where(ids >= 40, ids + 5, ids)  # image and speech ids move up by the 5 new text ids
    with torch.no_grad():
        after = model(shifted).logits
    old_columns = torch.cat([torch.arange(40), torch.arange(45, 85)])
    torch.testing.assert_close(after[..., old_columns], before)
    assert model.config.modality_of(torch.tensor([44, 45])).tolist() == [0, 1]  # new ids are text


def test_resize_pads_to_a_multiple_and_can_shrink_the_text_vocabulary():
    model = _model()
    model.resize_token_embeddings(81, pad_to_multiple_of=8)
    assert model.config.vocab_sizes == (48, 24, 16)
    model.resize_token_embeddings(70)
    assert model.config.vocab_sizes == (30, 24, 16) and model.lm_head.weight.shape == (70, 16)


def test_resize_refuses_before_changing_anything():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="leave no text vocabulary"):
        model.resize_token_embeddings(40)  # image + speech alone hold 40 ids
    with pytest.raises(ValueError, match="must be an int"):
        model.resize_token_embeddings(80.5)
    assert model.config.vocab_sizes == (40, 24, 16)
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    with pytest.raises(ValueError, match="sum of vocab_sizes"):
        model.config.vocab_size = 90


def test_return_dict_and_output_hidden_states_follow_the_config():
    model = _model()
    ids = interleaved_ids(model.config, 1, RUNS)
    with torch.no_grad():
        reference = model(ids, labels=ids, output_hidden_states=True)
        as_tuple = model(ids, labels=ids, return_dict=False)
        model.config.output_hidden_states = True
        by_config = model(ids)
        model.config.return_dict = False
        tuple_by_config = model(ids)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], reference.loss) and torch.equal(as_tuple[1], reference.logits)
    assert len(by_config.hidden_states) == model.config.n_layer + 1
    for a, b in zip(by_config.hidden_states, reference.hidden_states):
        assert torch.equal(a, b)
    assert isinstance(tuple_by_config, tuple) and torch.equal(tuple_by_config[0], reference.logits)


def test_inputs_embeds_give_the_logits_of_the_ids():
    model = _model()
    ids = interleaved_ids(model.config, 2, RUNS)
    with torch.no_grad():
        from_ids = model(ids, labels=ids)
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, modality_ids=model.config.modality_of(ids), labels=ids)
    assert torch.equal(from_embeds.logits, from_ids.logits) and torch.equal(from_embeds.loss, from_ids.loss)
    with pytest.raises(ValueError, match="inputs_embeds needs modality_ids"):
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=embeds)


def test_shift_labels_give_the_loss_of_labels():
    model = _model()
    ids = interleaved_ids(model.config, 2, RUNS)
    labels = ids.clone()
    labels[0, 3] = -100
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t's target, as context parallelism passes it
    with torch.no_grad():
        a, b = model(ids, labels=labels), model(ids, shift_labels=shift)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.modality_loss_sums, b.modality_loss_sums)
    # only the shifted targets count: a different `labels` beside shift_labels changes nothing
    with torch.no_grad():
        c = model(ids, labels=torch.full_like(ids, -100), shift_labels=shift)
    assert torch.equal(c.loss, a.loss)


@pytest.mark.parametrize("keep", [1, 3, torch.tensor([0, 4, 7])])
def test_logits_to_keep_equals_the_full_logits_at_those_positions(keep):
    model = _model()
    ids = interleaved_ids(model.config, 2, RUNS)
    with torch.no_grad():
        full = model(ids).logits
        kept = model(ids, logits_to_keep=keep).logits
    expected = full[:, -keep:] if isinstance(keep, int) else full[:, keep]
    torch.testing.assert_close(kept, expected)  # the same rows; a smaller matmul may round differently
    with pytest.raises(ValueError, match="labels cannot be combined with logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=keep)


def test_labels_all_ignored_give_a_zero_loss_without_gradient():
    model = _model().train()
    ids = interleaved_ids(model.config, 2, RUNS)
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    assert out.modality_target_counts.sum().item() == 0
    assert all(math.isnan(v.item()) for v in out.modality_losses.values())
    out.loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_blocks_are_transformers_checkpointing_layers(monkeypatch):
    calls = []

    def counting_checkpoint(function, *args, **kwargs):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr("transformers.modeling_utils.checkpoint", counting_checkpoint)
    model = _model().train()
    assert all(isinstance(layer, MoMBlock) for layer in model.backbone.layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = interleaved_ids(model.config, 1, RUNS)
    model(ids, labels=ids).loss.backward()
    assert len(calls) >= model.config.n_layer  # each block checkpointed (recomputed in backward)
    assert not getattr(model, "_is_stateful", False)
