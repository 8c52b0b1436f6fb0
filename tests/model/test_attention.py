"""Hybrid attention layers (mom.model.attention): the mixer against a hand-written causal softmax loop, the model's
key/value cache through every generate() path, save / load, LoRA, FLOPs, and the config's checks."""

import math
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_left_padded_generate_equals_each_row_alone,
    interleaved_ids,
    needs_generate_cache,
    tiny_config,
    train_losses,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

import mom
from mom.model import flops
from mom.model import mixer as mixer_module
from mom.model.attention import ATTENTION_PROJECTIONS, ROPE_BASE, AttentionMixer
from mom.model.graph import DecodeGraphs
from mom.model.mixer import sorted_stream
from mom.model.routing import RoutedLinear, Routing
from mom.ops import scan_ops

RUNS = [(0, 3), (1, 4), (2, 3), (0, 2)]  # l = 12, every modality


def hybrid_config(**overrides) -> mom.MoMConfig:
    """tiny_config with 3 blocks, the middle one attention (2 heads of 8)."""
    kwargs = dict(n_layer=3, attention_layers=(1,), attention_heads=2)
    kwargs.update(overrides)
    return tiny_config(**kwargs)


def _model(seed: int = 0, **overrides) -> mom.MoMForCausalLM:
    torch.manual_seed(seed)
    return mom.MoMForCausalLM(hybrid_config(**overrides)).eval()


def _ids(config, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return interleaved_ids(config, batch, RUNS, generator=torch.Generator().manual_seed(seed))


# ---- the mixer against a loop ------------------------------------------------------------------------------------
def _expert_apply(proj, x: torch.Tensor, modality: int, modalities) -> torch.Tensor:
    expert = proj[modalities[modality]] if isinstance(proj, RoutedLinear) else proj
    return expert(x)


def _rotate(x: torch.Tensor, position: int) -> torch.Tensor:
    """One head's vector (dh,) rotated pair by pair: (x_i, x_{i+dh/2}) by position * base^(-2i/dh)."""
    dh, out = x.shape[0], x.clone()
    for i in range(dh // 2):
        angle = position * ROPE_BASE ** (-2 * i / dh)
        a, b = x[i], x[i + dh // 2]
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + dh // 2] = b * math.cos(angle) + a * math.sin(angle)
    return out


def reference_attention(mixer: AttentionMixer, hidden, modality_ids, modalities, valid, doc_start) -> torch.Tensor:
    """Token by token, head by head: each query's softmax over the real keys of its document up to itself; a
    position counts the real tokens of its document before it."""
    b, l, d = hidden.shape
    h, dh = mixer.n_heads, mixer.d_head
    out = torch.zeros(b, l, d)
    for r in range(b):
        doc = [0] * l
        for t in range(1, l):
            doc[t] = doc[t - 1] + int(doc_start[r, t])
        pos = [sum(int(valid[r, s]) for s in range(t) if doc[s] == doc[t]) for t in range(l)]
        proj = {n: [_expert_apply(getattr(mixer, n), hidden[r, t], int(modality_ids[r, t]), modalities)
                    for t in range(l)] for n in ("q_proj", "k_proj", "v_proj")}
        for t in range(l):
            if not valid[r, t]:
                continue  # padded queries: output never read
            keys = [s for s in range(t + 1) if valid[r, s] and doc[s] == doc[t]]
            y = torch.zeros(d)
            for head in range(h):
                sl = slice(head * dh, (head + 1) * dh)
                q = _rotate(proj["q_proj"][t][sl], pos[t])
                scores = torch.stack([q @ _rotate(proj["k_proj"][s][sl], pos[s]) / math.sqrt(dh) for s in keys])
                weights = torch.softmax(scores, dim=0)
                y[sl] = sum(w * proj["v_proj"][s][sl] for w, s in zip(weights, keys))
            out[r, t] = _expert_apply(mixer.o_proj, y, int(modality_ids[r, t]), modalities)
    return out


@pytest.mark.parametrize("case", ["plain", "left padding", "documents"])
@pytest.mark.parametrize("decouple", [("in_proj", "out_proj"), ()], ids=["mom", "dense"])
def test_mixer_equals_a_causal_softmax_loop(case, decouple):
    config = hybrid_config(decouple=decouple, bias=True)
    torch.manual_seed(0)
    mixer = mom.MoMForCausalLM(config).backbone.layers[1].mixer
    assert isinstance(mixer, AttentionMixer)
    b, l = 2, 9
    hidden = torch.randn(b, l, config.d_model)
    modality_ids = torch.randint(0, 3, (b, l))
    valid = torch.ones(b, l, dtype=torch.bool)
    doc_start = torch.zeros(b, l, dtype=torch.bool)
    mask = start = None
    if case == "left padding":
        valid[1, :4] = False
        mask = valid.long()
    if case == "documents":
        doc_start[0, 3] = doc_start[0, 7] = doc_start[1, 5] = True
        start = doc_start
    with torch.no_grad():
        got = mixer(hidden, Routing.build(modality_ids, 3), mask=mask, doc_start=start)
        expected = reference_attention(mixer, hidden, modality_ids, config.modalities, valid, doc_start)
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_projections_follow_decouple():
    mixer = _model(decouple=("in_proj",)).backbone.layers[1].mixer
    assert all(isinstance(getattr(mixer, n), RoutedLinear) for n in ("q_proj", "k_proj", "v_proj"))
    assert type(mixer.o_proj) is torch.nn.Linear
    mixer = _model(decouple=("x_proj", "out_proj")).backbone.layers[1].mixer
    assert isinstance(mixer.o_proj, RoutedLinear) and type(mixer.q_proj) is torch.nn.Linear
    assert not mixer.fast_path_applies()


def test_dense_twin_equals_mom_with_tied_experts():
    dense = _model(decouple=())
    moe = _model(seed=1)
    dense_params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, param in moe.named_parameters():
            parts = name.split(".")
            shared = ".".join(p for p in parts if p not in moe.config.modalities)
            param.copy_(dense_params[shared])
    ids = _ids(moe.config)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


# ---- the key/value cache -----------------------------------------------------------------------------------------
def test_step_by_step_and_chunks_equal_the_full_forward():
    model = _model(decouple=("in_proj", "out_proj"))  # o and q/k/v experts and Mamba experts
    ids = _ids(model.config)
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :4], use_cache=True).cache
        steps = [model.decode_logits(ids[:, t : t + 1], cache) for t in range(4, 8)]
        chunk = model(ids[:, 8:], cache=cache, use_cache=True).logits  # 4 tokens at once after the prefix
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk, full[:, 8:], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]
    assert cache.attention_keys[1].shape == (2, 2, ids.shape[1], 8)
    assert cache.conv_states[1].shape[1] == 0 and cache.conv_states[0].shape[1] == model.config.d_inner
    assert cache.is_linear == [True, False, True]


