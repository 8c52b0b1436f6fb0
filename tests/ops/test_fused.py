"""The fused mixer (`mom.ops.fused`) against the module path, on CPU with the reference kernels (fp64).

The same Function runs on GPU with mamba-ssm's kernels (tests/ops/test_cuda.py); here its routing, layouts, expanded
dt_proj GEMM and hand-written backward are checked exactly, for every decouple set and modality layout.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mom
from mom.model.config import PROJECTIONS
from mom.model.routing import Routing
from mom.ops import fused, grouped, scan_ops
from mom.ops.grouped import HostCounts
from mom.ops.projections import Projection
from mom.ops.triton.gather import gather_cols_t, gather_rows_t
from mom.utils.errors import MissingDependencyError

MODALITIES = ("text", "image", "speech")


def make_mixer(decouple, bias=False, seed=0):
    torch.manual_seed(seed)
    config = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(8, 8, 8), d_model=12, n_layer=2, d_state=4,
                           decouple=decouple, bias=bias)
    mixer = mom.MoMForCausalLM(config).backbone.layers[1].mixer.double()
    with torch.no_grad():  # distinct experts, so that a token sent to the wrong one shows
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


def layouts():
    runs = torch.zeros(2, 23, dtype=torch.long)
    runs[:, 5:13] = 1
    runs[1, 17:] = 2
    return {
        "uneven runs": runs,
        "random": torch.randint(0, 3, (3, 17)),
        "speech absent": torch.randint(0, 2, (2, 19)),
        "one modality": torch.full((2, 9), 1),
    }


def run(mixer, modality_ids, fast: bool, seed=1):
    torch.manual_seed(seed)
    hidden = torch.randn(*modality_ids.shape, 12, dtype=torch.float64, requires_grad=True)
    routing = Routing.build(modality_ids, len(MODALITIES))
    out = mixer.fused_forward(hidden, routing, scan_ops.REFERENCE_OPS) if fast else mixer(hidden, routing)
    out.backward(torch.randn_like(out))
    grads = {name: p.grad.clone() for name, p in mixer.named_parameters()}
    mixer.zero_grad(set_to_none=True)
    return out.detach(), hidden.grad, grads


@pytest.mark.parametrize("decouple", [PROJECTIONS, (), ("in_proj", "dt_proj"), ("x_proj", "out_proj")])
@pytest.mark.parametrize("layout", list(layouts()))
def test_fused_matches_module_path(decouple, layout):
    modality_ids = layouts()[layout]
    # biases on in_proj / out_proj: both routed in one case, both shared in another
    mixer = make_mixer(decouple, bias=decouple in (PROJECTIONS, ()))
    out_ref, dh_ref, g_ref = run(mixer, modality_ids, fast=False)
    out, dh, g = run(mixer, modality_ids, fast=True)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(dh, dh_ref)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], msg=lambda m, name=name: f"{name}: {m}")


def test_backward_twice_through_a_retained_graph_names_the_problem():
    """The backward frees the largest activations as it goes: a second backward through a retained graph stops with
    an error that says so (and how to avoid it) instead of computing on freed tensors."""
    mixer = make_mixer(PROJECTIONS)
    hidden = torch.randn(2, 9, 12, dtype=torch.float64, requires_grad=True)
    out = mixer.fused_forward(hidden, Routing.build(layouts()["uneven runs"][:, :9], 3), scan_ops.REFERENCE_OPS)
    out.sum().backward(retain_graph=True)
    assert hidden.grad is not None
    with pytest.raises(RuntimeError, match="ran twice.*use_fast_path=False"):
        out.sum().backward()


def test_saved_tensor_hooks_see_every_activation():
    """Under saved-tensor hooks (activation checkpointing, offloading) xz and the scan's output are saved through
    them like the rest, not held on ctx, and a retained graph can be differentiated twice."""
    mixer = make_mixer(PROJECTIONS)
    hidden = torch.randn(2, 9, 12, dtype=torch.float64, requires_grad=True)
    routing = Routing.build(layouts()["uneven runs"][:, :9], 3)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(tuple(t.shape)) or t, lambda t: t):
        out = mixer.fused_forward(hidden, routing, scan_ops.REFERENCE_OPS)
    n, d_inner = hidden.shape[0] * hidden.shape[1], mixer.d_inner
    assert (2 * d_inner, n) in packed and (2, d_inner, 9) in packed  # xz (2 d_inner, n); out (b, d_inner, l)
    out.sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    hidden.grad = None
    out.sum().backward()
    torch.testing.assert_close(hidden.grad, first)


def test_absent_modality_gets_zero_expert_grads():
    mixer = make_mixer(PROJECTIONS)
    _, _, g = run(mixer, layouts()["speech absent"], fast=True)
    speech = [name for name in g if name.endswith(".speech.weight") or name.endswith(".speech.bias")]
    assert len(speech) == 5  # in, x, dt (weight + bias), out
    assert all(torch.count_nonzero(g[name]) == 0 for name in speech)
    assert torch.count_nonzero(g["in_proj.text.weight"]) > 0


def test_fast_path_only_for_plain_present_linear_experts_on_cuda():
    mixer = make_mixer(PROJECTIONS).float()
    hidden = torch.randn(1, 4, 12)
    assert not mixer.fast_path_applies(hidden)  # CPU tensors: the module path
    assert mixer.fast_path_weights() is not None
    with torch.no_grad():  # as ZeRO-3 leaves a module's weights until the module is called
        mixer.conv1d.weight.data = torch.empty(0)
    assert mixer.fast_path_weights() is None
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(mom.MoMForCausalLM(mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(8, 8, 8),
                                                                   d_model=12, n_layer=1)),
                                  peft.LoraConfig(r=2, target_modules=["in_proj.image"]))
    mixer = wrapped.base_model.model.backbone.layers[0].mixer
    assert mixer.fast_path_weights() is None  # a LoRA-wrapped expert: defer to module calls
    with pytest.raises(ValueError, match="plain nn.Linear"):
        mixer.fused_forward(hidden, Routing.build(torch.zeros(1, 4, dtype=torch.long), 3), scan_ops.REFERENCE_OPS)


def test_fused_bf16_weights_close_to_module_path():
    """bf16 parameters without autocast (DeepSpeed's bf16 mode): same dtypes through the Function."""
    mixer = make_mixer(PROJECTIONS).to(torch.bfloat16)
    modality_ids = layouts()["uneven runs"]
    hidden = torch.randn(*modality_ids.shape, 12, dtype=torch.bfloat16)
    routing = Routing.build(modality_ids, len(MODALITIES))
    ref = mixer(hidden, routing).float()
    out = mixer.fused_forward(hidden.requires_grad_(), routing, scan_ops.REFERENCE_OPS)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in mixer.parameters())
    assert ((out.float() - ref).norm() / ref.norm()) < 2e-2


