"""Padding (``attention_mask``) in a forward without cache: a Mamba-1 model hands the mask to its mixers unread
(`mom.model.inputs.padding_mask`), and the fused path zeroes padded positions on the device where the module path
zeroes them, so that an all-ones mask changes nothing and a padded one gives the module path's results.

On CPU the fused path runs on the reference conv and scan (``scan_ops.runs_on`` patched, as tests/model/
test_default_call.py does); the GPU tests at the end compare the same on CUDA bf16 (skipped without CUDA). The host
reads of a masked forward are counted in tests/model/test_default_call.py.
"""

import pytest
import torch
from helpers import assert_same_outputs, interleaved_ids, tiny_config

import mom
from mom.model.config import PROJECTIONS
from mom.model.inputs import IGNORE_INDEX
from mom.model.routing import Routing
from mom.ops import backend, fused, scan_ops

RUNS = [(0, 5), (1, 8), (2, 3), (0, 4), (1, 3)]  # 23 positions


def _model(decouple=PROJECTIONS, bias=False, **overrides):
    torch.manual_seed(0)
    model = mom.MoMForCausalLM(tiny_config(decouple=decouple, bias=bias, **overrides))
    with torch.no_grad():  # distinct experts, so that a token sent to the wrong one shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _ids(config, batch=2):
    return interleaved_ids(config, batch, RUNS, generator=torch.Generator().manual_seed(1))


def _mask(ids, kind):
    """An attention mask (b, l) for two rows: all ones, left padding (6 and 2 positions), right padding, or one row
    padded on the left and the other on the right."""
    mask = torch.ones_like(ids)
    if kind in ("left", "both"):
        mask[0, :6] = 0
    if kind == "left":
        mask[1, :2] = 0
    if kind in ("right", "both"):
        mask[1, -5:] = 0
    return mask


@pytest.fixture
def fast_path_on_cpu(monkeypatch):
    """The fused path on CPU tensors (reference conv and scan); -> per fused mixer call (mask given, rows sorted)."""
    monkeypatch.setattr(scan_ops, "cuda_ops", lambda: scan_ops.REFERENCE_OPS)
    monkeypatch.setattr(scan_ops, "runs_on", lambda t: True)
    calls = []
    monkeypatch.setattr(fused, "fused_mixer", lambda *a, _f=fused.fused_mixer, **k: (
        calls.append((k.get("mask") is not None, k.get("sorted_tokens", False))) or _f(*a, **k)))
    return calls


def _step(model, ids, attention_mask=None):
    """A training step's forward and backward; padded positions are not targets (as a collator's labels)."""
    model.zero_grad(set_to_none=True)
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    out = model(ids, labels=labels, attention_mask=attention_mask)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


SORTED, UNSORTED, DENSE = (PROJECTIONS, True), (("x_proj", "dt_proj"), False), ((), True)  # (decouple, bias)


CASES = {"sorted ones": (*SORTED, "ones"), "sorted left": (*SORTED, "left"), "sorted right": (*SORTED, "right"),
         "sorted both": (*SORTED, "both"), "unsorted left": (*UNSORTED, "left"), "unsorted both": (*UNSORTED, "both"),
         "dense both": (*DENSE, "both")}


@pytest.mark.parametrize("decouple, bias, kind", list(CASES.values()), ids=list(CASES))
def test_fused_path_with_a_mask_equals_the_module_path(decouple, bias, kind, fast_path_on_cpu, monkeypatch):
    """Logits, loss, per-modality losses and every gradient of the default call with an attention mask: the fused
    path (given the mask in every layer, its residual stream sorted where in_proj or out_proj routes) equals the
    module path, which was the path of every padded batch before, with biases too (padded positions' outputs are
    out_proj's bias)."""
    model = _model(decouple, bias)
    ids = _ids(model.config)
    mask = _mask(ids, kind)
    out, grads = _step(model, ids, mask)
    assert fast_path_on_cpu == [(True, decouple == PROJECTIONS)] * model.config.n_layer
    monkeypatch.setattr(scan_ops, "runs_on", lambda t: False)  # the module path
    ref, ref_grads = _step(model, ids, mask)
    assert_same_outputs(out, grads, ref, ref_grads)


