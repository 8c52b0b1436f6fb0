import math

import pytest
import torch
import torch.nn.functional as F
from helpers import interleaved_ids, tiny_config
from transformers import MambaConfig, MambaForCausalLM

import mom
from mom.model.config import PROJECTIONS
from mom.model.routing import RoutedLinear

RUNS = [(0, 5), (1, 9), (0, 3), (2, 11), (1, 2), (0, 6)]  # uneven interleaving of text/image/speech


def tie_experts(model: mom.MoMForCausalLM) -> None:
    """Give every modality's expert the weights of the first one."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RoutedLinear):
                first = next(iter(module.values()))
                for expert in module.values():
                    expert.load_state_dict(first.state_dict())


def dense_twin(model: mom.MoMForCausalLM) -> mom.MoMForCausalLM:
    """A decouple=() model holding the first expert of every projection."""
    cfg = mom.MoMConfig.from_dict({**model.config.to_dict(), "decouple": []})
    dense = mom.MoMForCausalLM(cfg)
    state = {}
    for k, v in model.state_dict().items():
        for p in PROJECTIONS:
            for m in cfg.modalities:
                k = k.replace(f"{p}.{m}.", f"{p}.")
        state.setdefault(k, v)
    dense.load_state_dict(state)
    return dense


def test_decoupled_with_identical_experts_equals_dense_exactly():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    tie_experts(model)
    dense = dense_twin(model).eval()
    ids = interleaved_ids(model.config, 3, RUNS)
    with torch.no_grad():
        a, b = model(ids, labels=ids), dense(ids, labels=ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loss, b.loss)


def test_experts_differ_after_init_and_change_the_output():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    in_proj = model.backbone.layers[0].mixer.in_proj
    assert not torch.equal(in_proj["text"].weight, in_proj["image"].weight)
    ids = interleaved_ids(model.config, 2, RUNS)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, dense_twin(model)(ids).logits)


def _hf_mamba(vocab_size: int) -> MambaForCausalLM:
    cfg = MambaConfig(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, state_size=4, conv_kernel=4, expand=2,
        time_step_rank=3, use_mambapy=False, layer_norm_epsilon=1e-5,
    )
    dense = MambaForCausalLM(cfg).eval()
    with torch.no_grad():  # random weights everywhere, not only the init values
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dense


@pytest.mark.parametrize("decouple", [PROJECTIONS, (), ("in_proj", "dt_proj")])
def test_from_dense_mamba_matches_transformers_mamba(decouple):
    config = tiny_config(decouple=decouple)
    dense = _hf_mamba(config.vocab_size)
    model = mom.MoMForCausalLM.from_dense_mamba(dense, config).eval()
    ids = interleaved_ids(config, 2, RUNS)
    with torch.no_grad():
        a, b = dense(ids, labels=ids), model(ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)


def test_from_dense_mamba_loads_a_checkpoint_directory(tmp_path):
    config = tiny_config()
    dense = _hf_mamba(config.vocab_size)
    dense.save_pretrained(tmp_path)
    model = mom.MoMForCausalLM.from_dense_mamba(str(tmp_path), config).eval()
    ids = interleaved_ids(config, 1, RUNS)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def test_from_dense_mamba_rejects_mismatched_sizes():
    dense = _hf_mamba(80)
    with pytest.raises(ValueError, match="d_state"):
        mom.MoMForCausalLM.from_dense_mamba(dense, tiny_config(d_state=8))
    with pytest.raises(ValueError, match="not a local directory"):
        mom.MoMForCausalLM.from_dense_mamba("/no/such/dir", tiny_config())


def test_parameter_counts():
    def n_params(model):
        return sum(p.numel() for p in model.parameters())

    cfg = tiny_config(decouple=())
    dense = mom.MoMForCausalLM(cfg)
    assert n_params(dense) == n_params(_hf_mamba(cfg.vocab_size))
    M = cfg.num_modalities
    mixer = dense.backbone.layers[0].mixer
    for p in PROJECTIONS:
        one = mom.MoMForCausalLM(tiny_config(decouple=(p,)))
        proj = sum(t.numel() for t in getattr(mixer, p).parameters())
        assert n_params(one) - n_params(dense) == (M - 1) * proj * cfg.n_layer
    full = mom.MoMForCausalLM(tiny_config())
    per_layer = sum(sum(t.numel() for t in getattr(mixer, p).parameters()) for p in PROJECTIONS)
    assert n_params(full) - n_params(dense) == (M - 1) * per_layer * cfg.n_layer


def test_modality_losses_are_means_over_targets_of_each_modality():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    ids = interleaved_ids(model.config, 2, RUNS)
    labels = ids.clone()
    labels[0, 7] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    per_token = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
    target_mod = model.config.modality_of(ids)[:, 1:]
    valid = labels[:, 1:] != -100
    for i, name in enumerate(model.config.modalities):
        sel = valid & (target_mod == i)
        torch.testing.assert_close(out.modality_losses[name], per_token[sel].mean())
    torch.testing.assert_close(out.loss, per_token[valid].mean())
    # a modality without targets reports NaN, not 0
    text_only = interleaved_ids(model.config, 1, [(0, 8)])
    with torch.no_grad():
        out = model(text_only, labels=text_only)
    assert math.isnan(out.modality_losses["image"].item()) and not math.isnan(out.modality_losses["text"].item())


def test_explicit_modality_ids_must_agree_with_the_vocabulary_ranges():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    ids = interleaved_ids(model.config, 1, [(0, 4), (1, 3), (2, 3)])
    with torch.no_grad():
        derived = model(ids).logits
        same = model(ids, modality_ids=model.config.modality_of(ids)).logits
        assert torch.equal(derived, same)
        forced = model.config.modality_of(ids)
        forced[0, 5] = 2  # an image id sent to the speech experts
        with pytest.raises(ValueError, match=r"token id \d+ belongs to 'image' but its modality id is 2 \('speech'\)"):
            model(ids, modality_ids=forced)


def test_gradients_reach_every_parameter_and_absent_experts_get_zero():
    model = mom.MoMForCausalLM(tiny_config())
    ids = interleaved_ids(model.config, 2, [(0, 6), (1, 6)])  # no speech
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if ".speech." in name:
            assert torch.count_nonzero(p.grad) == 0, name
        elif ".text." in name or ".image." in name:
            assert torch.count_nonzero(p.grad) > 0, name


def test_left_padding_with_attention_mask_equals_unpadded():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    ids = interleaved_ids(model.config, 1, RUNS)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 5:], model(ids).logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.tensor([[1, 80]])), "token id 80"),
        (dict(input_ids=torch.tensor([[1, -3]])), "token id -3"),
        (dict(input_ids=torch.tensor([[1, 2]]), modality_ids=torch.tensor([[0, 3]])), "modality id 3"),
        (dict(input_ids=torch.tensor([[1, 2]]), modality_ids=torch.tensor([[0]])), "modality_ids has shape"),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]])), "labels has shape"),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 99]])), "label 99"),
        (dict(input_ids=torch.tensor([1, 2])), "shape \\(batch, length\\)"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), "dtype torch.float32"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty"),
        (dict(input_ids=torch.zeros(0, 3, dtype=torch.long)), "empty"),
        (dict(input_ids=torch.tensor([[1, 2]]), modality_ids=torch.tensor([[0, 1]])), "modality_ids contradict"),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3)), "attention_mask has shape"),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1.0, 2.0]])), "labels must be an integer"),
    ],
)
def test_bad_inputs_raise_value_error_with_the_offending_value(kwargs, message):
    model = mom.MoMForCausalLM(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_backend_is_visible():
    assert mom.MoMForCausalLM(tiny_config()).backend == "reference"


def test_document_reset_makes_packed_documents_independent():
    docs = [[(0, 5), (1, 6)], [(2, 7), (0, 3)], [(1, 9)]]  # three documents of different modalities
    config = tiny_config(reset_at_document_boundaries=True)
    model = mom.MoMForCausalLM(config).eval()
    parts = [interleaved_ids(config, 1, runs) for runs in docs]
    packed = torch.cat(parts, dim=1)
    seq_idx = torch.cat([torch.full_like(p, i, dtype=torch.int32) for i, p in enumerate(parts)], dim=1)
    with torch.no_grad():
        alone = torch.cat([model(p).logits for p in parts], dim=1)
        reset = model(packed, seq_idx=seq_idx).logits
        flowing = model(packed).logits  # no seq_idx: state flows across documents
    torch.testing.assert_close(reset, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(flowing, alone, atol=1e-3)
    # the switch is off by default: seq_idx alone changes nothing
    plain = mom.MoMForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        assert torch.equal(plain(packed, seq_idx=seq_idx).logits, plain(packed).logits)
    # and training through the reset has gradients everywhere
    model.train()
    model(packed, labels=packed, seq_idx=seq_idx).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_checkpointing_matches_plain_backward():
    """Blocks pass (output, residual) pairs; recomputing them under checkpointing changes nothing."""
    torch.manual_seed(0)
    model = mom.MoMForCausalLM(tiny_config()).train()
    ids = interleaved_ids(model.config, 2, RUNS)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_hidden_states_are_the_residual_stream():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    ids = interleaved_ids(model.config, 1, RUNS)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        states = out.hidden_states
        assert len(states) == model.config.n_layer + 1
        torch.testing.assert_close(states[0], model.backbone.embeddings(ids).float())
        # the last state, normed and projected, gives the logits
        torch.testing.assert_close(model.lm_head(model.backbone.norm_f(states[-1])), out.logits)


def _counts_model():
    config = mom.MoMConfig(vocab_sizes=(40, 16, 8), d_model=16, n_layer=2, d_state=4)
    torch.manual_seed(0)
    model = mom.MoMForCausalLM(config)  # training mode: no cache, the checks are deferred
    ids = torch.cat([torch.randint(0, 40, (2, 9)), torch.randint(40, 56, (2, 5)), torch.randint(56, 64, (2, 3))], 1)
    return model, ids, (18, 10, 6)


def test_host_counts_give_the_same_outputs():
    model, ids, counts = _counts_model()
    ref = model(ids, labels=ids)
    for given in (counts, torch.tensor(counts)):
        out = model(ids, labels=ids, modality_counts=given)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(modality_counts=(17, 11, 6)), r"modality_counts \(17, 11, 6\) do not match .* \(18, 10, 6\)"),
        (dict(modality_counts=(18, 10)), "do not match 3 modalities"),
        (dict(bad_token=99), "token id 99 is out of range"),
        (dict(bad_label=-5), "label -5 is out of range"),
        (dict(bad_modality=7), "modality id 7 is out of range"),
    ],
)
def test_host_counts_still_name_bad_input(change, message):
    """With the counts given, the checks are read after the forward is enqueued: bad ids must not crash it first
    (the embedding sees them clamped) and still raise a ValueError naming the value, before any loss."""
    model, ids, counts = _counts_model()
    labels = ids.clone()
    if "bad_token" in change:
        ids = ids.clone()
        ids[1, 4] = change["bad_token"]
    if "bad_label" in change:
        labels[0, 2] = change["bad_label"]
    modality_ids = None
    if "bad_modality" in change:
        modality_ids = model.config.modality_of(ids)
        modality_ids[0, 0] = change["bad_modality"]
    with pytest.raises(ValueError, match=message):
        model(ids, labels=labels, modality_ids=modality_ids, modality_counts=change.get("modality_counts", counts))
    if "modality_counts" in change:  # with a cache (eval) the counts are checked before the forward, as the rest
        with pytest.raises(ValueError, match="do not match"):
            model.eval()(ids, labels=labels, modality_counts=change["modality_counts"])


def test_the_mixers_list_follows_a_replaced_mixer():
    """`MoMModel.mixers` is gathered once and again after any module assignment: a replaced mixer is the one the
    forward sees."""
    model = mom.MoMForCausalLM(tiny_config())
    backbone = model.backbone
    first = backbone.mixers()
    assert first is backbone.mixers() and first == [layer.mixer for layer in backbone.layers]
    replacement = type(first[1])(backbone.config, 1)
    backbone.layers[1].mixer = replacement
    assert backbone.mixers()[1] is replacement and backbone.mixers()[0] is first[0]