def test_layout_gathers_on_cpu():
    """`mom.ops.triton.gather` off CUDA: the same results as the Triton kernels' definition
    (tests/ops/test_cuda.py runs those)."""
    x = torch.randn(7, 5)
    index = torch.tensor([3, 0, 6, 1])
    assert torch.equal(gather_rows_t(x, index), x[index].t()) and gather_rows_t(x, index).is_contiguous()
    assert torch.equal(gather_cols_t(x.t(), index), x[index]) and gather_cols_t(x.t(), index).is_contiguous()
    gate = torch.randn(7, 5)
    torch.testing.assert_close(gather_cols_t(x.t(), index, gate=gate.t()), (x * F.silu(gate))[index])
    with pytest.raises(ValueError, match="gate"):
        gather_cols_t(x.t(), index, gate=gate.t().contiguous())  # strides differ from x's
    wide = torch.zeros(4, 10)  # into the right half of wider rows
    gather_cols_t(x.t(), index, out=wide[:, 5:])
    assert torch.equal(wide[:, 5:], x[index]) and not wide[:, :5].any()
    with pytest.raises(ValueError, match="out"):
        gather_cols_t(x.t(), index, out=wide)


@pytest.mark.parametrize("decouple", [PROJECTIONS, ("x_proj", "out_proj"), ("in_proj",), ()])
def test_sorted_residual_stream_matches_module_path(decouple, monkeypatch):
    """When every mixer takes the fast path, the model keeps its residual stream in the routing's sorted order
    (when in_proj or out_proj routes) and computes every layer's A at once: loss, logits, hidden states and every
    gradient equal the module path's."""
    torch.manual_seed(0)
    config = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(8, 8, 8), d_model=12, n_layer=3, d_state=4,
                           decouple=decouple)
    model = mom.MoMForCausalLM(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    modality_ids = layouts()["uneven runs"]
    ids = torch.tensor(config.vocab_offsets)[modality_ids] + torch.randint(0, 8, modality_ids.shape)

    def forward():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, output_hidden_states=True)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters()}

    ref, g_ref = forward()  # CPU: the module path
    monkeypatch.setattr(scan_ops, "cuda_ops", lambda: scan_ops.REFERENCE_OPS)
    monkeypatch.setattr(scan_ops, "runs_on", lambda t: True)  # CPU tensors take the fast path, on the reference ops
    calls = []
    monkeypatch.setattr(fused, "fused_mixer", lambda *a, _f=fused.fused_mixer, **k: calls.append(k) or _f(*a, **k))
    out, g = forward()
    assert len(calls) == config.n_layer
    assert all(k.get("sorted_tokens", False) == (decouple != ()) for k in calls)
    # on the sorted stream the model hands each mixer A = -exp(A_log), all layers' in one go (A_log's gradient below)
    assert all((k.get("A") is not None) == (decouple != ()) for k in calls)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.logits, ref.logits)
    for h, h_ref in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(h, h_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], msg=lambda m, name=name: f"{name}: {m}")