@needs_generate_cache
def test_generate_with_cache_equals_full_reforward():
    model = _model()
    prompt = _ids(model.config)[:, :6]
    with_cache = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    without = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache.sequences, without)
    assert with_cache.cache.get_seq_length() == with_cache.sequences.shape[1] - 1
    continued = model.generate(with_cache.sequences, cache=with_cache.cache, max_new_tokens=3, do_sample=False)
    assert torch.equal(continued, model.generate(prompt, max_new_tokens=9, do_sample=False))


@needs_generate_cache
def test_beam_search_reorders_the_key_value_cache():
    model = _model()
    prompt = _ids(model.config)[:, :6]
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_cache_reorder_repeat_crop_and_reset():
    model = _model()
    ids = _ids(model.config, batch=3)
    with torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).cache
    keys = cache.attention_keys[1].clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.attention_keys[1], keys[[2, 2, 0]])
    cache.batch_repeat_interleave(2)
    assert cache.attention_values[1].shape[0] == 6 and cache.attention_valid[1].shape == (6, 5)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.attention_keys[1].shape == (6, 2, 0, 8)

    with torch.no_grad():
        reference = model(ids[:, :7], use_cache=True).cache
        cache = mom.MoMCache(model.config)
        cache.activate_past_recording(recurrent_states_to_keep=4)
        model(ids[:, :10], cache=cache, use_cache=True)  # the last 4 recorded
        cache.crop(-3)
    assert cache.get_seq_length() == 7
    for name in ("attention_keys", "attention_values", "attention_valid"):
        torch.testing.assert_close(getattr(cache, name)[1], getattr(reference, name)[1], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        after = model(ids[:, 7:9], cache=cache, use_cache=True).logits
        expected = model(ids[:, :9]).logits[:, 7:9]
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


@needs_generate_cache
def test_assisted_decoding_equals_greedy():
    model, assistant = _model(0), _model(1)  # drafts get rejected: the cache is cropped
    prompt = _ids(model.config, batch=1)[:, :5]
    greedy = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, assistant_model=assistant), greedy)


def test_models_with_attention_decode_eagerly():
    """A CUDA graph captures fixed-size states; the growing key/value cache makes `DecodeGraphs.applies` say no."""
    graphs = DecodeGraphs(capture=lambda fn, pool: fn, device_type="cpu")
    ids = torch.zeros(2, 1, dtype=torch.long)
    pure = mom.MoMForCausalLM(tiny_config()).eval()
    hybrid = _model()
    with torch.no_grad():
        assert graphs.applies(pure, ids, mom.MoMCache(pure.config, batch_size=2))
        cache = mom.MoMCache(hybrid.config, batch_size=2)
        assert not cache.fixed_size and not graphs.applies(hybrid, ids, cache)


