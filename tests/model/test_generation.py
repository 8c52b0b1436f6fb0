import pytest
import torch
from helpers import (
    assert_left_padded_generate_equals_each_row_alone,
    interleaved_ids,
    needs_generate_cache,
    tiny_config,
)

import mom

RUNS = [(0, 4), (1, 7), (0, 2), (2, 6), (0, 3)]


def test_token_by_token_logits_match_full_forward():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    ids = interleaved_ids(model.config, 2, RUNS)
    with torch.no_grad():
        full = model(ids).logits
        cache = mom.MoMCache(model.config, batch_size=2)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.seqlen_offset == ids.shape[1]


def test_prefill_then_steps_match_full_forward():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    ids = interleaved_ids(model.config, 2, RUNS)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :10], use_cache=True)
        rest = model(ids[:, 10:], cache=out.cache, use_cache=True).logits  # several tokens after prefill
    torch.testing.assert_close(torch.cat([out.logits, rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_the_caches_states_are_cut_from_one_allocation_per_kind_and_shape_and_zeroed():
    config = tiny_config()
    cache = mom.MoMCache(config, batch_size=3)
    for states in (cache.conv_states, cache.ssm_states):
        assert len({s.untyped_storage().data_ptr() for s in states}) == 1 and len(states) == config.n_layer
        assert all(s.is_contiguous() and not s._is_view() and not s.any() for s in states)
    cache.conv_states[0].fill_(1.0)
    assert not cache.conv_states[1].any()


def test_a_prefill_under_autograd_writes_its_cache_and_gives_a_full_forwards_gradients():
    """The cache's states are cut from one allocation (`mom.model.cache._states`), yet autograd sees separate tensors:
    a prefill with gradients writes each layer's states in place and backpropagates as a forward without cache."""
    model = mom.MoMForCausalLM(tiny_config()).eval()
    ids = interleaved_ids(model.config, 2, RUNS)
    model(ids).logits.square().mean().backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    out = model(ids, use_cache=True)
    assert all(s.requires_grad for s in out.cache.conv_states + out.cache.ssm_states)
    out.logits.square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_generate_greedy_equals_manual_argmax_and_cache_is_constant_size():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    prompt = interleaved_ids(model.config, 2, [(0, 3), (1, 4)])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (2, prompt.shape[1] + 6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    # the recurrent state does not grow with the sequence
    cache = mom.MoMCache(model.config, batch_size=2)
    sizes = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            sizes.append(sum(s.numel() for s in cache.conv_states + cache.ssm_states))
    assert len(set(sizes)) == 1


def test_generate_with_left_padding_equals_each_row_alone():
    model = mom.MoMForCausalLM(tiny_config(pad_token_id=0)).eval()
    assert_left_padded_generate_equals_each_row_alone(model)


def test_cache_is_allocated_by_the_first_forward_for_its_batch():
    model = mom.MoMForCausalLM(tiny_config()).eval()
    cache = mom.MoMCache(model.config)  # as generate() builds it, before the batch is known
    assert not cache.is_initialized and cache.batch_size == -1 and cache.get_seq_length() == 0
    ids = interleaved_ids(model.config, 3, RUNS)
    with torch.no_grad():
        model(ids[:, :5], cache=cache, use_cache=True)
        assert cache.batch_size == 3 and cache.get_seq_length() == 5
        with pytest.raises(ValueError, match="the cache holds 3 rows but the input has 2"):
            model(ids[:2, 5:6], cache=cache, use_cache=True)


# ---- the prefill through the fused mixer (`mom.ops.fused`), on CPU with its reference ops ---------------------------
PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")


def _fast_path_on_cpu(monkeypatch) -> list[tuple[bool, bool]]:
    """CPU tensors take the fast path, on the reference conv and scan (as on CUDA with mamba-ssm's); -> a list that
    records, per fused mixer call, whether it wrote a cache's states and whether its rows were sorted."""
    from mom.ops import fused, scan_ops

    monkeypatch.setattr(scan_ops, "cuda_ops", lambda: scan_ops.REFERENCE_OPS)
    monkeypatch.setattr(scan_ops, "runs_on", lambda t: True)
    calls = []
    monkeypatch.setattr(fused, "fused_mixer", lambda *a, _f=fused.fused_mixer, **k: calls.append(
        (k.get("states_out") is not None, k.get("sorted_tokens", False))) or _f(*a, **k))
    return calls


def _double_model(decouple, seed: int = 0) -> mom.MoMForCausalLM:
    torch.manual_seed(seed)
    model = mom.MoMForCausalLM(tiny_config(decouple=decouple, bias=decouple == PROJECTIONS)).double().eval()
    with torch.no_grad():  # distinct experts, so that a token sent to the wrong one shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@needs_generate_cache
@pytest.mark.parametrize("decouple", [PROJECTIONS, (), ("x_proj", "dt_proj")], ids=["sorted", "dense", "unsorted"])
@pytest.mark.parametrize("length", [3, 4, 13], ids=["l<d_conv", "l=d_conv", "l>d_conv"])
def test_fused_prefill_cache_and_tokens_equal_the_module_paths(decouple, length, monkeypatch):
    """A prefill whose mixers take the fused path (the residual stream sorted by modality when in_proj or out_proj
    routes) writes the module path's cache and gives its logits; generate() from it gives the module path's tokens
    (checked for the longest prompt: the states are checked for all)."""
    model = _double_model(decouple)
    prompt = interleaved_ids(model.config, 3, RUNS)[:, :length]
    prompt[1] = prompt[1].roll(5)  # rows in different modalities at the same position
    with torch.no_grad():
        ref = model(prompt, use_cache=True, logits_to_keep=1)
    ref_tokens = model.generate(prompt, max_new_tokens=4, do_sample=False) if length > 4 else None
    calls = _fast_path_on_cpu(monkeypatch)
    with torch.no_grad():
        out = model(prompt, use_cache=True, logits_to_keep=1)
    assert calls == [(True, decouple == PROJECTIONS)] * model.config.n_layer
    torch.testing.assert_close(out.logits, ref.logits)
    for name in ("conv_states", "ssm_states"):
        for state, state_ref in zip(getattr(out.cache, name), getattr(ref.cache, name), strict=True):
            torch.testing.assert_close(state, state_ref, msg=lambda m, name=name: f"{name}: {m}")
    assert out.cache.seqlen_offset == length
    if ref_tokens is None:
        return
    tokens = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert calls == 2 * calls[: model.config.n_layer]  # generate()'s prefill took the fused path too
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("decouple", [PROJECTIONS, ("in_proj",), ("out_proj", "x_proj")],
                         ids=["all routed", "in_proj routed", "out_proj routed"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("own", [False, True], ids=["stacked", "own weights"])
def test_a_fused_prefill_runs_the_last_out_proj_for_the_kept_positions_only(decouple, k, own, monkeypatch):
    """With logits_to_keep=k (generate() passes 1) the last block of a sorted stream runs out_proj, and the model its
    final norm, for each row's last k tokens only: the module path's logits and cache all the same, and the
    backbone's last_hidden_state (without a cache) is those positions' (b, k, d). out_proj's weights stacked by the
    cast, or the experts' own (read where a prefill's large GEMMs run per expert: forced either way here)."""
    from mom.ops import fused, grouped

    if own:
        monkeypatch.setattr(grouped, "PER_EXPERT_MACS", 0)
    else:
        monkeypatch.setattr(fused, "_own_weights", lambda layout, *args: (False,) * len(layout.experts))
    model = _double_model(decouple)
    prompt = interleaved_ids(model.config, 3, RUNS)[:, :13]
    prompt[1] = prompt[1].roll(5)  # rows in different modalities at the same position
    with torch.no_grad():
        ref = model(prompt, use_cache=True)  # the module path, every position
        ref_hidden = model.backbone(prompt, use_cache=False).last_hidden_state
    calls = _fast_path_on_cpu(monkeypatch)
    rows = []
    model.backbone.layers[-1].mixer.register_forward_hook(lambda m, args, out: rows.append(tuple(out.shape)))
    with torch.no_grad():
        out = model(prompt, use_cache=True, logits_to_keep=k)
        hidden = model.backbone(prompt, use_cache=False, keep_last=k).last_hidden_state
    d = model.config.d_model
    assert [sorted_ for _, sorted_ in calls] == [True] * (2 * model.config.n_layer)
    assert rows == [(3 * k, d)] * 2  # out_proj's rows: the kept tokens only
    torch.testing.assert_close(out.logits, ref.logits[:, -k:])
    torch.testing.assert_close(hidden, ref_hidden[:, -k:])
    for state, state_ref in zip(out.cache.ssm_states + out.cache.conv_states,
                                ref.cache.ssm_states + ref.cache.conv_states, strict=True):
        torch.testing.assert_close(state, state_ref)


def test_the_kept_positions_alone_are_for_forwards_without_gradients(monkeypatch):
    """Under autograd every position goes through out_proj (a backward needs them all) and the logits are the same;
    the fused Function refuses kept tokens there; keep_last must be a non-negative int; the module path slices."""
    model = _double_model(PROJECTIONS)
    prompt = interleaved_ids(model.config, 2, RUNS)[:, :9]
    with torch.no_grad():
        ref = model.backbone(prompt).last_hidden_state
    with pytest.raises(ValueError, match="keep_last must be a non-negative int"):
        model.backbone(prompt, keep_last=-1)
    assert torch.equal(model.backbone(prompt, keep_last=2).last_hidden_state.detach(), ref[:, -2:])  # module path
    _fast_path_on_cpu(monkeypatch)
    rows = []
    model.backbone.layers[-1].mixer.register_forward_hook(lambda m, args, out: rows.append(tuple(out.shape)))
    logits = model(prompt, logits_to_keep=1).logits
    assert rows == [(2, 9, model.config.d_model)]
    with torch.no_grad():
        torch.testing.assert_close(logits.detach(), model(prompt, logits_to_keep=1).logits)
    from mom.model.inputs import modality_of_ids
    from mom.model.routing import Routing
    from mom.ops import fused, scan_ops

    routes = Routing(modality_of_ids(model.config, prompt), model.config.num_modalities).routes(torch.float64)
    hidden = torch.randn(2, 9, model.config.d_model, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="kept tokens are for a forward without gradients"):
        fused.fused_mixer(hidden, model.backbone.layers[0].mixer.fast_path_weights(), routes, scan_ops.REFERENCE_OPS,
                          kept=(torch.tensor([8]), torch.tensor([8])))


def test_prefill_with_padding_or_a_recording_cache_takes_the_module_path(monkeypatch):
    """Left padding and a cache recording its states (assisted decoding) stay on the module path."""
    model = _double_model(PROJECTIONS)
    prompt = interleaved_ids(model.config, 2, RUNS)[:, :8]
    calls = _fast_path_on_cpu(monkeypatch)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    with torch.no_grad():
        model(prompt, attention_mask=mask, use_cache=True)
        cache = mom.MoMCache(model.config)
        cache.activate_past_recording(2)
        model(prompt, cache=cache, use_cache=True)
    assert calls == [(True, False)] * model.config.n_layer  # the recorded prefill's head only: fused, unsorted


@needs_generate_cache
def test_prefill_computes_the_last_positions_logits_only():
    """generate()'s prefill of a long prompt projects only the last position through the LM head (transformers passes
    logits_to_keep=1): a batch x 2048 prompt never materialises (batch, 2048, vocab) logits."""
    model = mom.MoMForCausalLM(tiny_config()).eval()
    prompt = interleaved_ids(model.config, 2, [(0, 700), (1, 900), (2, 448)])  # 2048 positions
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape[:-1].numel()))
    generated = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 2051)
    assert rows == [2] * 3  # one position per row, prefill included
    with torch.no_grad():
        assert model(prompt, use_cache=True, logits_to_keep=1).logits.shape == (2, 1, model.config.vocab_size)


# ---- the same on a GPU: the CUDA fused prefill (mamba-ssm's and causal-conv1d's kernels) against the module path ----
def _cuda_fast_path_or_skip(monkeypatch) -> None:
    from mom.ops import backend, scan_ops

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv(backend.FORCE_REFERENCE_ENV, "0")
    if scan_ops.cuda_ops() is None:
        pytest.skip("mamba-ssm and causal-conv1d CUDA kernels not importable")


def _cuda_model(decouple, dtype: torch.dtype) -> mom.MoMForCausalLM:
    torch.manual_seed(0)
    config = tiny_config(vocab_sizes=(200, 120, 80), d_model=64, n_layer=2, d_state=16, dt_rank=4, decouple=decouple)
    model = mom.MoMForCausalLM(config).to("cuda", dtype).eval()
    model.keep_ssm_params_fp32()
    return model


def _cuda_prefill(model, prompt: torch.Tensor, fast: bool):
    for layer in model.backbone.layers:
        layer.mixer.use_fast_path = fast
    with torch.no_grad():
        return model(prompt, use_cache=True, logits_to_keep=1)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, atol=5e-4, rtol=5e-4, msg=lambda m: f"{what}: {m}")
    else:  # bf16 GEMMs in another order: the relative norm of the difference
        rel = (a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)
        assert rel < 2e-2, (what, rel.item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decouple", [PROJECTIONS, (), ("x_proj", "dt_proj")], ids=["sorted", "dense", "unsorted"])
@pytest.mark.parametrize("length", [3, 4, 333], ids=["l<d_conv", "l=d_conv", "l>d_conv"])
def test_cuda_fused_prefill_writes_the_module_paths_cache(length, decouple, dtype, monkeypatch):
    from mom.ops import fused

    _cuda_fast_path_or_skip(monkeypatch)
    model = _cuda_model(decouple, dtype)
    prompt = interleaved_ids(model.config, 3, [(0, 64), (1, 256), (2, 13)]).cuda()[:, :length]
    prompt[1] = prompt[1].roll(37)  # rows in different modalities at the same position
    ref = _cuda_prefill(model, prompt, fast=False)
    calls = []
    monkeypatch.setattr(fused, "fused_mixer", lambda *a, _f=fused.fused_mixer, **k: calls.append(
        k.get("states_out") is not None) or _f(*a, **k))
    out = _cuda_prefill(model, prompt, fast=True)
    assert calls == [True] * model.config.n_layer
    _close(out.logits, ref.logits, dtype, "logits")
    for name in ("conv_states", "ssm_states"):
        for i, (state, state_ref) in enumerate(zip(getattr(out.cache, name), getattr(ref.cache, name), strict=True)):
            assert state.dtype == state_ref.dtype
            _close(state, state_ref, dtype, f"{name}[{i}]")


@pytest.mark.gpu
@needs_generate_cache
@pytest.mark.parametrize("decouple", [PROJECTIONS, ()], ids=["sorted", "dense"])
def test_cuda_generate_after_the_fused_prefill_gives_the_module_paths_tokens(decouple, monkeypatch):
    """fp32, greedy, CUDA-graph decoding either way: the tokens after a fused prefill are the module path's."""
    _cuda_fast_path_or_skip(monkeypatch)
    model = _cuda_model(decouple, torch.float32)
    prompt = interleaved_ids(model.config, 4, [(0, 40), (1, 90), (2, 30), (0, 7)]).cuda()
    prompt = torch.stack([row.roll(29 * i) for i, row in enumerate(prompt)])
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    tokens = {}
    for fast in (False, True):
        for layer in model.backbone.layers:
            layer.mixer.use_fast_path = fast
        tokens[fast] = model.generate(prompt, **kwargs)
    assert torch.equal(tokens[True], tokens[False])


# ---- the cache's states are not zeroed for a prefill, which writes them whole ---------------------------------------
@pytest.mark.parametrize("kind", ["mamba1 fused", "mamba1 module", "mamba2", "hybrid attention", "padded"])
@pytest.mark.parametrize("length", [2, 9], ids=["l<d_conv", "l>d_conv"])
def test_a_prefill_writes_every_state_whole_so_its_cache_is_not_zeroed(kind, length, monkeypatch):
    """A prefill into a cache the forward allocates leaves its states unzeroed (here: filled with NaN, as stale memory
    could be) and writes every one of them whole: the states and logits equal a prefill into a zeroed cache. A
    forward whose tokens are all recorded (run one by one from the state) gets zeroed states."""
    from mom.model import cache as cache_module

    overrides = {"mamba2": dict(mixer="mamba2", headdim=8, decouple=("in_proj", "out_proj")),
                 "hybrid attention": dict(n_layer=3, attention_layers=(1,), attention_heads=2)}.get(kind, {})
    torch.manual_seed(0)
    model = mom.MoMForCausalLM(tiny_config(**{"decouple": PROJECTIONS, **overrides})).double().eval()
    if kind == "mamba1 fused":
        calls = _fast_path_on_cpu(monkeypatch)
    prompt = interleaved_ids(model.config, 2, RUNS)[:, :length]
    mask = None
    if kind == "padded":
        mask = torch.ones_like(prompt)
        mask[1, :1] = 0
    with torch.no_grad():
        want = model(prompt, attention_mask=mask, cache=mom.MoMCache(model.config, 2, dtype=torch.float64),
                     use_cache=True)
    zeroed = []
    real = cache_module._states

    def stale(shapes, device, dtype, zero):
        zeroed.append(zero)
        states = real(shapes, device, dtype, zero)
        return states if zero else [s.fill_(float("nan")) for s in states]

    monkeypatch.setattr(cache_module, "_states", stale)
    with torch.no_grad():
        got = model(prompt, attention_mask=mask, cache=mom.MoMCache(model.config), use_cache=True)
    assert zeroed == [False, False]
    if kind == "mamba1 fused":
        assert len(calls) == 2 * model.config.n_layer and all(written for written, _ in calls)
    torch.testing.assert_close(got.logits, want.logits)
    for name in ("conv_states", "ssm_states"):
        for state, state_want in zip(getattr(got.cache, name), getattr(want.cache, name), strict=True):
            assert not state.isnan().any()
            torch.testing.assert_close(state, state_want, msg=lambda m, name=name: f"{name}: {m}")
    recording = mom.MoMCache(model.config)
    recording.activate_past_recording(None)  # every token recorded: each read the state before it
    with torch.no_grad():
        model(prompt[:, :2], cache=recording, use_cache=True)
    assert zeroed[-2:] == [True, True]