def test_ops_import_nothing_above_them():
    """`mom.ops` takes tensors: none of its modules imports the model (or anything above ops), only ops and utils."""
    import ast
    from pathlib import Path

    root = Path(fused.__file__).parent
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] == "mom":
                    assert name.startswith(("mom.ops", "mom.utils")), f"{path.relative_to(root)} imports {name}"


def test_gathered_weights_are_reused_until_a_module_or_parameter_is_assigned():
    """The mixer gathers its fast-path weights once and reuses them (host time at every forward), but never stale
    ones: after peft wraps an expert (a first forward already gathered), the fast path defers to the module path;
    after a parameter is replaced (``load_state_dict(assign=True)``), the new one is read."""
    peft = pytest.importorskip("peft")
    model = mom.MoMForCausalLM(mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(8, 8, 8), d_model=12, n_layer=1))
    mixer = model.backbone.layers[0].mixer
    weights = mixer.fast_path_weights()
    assert weights is mixer.fast_path_weights()  # reused
    assert weights.weights[Projection.in_proj][1] is mixer.in_proj.image.weight
    assert weights.routed(Projection.x_proj) and weights.experts == (3, 3, 3, 3)
    state = {k: v.clone() + 1 for k, v in mixer.state_dict().items()}
    mixer.load_state_dict(state, assign=True)
    replaced = mixer.fast_path_weights()
    assert replaced is not weights and replaced.D is mixer.D and torch.equal(replaced.D, state["D"])
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["in_proj.image"]))
    assert mixer.fast_path_weights() is None


def test_fused_mixer_names_bad_inputs():
    mixer = make_mixer(PROJECTIONS)
    hidden = torch.randn(2, 9, 12, dtype=torch.float64)
    routing = Routing.build(layouts()["uneven runs"][:, :9], 3)
    weights, routes = mixer.fast_path_weights(), routing.routes(torch.float64)
    with pytest.raises(MissingDependencyError, match="REFERENCE_OPS"):  # no CUDA ops on this machine
        fused.fused_mixer(hidden, weights, routes)
    with pytest.raises(ValueError, match="2 x 8 tokens but routes for 18"):
        fused.fused_mixer(hidden[:, :8], weights, routes, scan_ops.REFERENCE_OPS)
    two = Routing.build(torch.zeros(2, 9, dtype=torch.long), 2).routes(torch.float64)
    with pytest.raises(ValueError, match=r"experts per projection \(3, 3, 3, 3\) but routes for 2 experts"):
        fused.fused_mixer(hidden, weights, two, scan_ops.REFERENCE_OPS)
    with pytest.raises(ValueError, match=r"onehot has shape \(3, 17\), expected \(3, 18\)"):
        fused.Routes(routes.perm, routes.inv_perm, routes.offsets, routes.counts, routes.expert_ids,
                     routes.onehot[:, 1:])
    with pytest.raises(ValueError, match=r"counts \(9, 8, 0\) do not cover the 18 tokens of 3 experts"):
        fused.Routes(routes.perm, routes.inv_perm, routes.offsets, HostCounts(counts=(9, 8, 0)),
                     routes.expert_ids, routes.onehot)
    with pytest.raises(ValueError, match="dt_proj has 3 weights but 2 biases"):
        fused.MixerWeights(weights.weights, (*weights.biases[:2], weights.biases[2][:2], weights.biases[3]),
                           weights.conv_weight, weights.conv_bias, weights.A_log, weights.D)
    with pytest.raises(ValueError, match=r"A has shape \(24, 3\) and dtype torch.float32, expected A_log's \(24, 4\)"):
        fused.fused_mixer(hidden, weights, routes, scan_ops.REFERENCE_OPS, A=torch.zeros(24, 3))
    with pytest.raises(ValueError, match=r"dtype torch.float64, expected A_log's \(24, 4\) in float32"):
        fused.fused_mixer(hidden, weights, routes, scan_ops.REFERENCE_OPS, A=torch.zeros(24, 4, dtype=torch.float64))