@needs_generate_cache
def test_generate_with_left_padding_equals_each_row_alone():
    model = _model(pad_token_id=0)
    assert_left_padded_generate_equals_each_row_alone(model)


def test_document_boundaries_isolate_packed_documents():
    model = _model(reset_at_document_boundaries=True)
    first, second = interleaved_ids(model.config, 1, [(0, 4), (1, 3)]), interleaved_ids(model.config, 1, [(2, 5)])
    packed = torch.cat([first, second], dim=1)
    seq_idx = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        logits = model(packed, seq_idx=seq_idx).logits
        cache = model(packed, seq_idx=seq_idx, use_cache=True).cache
        torch.testing.assert_close(logits[:, 7:], model(second).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[:, :7], model(first).logits, atol=1e-5, rtol=1e-5)
        assert cache.attention_valid[1].tolist() == [[False] * 7 + [True] * 5]  # later tokens see the last document
        alone = model(second, use_cache=True).cache
        nxt = interleaved_ids(model.config, 1, [(0, 1)])
        # the attention layer continues as after the document alone (the Mamba conv window is the mixer's own matter)
        attn = model.backbone.layers[1].mixer
        hidden = torch.randn(1, 1, model.config.d_model)
        routing = Routing.build(model.config.modality_of(nxt), 3)
        torch.testing.assert_close(attn.step(hidden, routing, cache), attn.step(hidden, routing, alone))


# ---- the model around it -----------------------------------------------------------------------------------------
def test_save_and_load_through_auto_model(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.backbone.layers[1].mixer, AttentionMixer)
    assert loaded.config.attention_layers == (1,) and loaded.config.attention_heads == 2
    ids = _ids(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_lora_preset_wraps_attention_experts_and_changes_outputs():
    pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    from mom.train.lora import LoraSettings, wrap

    model = _model()
    ids = _ids(model.config)
    with torch.no_grad():
        before = model(ids).logits
    settings = LoraSettings.from_dict({"projections": list(ATTENTION_PROJECTIONS), "modalities": ["image"], "r": 2})
    peft_model = wrap(model, settings)
    wrapped = {n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {f"base_model.model.backbone.layers.1.mixer.{p}.image" for p in ATTENTION_PROJECTIONS}
    for module in peft_model.modules():  # LoRA starts as a no-op (B = 0): give B values
        if isinstance(module, LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits
    image = model.config.modality_of(ids) == 1
    first_image = int(image[0].nonzero()[0])
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after[:, :first_image], before[:, :first_image])  # before any image token: unchanged
    dense = mom.MoMForCausalLM(hybrid_config(decouple=())).eval()
    with pytest.raises(ValueError, match="'q_proj' is shared"):
        wrap(dense, LoraSettings.from_dict({"projections": ["q_proj"], "modalities": ["image"]}))


def test_sorted_stream_is_off_with_an_attention_layer(monkeypatch):
    """The fast path's sorted residual stream is for Mamba-1 mixers only (forced on here, as on a GPU)."""

    monkeypatch.setattr(scan_ops, "runs_on", lambda t: True)
    pure = mom.MoMForCausalLM(tiny_config())
    ids = torch.zeros(1, 2, dtype=torch.long)
    assert sorted_stream([layer.mixer for layer in pure.backbone.layers], ids)
    assert not sorted_stream([layer.mixer for layer in _model().backbone.layers], ids)
    assert mixer_module.sorted_stream is sorted_stream


def test_tiny_hybrid_loss_decreases():
    model = _model().train()
    ids = _ids(model.config, batch=2)
    losses = train_losses(model, ids, lr=1e-2)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention_layers=(3,)), r"attention_layers: \[3\] out of range; .* must lie in \[0, n_layer=3\)"),
        (dict(attention_layers=(-1,)), r"attention_layers: \[-1\] out of range"),
        (dict(attention_layers=(1, 1)), r"attention_layers: duplicate layer indices in \[1, 1\]"),
        (dict(attention_layers=("1",)), r"attention_layers: must be a list of layer indices"),
        (dict(attention_layers=(True,)), r"attention_layers: must be a list of layer indices"),
        (dict(attention_heads=3), r"attention_heads: 3 heads do not divide d_model=16"),
        (dict(attention_heads=0), r"attention_heads: must be a positive integer or 'auto'"),
        (dict(attention_heads=16), r"attention_heads: 16 heads split d_model=16 into heads of odd size 1"),
    ],
)
def test_bad_attention_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        hybrid_config(**overrides)


