"""The Mamba-2 mixer's fast path (`Mamba2Mixer.fast_path_applies`: routed in_proj / out_proj through
`mom.ops.routed_linear`, the sorted residual stream) against its module path, on CPU.

On CPU the fast path is forced (``fast_path_applies`` patched, as on a GPU) and runs the module path's conv and SSD
between its projections, so that fast and module paths differ only in the projections (fp32, tight tolerance); with
mamba-ssm's fused function replaced by an oracle (tests/model/test_mamba2.py), the kernel path's call too. The GPU
tests at the end compare the two paths in bf16 on CUDA (skipped without CUDA).
"""

import pytest
import torch
from helpers import interleaved_ids, tiny_mamba2_config

import mom
from mom.model import mamba2
from mom.model.mamba2 import Mamba2Mixer
from mom.model.mixer import sorted_stream
from mom.model.routing import Routing
from mom.ops import backend

RUNS = [(0, 5), (1, 7), (2, 4), (0, 3), (1, 2)]  # every modality, interleaved; l = 21 (chunks of 8 and a tail)
BOTH = ("in_proj", "out_proj")


def config_of(**overrides) -> mom.MoMConfig:
    return tiny_mamba2_config(**overrides)


def model_of(seed: int = 0, **overrides) -> mom.MoMForCausalLM:
    torch.manual_seed(seed)
    model = mom.MoMForCausalLM(config_of(**overrides))
    with torch.no_grad():  # distinct experts, so that a token sent to the wrong one shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ids_of(config, batch: int = 2, runs=RUNS, seed: int = 0) -> torch.Tensor:
    return interleaved_ids(config, batch, runs, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def fast_on_cpu(monkeypatch):
    """The fast path on CPU tensors (the module path's conv and scan between the projections); -> the row orders
    (x_sorted, out_sorted) of every routed_linear call."""
    monkeypatch.setattr(Mamba2Mixer, "fast_path_applies",
                        lambda self, hidden: self.use_fast_path and self.fast_path_weights() is not None)
    calls = []
    real = mamba2.routed_linear
    monkeypatch.setattr(mamba2, "routed_linear", lambda *a, **k: calls.append(
        (k.get("x_sorted", False), k.get("out_sorted", False))) or real(*a, **k))
    return calls


def assert_grads_equal(grads, ref, **tol):
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], msg=lambda m, name=name: f"{name}: {m}", **tol)