def test_sorted_stream_hands_each_mamba_1_mixer_its_A(monkeypatch):
    """`mom.model.mixer.sorted_stream`: where every mixer takes its fast path, each Mamba-1 mixer's -exp(A_log)
    (computed for all at once); None (the stream in sequence order) where one has no fast-path weights or none
    routes in_proj or out_proj."""
    from mom.model.mixer import sorted_stream

    monkeypatch.setattr(scan_ops, "runs_on", lambda t: True)
    config = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(8, 8, 8), d_model=12, n_layer=3, d_state=4)
    mixers = [layer.mixer for layer in mom.MoMForCausalLM(config).backbone.layers]
    ids = torch.zeros(1, 2, dtype=torch.long)
    stream = sorted_stream(mixers, ids)
    assert len(stream.A) == 3
    for a, mixer in zip(stream.A, mixers):
        torch.testing.assert_close(a, -torch.exp(mixer.A_log.detach()))
    shared = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(8, 8, 8), d_model=12, n_layer=3, d_state=4,
                           decouple=("x_proj",))  # in_proj and out_proj shared: sequence order is as cheap
    assert sorted_stream([layer.mixer for layer in mom.MoMForCausalLM(shared).backbone.layers], ids) is None
    mixers[2].x_proj["image"] = torch.nn.Sequential(mixers[2].x_proj["image"])  # not a plain nn.Linear expert
    assert sorted_stream(mixers, ids) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_exp_of_every_layer_at_once(dtype):
    """fp32 whatever A_log's dtype (exp of the exact fp32 value of a bf16 one), each A shaped as its A_log."""
    A_logs = [torch.randn(6, 4, requires_grad=True), torch.randn(3, 2), torch.randn(5, 4)]
    A_logs = [a.to(dtype) for a in A_logs]
    for A, A_log in zip(fused.negative_exp(A_logs), A_logs, strict=True):
        assert A.dtype == torch.float32 and A.shape == A_log.shape and not A.requires_grad
        torch.testing.assert_close(A, -torch.exp(A_log.detach().float()))


# ---- generation's prefill: the Function writes the recurrent cache's states -----------------------------------------
def _prefill(mixer, modality_ids, fast: bool, sorted_tokens: bool = False, grad: bool = False, counts: bool = False):
    """A prefill through the mixer: (output (b, l, d) in sequence order, conv state, SSM state of its layer);
    ``counts``: the tokens per modality read on the host first (as the model's prefill reads them)."""
    torch.manual_seed(1)
    b, l = modality_ids.shape
    config = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(8, 8, 8), d_model=12, n_layer=2, d_state=4)
    cache = mom.MoMCache(config, batch_size=b, dtype=torch.float64)
    for s in cache.conv_states + cache.ssm_states:  # stale values: everything must be overwritten
        s.fill_(7.0)
    hidden = torch.randn(b, l, 12, dtype=torch.float64, requires_grad=grad)
    routing = Routing.build(modality_ids, len(MODALITIES))
    if counts:
        routing.set_counts(tuple(routing.device_counts.tolist()))
    with torch.set_grad_enabled(grad):
        if not fast:
            out = mixer(hidden, routing, cache=cache)
        elif sorted_tokens:  # the stream's rows in the routing's sorted order in and out
            rows = hidden.reshape(b * l, -1)[routing.perm].view(b, l, -1)
            out = mixer.fused_forward(rows, routing, scan_ops.REFERENCE_OPS, sorted_tokens=True, cache=cache)
            out = out.reshape(b * l, -1)[routing.inv_perm].view(b, l, -1)
        else:
            out = mixer.fused_forward(hidden, routing, scan_ops.REFERENCE_OPS, cache=cache)
    i = mixer.layer_idx
    return out.detach(), cache.conv_states[i], cache.ssm_states[i]


@pytest.mark.parametrize("decouple", [PROJECTIONS, (), ("x_proj", "out_proj"), ("in_proj", "dt_proj")])
@pytest.mark.parametrize("length", [2, 4, 11], ids=["l<d_conv", "l=d_conv", "l>d_conv"])
@pytest.mark.parametrize("sorted_tokens", [False, True], ids=["sequence rows", "sorted rows"])
def test_fused_prefill_writes_the_module_paths_cache(decouple, length, sorted_tokens):
    """The states the Function writes (the conv's last d_conv inputs, left-padded with zeros; the scan's final state,
    fp32 or wider) equal the module path's cache, for every row layout and decouple set."""
    mixer = make_mixer(decouple, bias=decouple in (PROJECTIONS, ()))
    modality_ids = torch.randint(0, 3, (3, length), generator=torch.Generator().manual_seed(length))
    modality_ids[0] = 1  # one row in a single modality
    out_ref, conv_ref, ssm_ref = _prefill(mixer, modality_ids, fast=False)
    out, conv, ssm = _prefill(mixer, modality_ids, fast=True, sorted_tokens=sorted_tokens)
    assert conv.shape == (3, mixer.d_inner, 4) and ssm.shape == (3, mixer.d_inner, 4)
    if length < 4:
        assert not conv[..., : 4 - length].any()  # zeros left of the prompt
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(conv, conv_ref)
    torch.testing.assert_close(ssm, ssm_ref)