@pytest.mark.parametrize("fast", [True, False], ids=["fused path", "module path"])
def test_an_all_ones_mask_changes_nothing(fast, monkeypatch):
    """An all-ones mask, applied unread, gives exactly the results of the call without one (each product by one)."""
    if fast:
        monkeypatch.setattr(scan_ops, "cuda_ops", lambda: scan_ops.REFERENCE_OPS)
        monkeypatch.setattr(scan_ops, "runs_on", lambda t: True)
    model = _model(bias=True)
    ids = _ids(model.config)
    out, grads = _step(model, ids, torch.ones_like(ids))
    ref, ref_grads = _step(model, ids)
    assert_same_outputs(out, grads, ref, ref_grads, rtol=0, atol=0)


def test_left_padding_on_the_fused_path_equals_the_unpadded_rows(fast_path_on_cpu):
    """The real tokens of left-padded rows (their conv windows reach into the padding) get the logits of the same
    rows unpadded: padding leaves nothing in the conv window or the state. (Without biases: the module path zeroes
    in_proj's input, so a bias of in_proj reaches the conv window from padded positions, on both paths.)"""
    model = _model().eval()
    ids = _ids(model.config)
    pad = 5
    padded = torch.cat([torch.zeros(2, pad, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(2, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        got = model(padded, attention_mask=mask, use_cache=False).logits[:, pad:]  # eval: a cache by default
        want = model(ids, use_cache=False).logits
    assert fast_path_on_cpu == [(True, True)] * model.config.n_layer + [(False, True)] * model.config.n_layer
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("sorted_tokens", [False, True], ids=["sequence order", "sorted rows"])
def test_fused_mixer_with_a_mask_equals_the_module_path_and_padding_gets_no_gradient(sorted_tokens):
    """One mixer: output, input gradient and parameter gradients of the fused Function with a mask (rows in sequence
    or sorted order, the mask in sequence order) equal the module path's; padded positions get a zero input gradient
    and out_proj's bias as output."""
    config = tiny_config(bias=True)
    mixer = _model(bias=True).backbone.layers[1].mixer
    modality_ids = config.modality_of(_ids(config))
    mask = _mask(modality_ids, "both").bool()
    routing = Routing.build(modality_ids, config.num_modalities)
    results = []
    for fast in (True, False):
        torch.manual_seed(3)
        hidden = torch.randn(*modality_ids.shape, config.d_model, requires_grad=True)
        if fast and sorted_tokens:
            rows = hidden.reshape(-1, config.d_model)[routing.perm].view_as(hidden)
            out = mixer.fused_forward(rows, routing, scan_ops.REFERENCE_OPS, sorted_tokens=True, mask=mask)
            out = out.reshape(-1, config.d_model)[routing.inv_perm].view_as(hidden)
        elif fast:
            out = mixer.fused_forward(hidden, routing, scan_ops.REFERENCE_OPS, mask=mask)
        else:
            out = mixer(hidden, routing, mask=mask)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
        results.append((out.detach(), hidden.grad, {n: p.grad.clone() for n, p in mixer.named_parameters()}))
        mixer.zero_grad(set_to_none=True)
    (out, dh, grads), (ref, dh_ref, ref_grads) = results
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dh, dh_ref)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=lambda m, name=name: f"{name}: {m}")
    assert torch.count_nonzero(dh[~mask]) == 0 and torch.count_nonzero(dh[mask]) > 0
    experts = list(mixer.out_proj.values())
    bias = torch.stack([experts[m].bias for m in modality_ids[~mask].tolist()])
    torch.testing.assert_close(out[~mask], bias.detach())


def test_fused_mixer_rejects_a_mask_of_another_shape():
    config = tiny_config()
    mixer = _model().backbone.layers[0].mixer
    modality_ids = config.modality_of(_ids(config))
    hidden = torch.randn(*modality_ids.shape, config.d_model)
    with pytest.raises(ValueError, match="mask has shape"):
        mixer.fused_forward(hidden, Routing.build(modality_ids, config.num_modalities), scan_ops.REFERENCE_OPS,
                            mask=torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("overrides, unread", [(dict(), True), (dict(attention_layers=[1]), False),
                                               (dict(mixer="mamba2", d_model=32, headdim=8), False)],
                         ids=["mamba1", "hybrid attention", "mamba2"])
def test_who_reads_an_all_ones_mask(overrides, unread, monkeypatch):
    """A forward without cache of a Mamba-1 model hands an all-ones mask to every mixer unread; one with attention
    or Mamba-2 mixers (whose kernels for a mask are slower) reads it first and drops it, as does a forward that writes
    a cache (generation's prefill, checked before it runs)."""
    model = _model(**overrides)
    ids = _ids(model.config)
    given = []
    for layer in model.backbone.layers:
        layer.mixer.register_forward_pre_hook(lambda m, args: given.append(args[3] is not None))
    reads = []
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t, _f=torch.Tensor.__bool__: reads.append(1) or _f(t))
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids), use_cache=False)
    assert given == [unread] * model.config.n_layer and bool(reads) != unread
    given.clear()
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
    assert given == [False] * model.config.n_layer