LAYER_CASES = {  # decouple, bias, modality runs (a modality absent from the batch in the last)
    "in_proj": (("in_proj",), False, RUNS),
    "out_proj": (("out_proj",), True, RUNS),
    "both": (BOTH, False, RUNS),
    "both, bias": (BOTH, True, RUNS),
    "speech absent": (BOTH, True, [(0, 6), (1, 9), (0, 6)]),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_fast_path_equals_module_path(case, fast_on_cpu):
    """Output, input gradient and every parameter's gradient, in sequence order and on sorted rows, with and without
    document resets."""
    decouple, bias, runs = LAYER_CASES[case]
    mixer = model_of(decouple=decouple, bias=bias).backbone.layers[1].mixer
    config = config_of(decouple=decouple)
    modality_ids = config.modality_of(ids_of(config, runs=runs))
    routing = Routing.build(modality_ids, config.num_modalities)
    b, l = modality_ids.shape
    doc_start = torch.zeros(b, l, dtype=torch.bool)
    doc_start[0, 9], doc_start[1, 4] = True, True
    hidden = torch.randn(b, l, 16, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(b, l, 16, generator=torch.Generator().manual_seed(2))

    def run(fast: bool, sorted_tokens: bool, reset):
        mixer.use_fast_path = fast
        mixer.zero_grad(set_to_none=True)
        x = hidden.clone().requires_grad_(True)
        rows = x.reshape(b * l, -1)
        h = rows[routing.perm].view(b, l, -1) if sorted_tokens else x
        out = mixer(h, routing, doc_start=reset, sorted_tokens=sorted_tokens)
        out = out.reshape(b * l, -1)[routing.inv_perm].view(b, l, -1) if sorted_tokens else out
        out.backward(grad)
        return out.detach(), x.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}

    for reset in (None, doc_start):
        out_ref, dh_ref, g_ref = run(False, False, reset)
        for sorted_tokens in (False, True):
            calls = len(fast_on_cpu)
            out, dh, g = run(True, sorted_tokens, reset)
            assert len(fast_on_cpu) - calls == len(decouple)  # one routed_linear per routed projection
            torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(dh, dh_ref, atol=1e-5, rtol=1e-5)
            assert_grads_equal(g, g_ref, atol=1e-5, rtol=1e-5)
    if runs != RUNS:
        assert all(not g[f"{p}.speech.weight"].any() for p in decouple)  # the absent modality's experts


def _model_step(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, output_hidden_states=True, use_cache=False, **kwargs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("decouple", [("in_proj",), ("out_proj",), BOTH])
def test_sorted_stream_model_equals_module_path(decouple, fast_on_cpu):
    """Every mixer on its fast path: the model keeps its residual stream sorted (in_proj reads sorted rows, out_proj
    writes them); loss, logits, hidden states and every gradient equal the module path's (``use_fast_path:
    false``)."""
    fast = model_of(decouple=decouple, bias=True)
    module = model_of(decouple=decouple, bias=True, use_fast_path=False)
    module.load_state_dict(fast.state_dict())
    ids = ids_of(fast.config)
    assert sorted_stream([layer.mixer for layer in fast.backbone.layers], ids)
    assert not sorted_stream([layer.mixer for layer in module.backbone.layers], ids)
    ref, g_ref = _model_step(module, ids)
    assert not fast_on_cpu
    out, g = _model_step(fast, ids)
    orders = {"in_proj": (True, False), "out_proj": (False, True)}
    assert fast_on_cpu == [orders[p] for _ in range(fast.config.n_layer) for p in decouple]
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    for h, h_ref in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    assert_grads_equal(g, g_ref, atol=1e-5, rtol=1e-5)


def test_a_padding_mask_keeps_mamba2_rows_in_sequence_order(fast_on_cpu):
    """A padded batch: Mamba-2 mixers take a mask on rows in sequence order only, so the model does not sort its
    stream (it once did with a mask, and the mixer refused); the result equals the module path's."""
    fast = model_of(decouple=BOTH, bias=True)
    module = model_of(decouple=BOTH, bias=True, use_fast_path=False)
    module.load_state_dict(fast.state_dict())
    ids = ids_of(fast.config)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row
    ref, g_ref = _model_step(module, ids, attention_mask=mask)
    out, g = _model_step(fast, ids, attention_mask=mask)
    assert fast_on_cpu and not any(x or o for x, o in fast_on_cpu)  # the fast projections, in sequence order
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert_grads_equal(g, g_ref, atol=1e-5, rtol=1e-5)


def test_prefill_on_the_sorted_stream_writes_the_cache(fast_on_cpu):
    """A prefill from a fresh cache takes the sorted stream too (the module path's conv and scan write the cache
    between the fast projections): the decode steps after it equal the full forward."""
    model = model_of().eval()
    ids = ids_of(model.config)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        fast_on_cpu.clear()
        cache = model(ids[:, :12], use_cache=True).cache
        assert fast_on_cpu == [(True, False), (False, True)] * model.config.n_layer  # the prefill: sorted rows
        steps = [model.decode_logits(ids[:, t : t + 1], cache) for t in range(12, 16)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 12:16], atol=1e-5, rtol=1e-5)


def test_kernel_path_with_resets_gradients_equal_module_path(monkeypatch):
    """mamba-ssm's fused function replaced by the oracle of tests/model/test_mamba2.py: the default fast path (with
    seq_idx resets: sequence order, routed GEMMs gathering their rows) gives the module path's loss and gradients."""
    from test_mamba2 import _split_conv1d_scan_oracle

    model = model_of(reset_at_document_boundaries=True)
    ids = ids_of(model.config)
    seq_idx = (torch.arange(ids.shape[1]) // 6).expand_as(ids)
    ref, g_ref = _model_step(model, ids, seq_idx=seq_idx)
    monkeypatch.setattr(backend, "mamba2_kernels",
                        lambda t: backend.Mamba2Kernels(chunk_scan=None, split_conv1d_scan=_split_conv1d_scan_oracle))
    calls = []
    real = mamba2.routed_linear
    monkeypatch.setattr(mamba2, "routed_linear", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert all(layer.mixer.fast_path_applies(ids) for layer in model.backbone.layers)
    out, g = _model_step(model, ids, seq_idx=seq_idx)
    assert len(calls) == 2 * model.config.n_layer and not any(k.get("x_sorted") or k.get("out_sorted") for k in calls)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert_grads_equal(g, g_ref, atol=1e-4, rtol=1e-4)  # the oracle's sequential scan vs the chunked one


def test_wrapped_or_absent_experts_take_the_module_path(fast_on_cpu):
    """A LoRA-wrapped expert (peft) or an absent weight (ZeRO-3 leaves a module's weights empty until it is called):
    the fast path defers to the module calls, and the model does not sort its stream."""
    peft = pytest.importorskip("peft")
    model = model_of()
    ids = ids_of(model.config)
    mixer = model.backbone.layers[0].mixer
    weights = mixer.fast_path_weights()
    assert weights is mixer.fast_path_weights() and weights.in_proj.weights[1] is mixer.in_proj.image.weight
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["in_proj.image"]))
    assert mixer.fast_path_weights() is None and not mixer.fast_path_applies(ids)
    assert not sorted_stream([layer.mixer for layer in model.backbone.layers], ids)
    wrapped(input_ids=ids, use_cache=False)
    assert not fast_on_cpu  # the module path: no routed_linear
    routing = Routing.build(model.config.modality_of(ids), model.config.num_modalities)
    with pytest.raises(ValueError, match="plain nn.Linear experts"):
        mixer(torch.randn(2, ids.shape[1], 16), routing, sorted_tokens=True)
    plain = model_of().backbone.layers[0].mixer
    with torch.no_grad():
        plain.conv1d.weight.data = torch.empty(0)
    assert plain.fast_path_weights() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("decouple", [("in_proj",), ("out_proj",), BOTH])
@pytest.mark.parametrize("counts_known", [False, True], ids=["device-offsets", "host-counts"])
def test_cuda_layer_fast_path_close_to_module_path(decouple, counts_known):
    """bf16 autocast on CUDA: the fast path (grouped GEMMs, mamba-ssm's fused kernel) against the module path, one
    layer in sequence order and on sorted rows."""
    if backend.mamba2_kernels(torch.empty(1, device="cuda")) is None:
        pytest.skip("mamba-ssm SSD kernels not importable")
    config = config_of(d_model=256, headdim=64, d_state=64, chunk_size=64, decouple=decouple, bias=True)
    torch.manual_seed(0)
    mixer = mom.MoMForCausalLM(config).backbone.layers[1].mixer.cuda()
    modality_ids = config.modality_of(ids_of(config, batch=4, runs=[(0, 100), (1, 150), (2, 50)])).cuda()
    b, l = modality_ids.shape
    routing = Routing.build(modality_ids, config.num_modalities)
    if counts_known:
        routing.set_counts(tuple(routing.device_counts.tolist()))
    assert mixer.fast_path_applies(modality_ids)
    hidden = torch.randn(b, l, 256, device="cuda")
    grad = torch.randn(b, l, 256, device="cuda")

    def run(fast: bool, sorted_tokens: bool = False):
        mixer.use_fast_path = fast
        mixer.zero_grad(set_to_none=True)
        x = hidden.clone().requires_grad_(True)
        h = x.reshape(b * l, -1)[routing.perm].view(b, l, -1) if sorted_tokens else x
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = mixer(h, routing, sorted_tokens=sorted_tokens)
        out = out.reshape(b * l, -1)[routing.inv_perm].view(b, l, -1) if sorted_tokens else out
        out.float().backward(grad)
        return out.float().detach(), x.grad, {n: p.grad.float() for n, p in mixer.named_parameters()}

    out_ref, dh_ref, g_ref = run(False)
    for sorted_tokens in (False, True):
        out, dh, g = run(True, sorted_tokens)
        torch.testing.assert_close(out, out_ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(dh, dh_ref, atol=2e-2, rtol=2e-2)
        for name in g_ref:
            scale = g_ref[name].abs().max().clamp_min(1e-3)
            torch.testing.assert_close(g[name] / scale, g_ref[name] / scale, atol=2e-2, rtol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sorted_stream_model_close_to_module_path():
    """A whole model on CUDA in bf16: the sorted stream (every mixer on the fast path) against use_fast_path=False."""
    if backend.mamba2_kernels(torch.empty(1, device="cuda")) is None:
        pytest.skip("mamba-ssm SSD kernels not importable")
    fast = model_of(d_model=128, headdim=32, d_state=32, chunk_size=64, bias=True).cuda().to(torch.bfloat16)
    fast.keep_ssm_params_fp32()
    module = model_of(d_model=128, headdim=32, d_state=32, chunk_size=64, bias=True, use_fast_path=False)
    module = module.cuda().to(torch.bfloat16)
    module.keep_ssm_params_fp32()
    module.load_state_dict(fast.state_dict())
    ids = ids_of(fast.config, batch=2, runs=[(0, 100), (1, 150), (2, 50)]).cuda()
    assert sorted_stream([layer.mixer for layer in fast.backbone.layers], ids)
    ref, g_ref = _model_step(module, ids)
    out, g = _model_step(fast, ids)
    torch.testing.assert_close(out.loss, ref.loss, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.logits.float(), ref.logits.float(), atol=5e-2, rtol=5e-2)
    # bf16 weights in both models: each gradient within 5% of the reference in norm (an element-wise bound failed
    # once for an 8-element Δ bias gradient, summed over every token: 0.033 of its largest entry on an H100)
    for name in g_ref:
        error = (g[name].float() - g_ref[name].float()).norm() / g_ref[name].float().norm().clamp_min(1e-6)
        assert error < 5e-2, (name, error.item())