def test_fused_prefill_without_grad_runs_outside_autograd(monkeypatch):
    """Under no_grad (generate()) the forward runs without the autograd Function, so nothing is saved for a
    backward; with gradients it goes through the Function, states included, and the outputs agree."""
    mixer = make_mixer(PROJECTIONS)
    modality_ids = layouts()["uneven runs"]
    applied = []
    monkeypatch.setattr(fused._FusedMixer, "apply", lambda *a, _f=fused._FusedMixer.apply: applied.append(1) or _f(*a))
    out, conv, ssm = _prefill(mixer, modality_ids, fast=True)
    assert not applied
    out_grad, conv_grad, ssm_grad = _prefill(mixer, modality_ids, fast=True, grad=True)
    assert len(applied) == 1
    torch.testing.assert_close(out, out_grad)
    torch.testing.assert_close(conv, conv_grad)
    torch.testing.assert_close(ssm, ssm_grad)
    with torch.no_grad():  # parameters that require grad do not matter under no_grad
        mixer.fused_forward(torch.randn(2, 23, 12, dtype=torch.float64), Routing.build(modality_ids, 3),
                            scan_ops.REFERENCE_OPS)
    assert len(applied) == 1


@pytest.mark.parametrize("decouple", [PROJECTIONS, ("in_proj", "out_proj")], ids=["dt_proj routed", "dt_proj shared"])
def test_layers_share_one_expanded_dt_input_per_forward(decouple):
    """dt_proj's expanded input is built once per forward (`Routes.dt_input`: its one-hot and zero rows set) and
    shared by the layers: without gradients each layer writes its rows into it, with gradients each keeps a copy.
    Two layers with different weights on one routing, under both, equal each layer alone on a fresh routing."""
    mixers = [make_mixer(decouple, bias=True, seed=s) for s in (0, 1)]
    modality_ids = layouts()["uneven runs"]
    hidden = torch.randn(*modality_ids.shape, 12, dtype=torch.float64)

    def alone(mixer):
        with torch.no_grad():
            return mixer.fused_forward(hidden, Routing.build(modality_ids, 3), scan_ops.REFERENCE_OPS)

    want = [alone(m) for m in mixers]
    for grad in (False, True):
        routing = Routing.build(modality_ids, 3)
        with torch.set_grad_enabled(grad):
            got = [m.fused_forward(hidden, routing, scan_ops.REFERENCE_OPS) for m in mixers]
        for g, w in zip(got, want):
            torch.testing.assert_close(g.detach(), w)
        routes = routing.routes(torch.float64)
        r, M = mixers[0].dt_rank, 3 if "dt_proj" in decouple else 1
        k_pad = -(-M * (r + 1) // 8) * 8  # M * r + M rows rounded up to 8
        sel = routes.onehot if M == 3 else torch.ones(1, modality_ids.numel(), dtype=torch.float64)
        base = routes.dt_input(sel, r, k_pad)
        assert base is routes.dt_input(sel, r, k_pad)  # one per forward and shape
        torch.testing.assert_close(base[M * r : M * (r + 1)], sel)  # its constant rows intact after both layers
        assert not base[M * (r + 1) :].any()


def test_prefill_with_gradients_backpropagates_as_without_a_cache():
    """A prefill with gradients enabled: the states are written and the gradients are those of a forward without a
    cache (the states are outside the graph)."""
    mixer = make_mixer(PROJECTIONS)
    modality_ids = layouts()["uneven runs"]
    _, _, g_ref = run(mixer, modality_ids, fast=True)
    config = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(8, 8, 8), d_model=12, n_layer=2, d_state=4)
    cache = mom.MoMCache(config, batch_size=2, dtype=torch.float64)
    torch.manual_seed(1)
    hidden = torch.randn(*modality_ids.shape, 12, dtype=torch.float64, requires_grad=True)
    out = mixer.fused_forward(hidden, Routing.build(modality_ids, 3), scan_ops.REFERENCE_OPS, cache=cache)
    out.backward(torch.randn_like(out))
    assert cache.ssm_states[1].abs().sum() > 0 and not cache.ssm_states[1].requires_grad
    for name, p in mixer.named_parameters():
        torch.testing.assert_close(p.grad, g_ref[name], msg=lambda m, name=name: f"{name}: {m}")