def test_attention_heads_auto():
    assert mom.MoMConfig(d_model=1024, n_layer=24, attention_layers=(18, 21)).attention_heads == 16
    assert mom.MoMConfig(d_model=64, attention_layers=(3,)).attention_heads == 1
    assert mom.MoMConfig(d_model=200).attention_heads == 2  # 3 (= 200 // 64) does not divide 200
    assert mom.MoMConfig(d_model=16, n_layer=4, attention_layers=[3, 0]).attention_layers == (0, 3)


def test_from_dense_mamba_refuses_attention_layers():
    with pytest.raises(ValueError, match="attention_layers"):
        mom.MoMForCausalLM.from_dense_mamba(object(), hybrid_config())


# ---- FLOPs ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decouple", [("in_proj", "out_proj"), ()], ids=["mom", "dense"])
def test_attention_flops_equal_flop_counter(decouple):
    """The attention rows' matmuls (q, k, v, o, Q K^T, A V) against FlopCounterMode on one attention mixer; SDPA's
    math backend, whose matmuls the counter sees (its count of the fused kernels is the same full matrix)."""
    config = hybrid_config(decouple=decouple)
    mixer = mom.MoMForCausalLM(config).backbone.layers[1].mixer
    b, l = 2, 11
    routing = Routing.build(torch.randint(0, 3, (b, l)), 3)
    table = flops.flop_table(config, seq_len=l)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        mixer(torch.randn(b, l, config.d_model), routing)
    counts = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
    projections = sum(table[f"layer.attn.{p}"].flops for p in ATTENTION_PROJECTIONS)
    assert counts.pop("bmm") == b * l * (table["layer.attn.scores"].flops + table["layer.attn.values"].flops)
    assert sum(counts.values()) == b * l * projections
    assert table["layer.attn.scores"].count == 1 and table["layer.in_proj"].count == 2
    assert table["layer.norm"].count == 3


def test_flops_need_the_context_length_for_attention():
    config = hybrid_config()
    with pytest.raises(ValueError, match="seq_len: attention layers"):
        flops.flop_table(config)
    short, long = flops.forward_flops_per_token(config, 16), flops.forward_flops_per_token(config, 32)
    assert long - short == 16 * (4 * config.d_model + 5 * config.attention_heads)  # scores + values + softmax
    assert flops.count_params(config)[0] == sum(p.numel() for p in _model().parameters())
    assert flops.forward_flops_per_token(tiny_config(), 16) == flops.forward_flops_per_token(tiny_config())


def test_mom_flops_counts_attention_at_the_context_length(tmp_path, capsys):
    from mom.cli.flops import main

    config = hybrid_config()
    config.save_pretrained(tmp_path)
    assert main(["--model-json", str(tmp_path)]) == 2
    assert "--seq-len: the model has attention layers [1]" in capsys.readouterr().err
    assert main(["--model-json", str(tmp_path), "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert f"{flops.forward_flops_per_token(config, 64):,}" in out and "seq_len=64" in out
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "t2i_160m_hybrid_mom.yaml"
    assert main(["--config", str(recipe), "--seq-len", "1024"]) == 0
    assert "attention_layers=[18, 21] attention_heads=16 seq_len=1024" in capsys.readouterr().out


# ---- on a GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decouple", [("in_proj", "x_proj", "dt_proj", "out_proj"), ()], ids=["mom", "dense"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hybrid_equals_cpu_and_trains_under_autocast(decouple):
    """The CUDA model (fused Mamba blocks, SDPA's kernels) against the CPU reference; a bf16 autocast training step
    (FlashAttention) with finite gradients; generate() with the key/value cache equals it without."""
    model = _model(decouple=decouple, d_model=64, attention_heads=2)
    ids = _ids(model.config, batch=4)
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.cuda()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=2e-3)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids.cuda(), labels=ids.cuda()).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    prompt = ids[:, :6].cuda()
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


def test_checkpoint_shape_records_attention_layers_of_hybrids_only():
    from mom.train.loop import model_shape

    assert model_shape(hybrid_config())["attention_layers"] == [1]
    assert model_shape(hybrid_config())["attention_heads"] == 2
    assert "attention_layers" not in model_shape(tiny_config())  # pure Mamba runs resume as before


def test_attention_layers_among_mamba2_blocks():
    model = _model(mixer="mamba2", headdim=8, chunk_size=4)
    assert [type(layer.mixer).__name__ for layer in model.backbone.layers] == ["Mamba2Mixer", "AttentionMixer",
                                                                               "Mamba2Mixer"]
    assert isinstance(model.backbone.layers[1].mixer.q_proj, RoutedLinear)  # mamba2's default decouple: in/out_proj
    ids = _ids(model.config)
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :5], use_cache=True).cache
        steps = [model.decode_logits(ids[:, t : t + 1], cache) for t in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 5:], atol=1e-5, rtol=1e-5)
    assert flops.count_params(model.config)[0] == sum(p.numel() for p in model.parameters())