# ---- on a GPU: the fused path with a mask on CUDA bf16 ---------------------------------------------------------------
def _needs_kernels():
    if not torch.cuda.is_available() or backend.backend_name(torch.device("cuda")) == "reference":
        pytest.skip("mamba-ssm CUDA kernels not importable")


def _cuda_model(bias=False):
    torch.manual_seed(0)
    config = tiny_config(vocab_sizes=(200, 120, 80), d_model=64, n_layer=2, d_state=16, dt_rank=8, bias=bias)
    return mom.MoMForCausalLM(config).cuda()


CUDA_RUNS = [(0, 64), (1, 256), (2, 128), (0, 17), (1, 3)]


def _cuda_step(model, ids, attention_mask=None, fast=True):
    for layer in model.backbone.layers:
        layer.mixer.use_fast_path = fast
    model.zero_grad(set_to_none=True)
    labels = ids if attention_mask is None else ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=labels, attention_mask=attention_mask)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def _cuda_mask(ids, kind):
    mask = torch.ones_like(ids)
    if kind == "left":
        mask[0, :100] = 0
        mask[1, :7] = 0
    elif kind == "right":
        mask[1, -50:] = 0
    return mask


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_all_ones_mask_gives_the_unmasked_call(monkeypatch):
    """bf16 autocast on the fused path: the same logits and loss, bit for bit, with an all-ones mask as without one
    (the gradients differ only by the scan backward's atomics)."""
    _needs_kernels()
    calls = []
    monkeypatch.setattr(fused, "fused_mixer", lambda *a, _f=fused.fused_mixer, **k: (
        calls.append(k.get("mask") is not None) or _f(*a, **k)))
    model = _cuda_model()
    ids = interleaved_ids(model.config, 2, CUDA_RUNS).cuda()
    out, grads = _cuda_step(model, ids, torch.ones_like(ids))
    assert calls == [True] * model.config.n_layer
    ref, ref_grads = _cuda_step(model, ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    for name in ref_grads:
        rel = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-12)
        assert rel < 1e-2, (name, rel.item())


@pytest.mark.parametrize("kind", ["left", "right"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_padded_fused_path_matches_the_module_path(kind, bias, monkeypatch):
    """bf16 autocast: a padded batch on the fused path (new) against the module path (where padded batches ran
    before), tolerances of tests/ops/test_cuda.py's fused-against-module comparison."""
    _needs_kernels()
    calls = []
    monkeypatch.setattr(fused, "fused_mixer", lambda *a, _f=fused.fused_mixer, **k: (
        calls.append(k.get("mask") is not None) or _f(*a, **k)))
    model = _cuda_model(bias)
    ids = interleaved_ids(model.config, 2, CUDA_RUNS).cuda()
    mask = _cuda_mask(ids, kind)
    out, grads = _cuda_step(model, ids, mask)
    assert calls == [True] * model.config.n_layer
    ref, ref_grads = _cuda_step(model, ids, mask, fast=False)
    assert len(calls) == model.config.n_layer  # the module path
    assert (out.logits - ref.logits).abs().max() < 5e-2
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-2, atol=1e-2)
    for name in ref_grads:
        rel = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-12)
        assert rel < 2e-2, (name, rel.item())