def test_fused_prefill_names_bad_states():
    mixer = make_mixer(PROJECTIONS)
    hidden = torch.randn(2, 9, 12, dtype=torch.float64)
    routing = Routing.build(layouts()["uneven runs"][:, :9], 3)
    weights, routes = mixer.fast_path_weights(), routing.routes(torch.float64)
    conv, ssm = torch.zeros(2, mixer.d_inner, 4, dtype=torch.float64), torch.zeros(2, mixer.d_inner, 4)
    with pytest.raises(ValueError, match=r"conv_state has shape \(2, 24, 3\), expected \(2, 24, 4\)"):
        fused.fused_mixer(hidden, weights, routes, scan_ops.REFERENCE_OPS, states_out=(conv[..., :3], ssm))
    with pytest.raises(ValueError, match=r"ssm_state has shape \(1, 24, 4\), expected \(2, 24, 4\)"):
        fused.fused_mixer(hidden, weights, routes, scan_ops.REFERENCE_OPS, states_out=(conv, ssm[:1]))
    config = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(8, 8, 8), d_model=12, n_layer=2, d_state=4)
    cache = mom.MoMCache(config, batch_size=2, dtype=torch.float64)
    cache.seqlen_offset = 3
    with pytest.raises(ValueError, match="from a fresh state.*holds 3 tokens"):
        mixer.fused_forward(hidden, routing, scan_ops.REFERENCE_OPS, cache=cache)


def test_gated_gather_with_the_gate_in_the_outputs_rows():
    """`gather_cols_t(..., gate_rows=)`: the gate read in the output's row order (any strides), as the prefill leaves
    z in in_proj's sorted rows; equal to gating after the gather, and to the gate in x's layout gathered alike."""
    x, gate = torch.randn(5, 7), torch.randn(5, 7)
    index = torch.tensor([3, 0, 6, 1])
    rows = torch.randn(4, 10)[:, 5:]  # the right half of wider rows
    rows.copy_(gate[:, index].t())
    torch.testing.assert_close(gather_cols_t(x, index, gate_rows=rows), (x * F.silu(gate))[:, index].t())
    torch.testing.assert_close(gather_cols_t(x, index, gate_rows=rows), gather_cols_t(x, index, gate=gate))
    with pytest.raises(ValueError, match="not both"):
        gather_cols_t(x, index, gate=gate, gate_rows=rows)
    with pytest.raises(ValueError, match=r"gate_rows \(3, 5\) must be \(4, 5\)"):
        gather_cols_t(x, index, gate_rows=rows[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gated_gather_with_the_gate_in_the_outputs_rows(dtype):
    from mom.ops.triton import gather

    if gather._kernel() is None:
        pytest.skip("triton not importable")
    f, n = 300, 5000
    x = torch.randn(f, n, device="cuda", dtype=dtype)
    index = torch.argsort(torch.arange(n, device="cuda") % 3, stable=True)
    wide = torch.randn(n, 2 * f, device="cuda", dtype=dtype)
    rows = wide[:, f:]  # z's half of in_proj's sorted rows
    out = gather_cols_t(x, index, gate_rows=rows)
    want = F.silu(rows.float()).mul(x.float()[:, index].t()).to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # one rounding of the fp32 product
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    gate = torch.randn(f, n, device="cuda", dtype=dtype)  # the gate in x's layout, gathered alike: the same values
    assert torch.equal(gather_cols_t(x, index, gate=gate), gather_cols_t(x, index, gate_rows=gate[:, index].t()))


def test_gather_kernel_in_tritons_interpreter_equals_the_pytorch_ops():
    """The gather kernel (`mom.ops.triton.gather`), run by Triton's CPU interpreter (a subprocess: the interpreter is
    chosen when the kernel is compiled) where Triton is installed: plain, gated in x's layout, gated in the output's
    rows (strided: z's half of in_proj's rows), and rows -> columns from strided rows."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch
        from mom.ops.triton import gather
        from mom.ops.triton.gather import TILE, silu_gated

        def run(src_rows, index, out_rows, gate_rows=None, gate_at_out=False):  # as gather._gather_t launches it
            m, f = out_rows.shape
            gate = src_rows if gate_rows is None else gate_rows
            gather._kernel()[(-(-m // TILE), -(-f // TILE), 1)](
                src_rows, gate, index, out_rows, m, f, *src_rows.stride(), *out_rows.stride(), *gate.stride(),
                BN=TILE, BF=TILE, GATED=gate_rows is not None, GATE_AT_OUT=gate_at_out)

        g = torch.Generator().manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            f, n, m = 70, 150, 130
            x = torch.randn(f, n, generator=g).to(dtype)
            index = torch.randperm(n, generator=g)[:m]
            out = torch.empty(m, f, dtype=dtype)
            run(x.t(), index, out)
            assert torch.equal(out, x[:, index].t())
            gate = torch.randn(f, n, generator=g).to(dtype)
            run(x.t(), index, out, gate.t())
            torch.testing.assert_close(out, silu_gated(x, gate)[:, index].t())
            rows = torch.randn(m, 2 * f, generator=g).to(dtype)[:, f:]
            run(x.t(), index, out, rows, gate_at_out=True)
            torch.testing.assert_close(out, silu_gated(x[:, index].t(), rows))
            src = torch.randn(n, 2 * f, generator=g).to(dtype)[:, :f]
            cols = torch.empty(f, m, dtype=dtype)
            run(src, index, cols.t())
            assert torch.equal(cols, src[index].t())
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---- launches: a small model's forward is bound by them (docs/performance.md) ---------------------------------------
class _Launches(TorchDispatchMode):
    """Counts what a fused forward launches on a GPU, run on CPU: every aten op that computes (not views, not
    allocations), and each call of a function that is one kernel there (the Triton flat cast and gathers, the conv and
    the scan: `one`) as one."""

    ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] | None = None  # counting while a list
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.names is not None and self.depth == 0:
            name = func._schema.name.split("::")[1]
            view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
            if not view and name not in self.ALLOCATIONS:
                self.names.append(name)
        return func(*args, **(kwargs or {}))

    def one(self, fn, name: str):
        def call(*args, **kwargs):
            if self.names is not None and self.depth == 0:
                self.names.append(name)
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        return call


class _KernelLayoutOps:
    """`scan_ops.REFERENCE_OPS` with CUDA's contract: each output in its input's layout (the kernels keep it), one
    launch each."""

    def __init__(self, launches: _Launches) -> None:
        ref = scan_ops.REFERENCE_OPS

        def conv_fwd(x, weight, bias):
            return torch.empty_like(x).copy_(ref.conv_fwd(x, weight, bias))

        def scan_fwd(u, delta, A, B, C, D, z):
            out, checkpoints, out_z, last = ref.scan_fwd(u, delta, A, B, C, D, z)
            return torch.empty_like(u).copy_(out), checkpoints, out_z, last

        self.conv_fwd, self.scan_fwd = launches.one(conv_fwd, "conv"), launches.one(scan_fwd, "scan")
        self.conv_bwd, self.scan_bwd = ref.conv_bwd, ref.scan_bwd


def test_kernels_a_layers_fused_forward_launches(monkeypatch):
    """Pins the launches of a layer's fused forward on the sorted stream (every projection routed, a bf16 model as
    `model.to(torch.bfloat16)` makes it): a prefill's and a training forward's, counted on CPU as a GPU runs them.
    A change that adds one must update this list on purpose."""
    launches = _Launches()
    monkeypatch.setattr(scan_ops, "cuda_ops", lambda: _KernelLayoutOps(launches))
    monkeypatch.setattr(scan_ops, "runs_on", lambda t: True)
    for name in ("flat_cast", "gather_rows_t", "gather_cols_t", "conv_rows_t", "split_x_proj"):
        monkeypatch.setattr(fused, name, launches.one(getattr(fused, name), name))
    per_layer = []

    def counted(*args, _f=fused.fused_mixer, **kwargs):
        launches.names = []
        try:
            return _f(*args, **kwargs)
        finally:
            per_layer.append(launches.names)
            launches.names = None

    monkeypatch.setattr(fused, "fused_mixer", counted)
    config = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(16, 8, 8), d_model=16, n_layer=3, d_state=4)
    model = mom.MoMForCausalLM(config).bfloat16()
    ids = torch.randint(0, 32, (2, 12))
    layer = ["_to_copy",  # D to fp32 (a bf16 D; none for an fp32 one)
             "flat_cast",  # every expert weight, dt_proj's matrix among them
             "_grouped_mm", "gather_rows_t",  # in_proj, x to sequence-order columns
             "conv", "mm",  # the conv, x_proj
             "split_x_proj", "mm",  # each token's Δ-rank rows into dt_proj's expanded input and B, C; dt_proj
             "scan",  # the scan
             "gather_cols_t", "_grouped_mm"]  # the gated gather into out_proj's rows, out_proj
    once = ["copy_", "zero_"]  # the expanded input's constant rows, by the first layer of a forward
    with torch.no_grad():  # the first calls out of the way (torch._grouped_mm's probe, cached constants)
        model(ids, use_cache=True, logits_to_keep=1)
    per_layer.clear()
    with launches, torch.no_grad():  # a prefill: the conv reads x in in_proj's rows and writes the cache's conv
        model(ids, use_cache=True, logits_to_keep=1)  # window (one kernel for the gather and the conv), then the
    prefill = layer[:3] + ["conv_rows_t"] + layer[5:9] + ["copy_"] + layer[9:]  # SSM state's copy
    # the last layer's output is read at the last position only: in_proj computes x alone, and z for those tokens
    # (their experts; their rows, every expert on them, each one's own), out_proj runs for them alone (the gated
    # gather, every expert on them, each one's own)
    last = (prefill[:2] + ["index_select", "_grouped_mm", "index_select", "bmm", "gather"] + prefill[3:-2]
            + ["gather_cols_t", "bmm", "gather"])
    assert per_layer == [once + prefill] + [prefill] * (config.n_layer - 2) + [last]
    per_layer.clear()
    with launches:  # a training forward: each layer copies the expanded input, which its backward reads
        model(ids, labels=ids)
    training = layer[:6] + ["clone"] + layer[6:]
    assert per_layer == [once + training] + [training] * (config.n_layer - 1)


def test_a_prefills_launches_outside_its_layers_do_not_grow_with_depth(monkeypatch):
    """Everything a prefill launches besides its layers (input checks, routing, every layer's A, the embedding, the
    head) is per forward: the same count at 2 and at 5 layers. The cache's states are not zeroed: the prefill writes
    them whole."""
    from mom.model import modeling

    launches = _Launches()
    monkeypatch.setattr(scan_ops, "cuda_ops", lambda: _KernelLayoutOps(launches))
    monkeypatch.setattr(scan_ops, "runs_on", lambda t: True)
    monkeypatch.setattr(fused, "fused_mixer", launches.one(fused.fused_mixer, "layer"))
    monkeypatch.setattr(modeling, "add_norm", launches.one(modeling.add_norm, "layer"))
    outside = {}
    for n_layer in (2, 5):
        config = mom.MoMConfig(modalities=MODALITIES, vocab_sizes=(16, 8, 8), d_model=16, n_layer=n_layer, d_state=4)
        model = mom.MoMForCausalLM(config).bfloat16()
        model.keep_ssm_params_fp32()  # as loaded (A_log and D in fp32); a bf16 A_log takes a cast per layer
        ids = torch.randint(0, 32, (1, 12))
        with torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1)  # first calls out of the way
            launches.names = []
            with launches:
                model(ids, use_cache=True, logits_to_keep=1)
        names, launches.names = launches.names, None
        assert names.count("layer") == 2 * n_layer + 1  # add + norm and mixer per layer, the final norm
        outside[n_layer] = [name for name in names if name != "layer"]
    assert outside[2] == outside[5] and "_foreach_zero_" not in outside[2], outside


@pytest.mark.parametrize("bias", [False, True])
def test_a_forward_without_backward_reads_the_experts_own_weights_where_they_run_per_expert(monkeypatch, bias):
    """Without a backward, a routed in_proj and out_proj that run per expert (`grouped.per_expert`) on parameters
    already in the compute dtype read those parameters themselves: the one cast copies x_proj and dt_proj only. The
    prefill's output and states equal the module path's; a forward with backward still casts every parameter."""
    mixer = make_mixer(PROJECTIONS, bias=bias)
    modality_ids = layouts()["uneven runs"]
    cast = []
    real = fused.flat_cast
    monkeypatch.setattr(fused, "flat_cast", lambda ts, *a: cast.append(sum(t.numel() for t in ts)) or real(ts, *a))
    monkeypatch.setattr(grouped, "PER_EXPERT_MACS", 0)  # every GEMM large enough to run per expert
    want = _prefill(mixer, modality_ids, fast=False)
    got = _prefill(mixer, modality_ids, fast=True, counts=True)
    _prefill(mixer, modality_ids, fast=True, grad=True, counts=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    params = dict(mixer.named_parameters())
    big = sum(p.numel() for name, p in params.items() if name.startswith(("in_proj", "out_proj")))
    everything = sum(p.numel() for name, p in params.items() if name.startswith(("in_proj", "out_proj", "x_proj",
                                                                                 "dt_proj")))
    zeros = cast[1] - everything  # dt_proj's padding columns, cast from a buffer of zeros
    assert zeros >= 0 and cast == [everything - big + zeros, everything + zeros]
