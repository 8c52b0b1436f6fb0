"""The one-token decode step (each row's experts picked on the device) and the decode-graph bookkeeping, on CPU.

`DecodeGraphs` runs here with an eager "capture" (replay = call the step again on the static buffers), so that its
buffers, cache binding and invalidation are the ones the CUDA graph path uses; tests/ops/test_cuda.py replays real
CUDA graphs."""

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from helpers import interleaved_ids, needs_generate_cache, tiny_config

import mom
from mom.model import mixer as mixer_module
from mom.model.graph import DecodeGraphs, is_plain
from mom.model.routing import RoutedLinear, Routing, project, project_rows

MODALITIES = ("text", "image", "speech")
RUNS = [(0, 3), (1, 4), (2, 3), (0, 2)]


def _model(seed: int = 0, **overrides) -> mom.MoMForCausalLM:
    torch.manual_seed(seed)
    return mom.MoMForCausalLM(tiny_config(**overrides)).eval()


def _mixed_rows(model, batch: int = 4) -> torch.Tensor:
    """(batch, 12) ids whose rows are in different modalities at the same position (each row's runs shifted)."""
    ids = interleaved_ids(model.config, batch, RUNS, generator=torch.Generator().manual_seed(3))
    return torch.stack([row.roll(3 * i) for i, row in enumerate(ids)])


@pytest.fixture(params=["pick on device", "cpu routed path"])
def pick(request, monkeypatch):
    """Run a test with both strategies of `project_rows`: the device pick (CUDA's) and the CPU's routed path."""
    if request.param == "pick on device":
        monkeypatch.setattr(mixer_module, "project_rows", functools.partial(project_rows, pick_on_device=True))
    return request.param


def _eager_graphs() -> DecodeGraphs:
    return DecodeGraphs(capture=lambda fn, pool: fn, device_type="cpu")


@pytest.mark.parametrize("on_device", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_project_rows_equals_the_routed_module_path(bias, on_device):
    layer = RoutedLinear(MODALITIES, 6, 5, bias=bias)
    x = torch.randn(7, 6)
    routing = Routing.build(torch.tensor([2, 0, 1, 1, 2, 0, 0]).view(-1, 1), 3)
    expected = project(layer, x.unsqueeze(1), routing)[:, 0]
    torch.testing.assert_close(project_rows(layer, x, routing, on_device), expected)
    shared = nn.Linear(6, 5, bias=bias)
    torch.testing.assert_close(project_rows(shared, x, routing, on_device), shared(x))


def test_project_rows_keeps_each_rows_expert_when_another_is_not_finite():
    layer = RoutedLinear(MODALITIES, 4, 3, bias=True)
    with torch.no_grad():
        layer["image"].bias.fill_(float("inf"))
    routing = Routing.build(torch.tensor([[0], [2]]), 3)
    assert torch.isfinite(project_rows(layer, torch.randn(2, 4), routing, pick_on_device=True)).all()


@pytest.mark.parametrize("overrides", [{}, {"bias": True}, {"decouple": ()}, {"decouple": ("x_proj", "out_proj")}],
                         ids=["routed", "bias", "dense", "some-routed"])
def test_mixed_modality_steps_equal_the_full_forward(overrides, pick):
    model = _model(**overrides)
    ids = _mixed_rows(model)
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :4], use_cache=True).cache
        steps = [model.decode_logits(ids[:, t : t + 1], cache) for t in range(4, ids.shape[1])]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:], atol=1e-5, rtol=1e-5)
    assert cache.seqlen_offset == ids.shape[1]


@needs_generate_cache
def test_generate_decodes_through_the_sync_free_step(monkeypatch):
    model = _model()
    prompt = _mixed_rows(model)[:, :6]
    calls = []
    step = mom.MoMForCausalLM.decode_logits
    monkeypatch.setattr(mom.MoMForCausalLM, "decode_logits", lambda self, *a: (calls.append(1), step(self, *a))[1])
    fast = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert len(calls) == 4  # every step after the prefill
    slow = model.generate(prompt, max_new_tokens=5, do_sample=False, cuda_graph=False)
    assert len(calls) == 4 and torch.equal(fast, slow)


def test_lora_wrapped_experts_step_as_the_full_forward(pick):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["in_proj.image", "out_proj.speech"],
                                                          init_lora_weights=False)).eval()
    base = model.base_model.model
    ids = _mixed_rows(base)
    with torch.no_grad():
        full = base(ids).logits
        cache = base(ids[:, :4], use_cache=True).cache
        steps = [base.decode_logits(ids[:, t : t + 1], cache) for t in range(4, ids.shape[1])]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_the_steps_fused_kernels_in_tritons_interpreter_equal_the_full_forward(lora):
    """`MoMMixer.step` with the CUDA step's kernels forced on the CPU (Triton's interpreter): in_proj with its conv
    step (`routed_rows.ConvStep`) and dt_proj with the state update (`mom.ops.triton.state_update`) give the full
    forward's logits; LoRA-wrapped in_proj / dt_proj experts are called as modules instead (no fused kernel)."""
    pytest.importorskip("triton")
    if lora:
        pytest.importorskip("peft")
    script = textwrap.dedent(f"""
        import functools
        import torch
        from helpers import interleaved_ids, tiny_config
        import mom
        from mom.model import mixer
        from mom.model.routing import project_rows
        from mom.ops.triton import routed_rows, state_update

        # the kernels' own conditions, but for the device (CPU tensors run in the interpreter)
        routed_rows.kernel_applies = lambda x, w: x.dim() == 2 and x.stride(1) == 1 and 0 < len(w) <= 4
        state_update.kernel_applies = lambda *a: True
        mixer.project_rows = functools.partial(project_rows, pick_on_device=True)
        fused = {{"conv": 0, "state": 0}}
        rows_linear, update = routed_rows.routed_rows_linear, state_update.routed_state_update
        routed_rows.routed_rows_linear = lambda *a, **k: (
            fused.__setitem__("conv", fused["conv"] + (k.get("conv") is not None)) or rows_linear(*a, **k))
        state_update.routed_state_update = lambda *a, **k: (
            fused.__setitem__("state", fused["state"] + 1) or update(*a, **k))

        torch.manual_seed(0)
        model = mom.MoMForCausalLM(tiny_config()).eval()
        if {lora}:
            import peft
            model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["in_proj.image", "dt_proj.text"],
                                                               init_lora_weights=False)).eval().base_model.model
        ids = interleaved_ids(model.config, 4, [(0, 3), (1, 4), (2, 3), (0, 2)],
                              generator=torch.Generator().manual_seed(3))
        ids = torch.stack([row.roll(3 * i) for i, row in enumerate(ids)])
        with torch.no_grad():
            full = model(ids).logits
            cache = model(ids[:, :4], use_cache=True).cache
            steps = [model.decode_logits(ids[:, t : t + 1], cache) for t in range(4, ids.shape[1])]
        torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:], atol=1e-5, rtol=1e-5)
        print(fused["conv"], fused["state"])
    """)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for `helpers`
    path = os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    layer_steps = 2 * 8  # tiny_config's 2 layers, 8 steps
    assert done.stdout.split() == (["0", "0"] if lora else [str(layer_steps), str(layer_steps)])


@needs_generate_cache
def test_graphs_replay_the_eager_tokens_and_are_reused_per_batch(pick):
    model = _model()
    prompt = _mixed_rows(model)[:, :6]
    eager = model.generate(prompt, max_new_tokens=6, do_sample=False, cuda_graph=False)
    model.decode_graphs = graphs = _eager_graphs()
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), eager)
    assert graphs.captures == 1
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), eager)
    assert graphs.captures == 1  # same batch: the graph is replayed for the new cache
    model.generate(prompt[:2], max_new_tokens=3, do_sample=False)
    assert graphs.captures == 2 and len(graphs.graphs) == 2


def test_steps_under_autocast_are_captured_apart():
    """A graph runs in the dtypes it saw at capture: a step under autocast does not replay one captured without."""
    model = _model()
    model.decode_graphs = graphs = _eager_graphs()
    prompt = _mixed_rows(model)[:, :6]
    cache = mom.MoMCache(model.config)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
        model.decode_logits(prompt[:, -1:], cache)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.decode_logits(prompt[:, -1:], cache)
        model.decode_logits(prompt[:, -1:], cache)
    assert graphs.captures == 2 and len(graphs.graphs) == 2


@needs_generate_cache
def test_a_cache_keeps_its_states_when_another_takes_the_graph():
    model = _model()
    model.decode_graphs = _eager_graphs()
    prompt = _mixed_rows(model)[:, :6]
    first = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    model.generate(prompt.flip(0), max_new_tokens=4, do_sample=False)  # another cache binds the same graph
    continued = model.generate(first.sequences, cache=first.cache, max_new_tokens=4, do_sample=False)
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False, cuda_graph=False)
    assert torch.equal(continued, expected)


@needs_generate_cache
def test_replaced_weights_drop_the_graphs():
    model = _model()
    model.decode_graphs = graphs = _eager_graphs()
    prompt = _mixed_rows(model)[:, :6]
    model.generate(prompt, max_new_tokens=3, do_sample=False)
    other = _model(seed=1)
    model.load_state_dict(other.state_dict(), assign=True)  # new parameter tensors: a graph would read the old ones
    expected = other.generate(prompt, max_new_tokens=5, do_sample=False, cuda_graph=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), expected)
    assert graphs.captures == 2


@needs_generate_cache
def test_in_place_weight_changes_are_replayed():
    model = _model()
    model.decode_graphs = graphs = _eager_graphs()
    prompt = _mixed_rows(model)[:, :6]
    model.generate(prompt, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False, cuda_graph=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), expected)
    assert graphs.captures == 1


def test_graphs_apply_to_plain_models_only():
    peft = pytest.importorskip("peft")
    model = _model()
    graphs = model.decode_graphs = _eager_graphs()
    cache = mom.MoMCache(model.config, batch_size=2)
    ids = torch.zeros(2, 1, dtype=torch.long)
    assert is_plain(model)
    with torch.no_grad():
        assert graphs.applies(model, ids, cache)
        cache.activate_past_recording()
        assert not graphs.applies(model, ids, cache)  # recording states for rollback: eager
    assert not graphs.applies(model, ids, mom.MoMCache(model.config, batch_size=2))  # gradients enabled
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["in_proj.image"]))
    with torch.no_grad():
        assert not graphs.applies(model, ids, mom.MoMCache(model.config, batch_size=2))  # a LoRA wrapper: eager
        merged = wrapped.merge_and_unload()
        assert merged is model and graphs.applies(model, ids, mom.MoMCache(model.config, batch_size=2))


@needs_generate_cache
def test_lora_generate_with_graphs_equals_eager_merged_or_not(pick):
    peft = pytest.importorskip("peft")
    model = _model()
    model.decode_graphs = graphs = _eager_graphs()
    prompt = _mixed_rows(model)[:, :6]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["in_proj.image", "x_proj.text"],
                                                         init_lora_weights=False)).eval()
    eager = wrapped.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, cuda_graph=False)
    assert torch.equal(wrapped.generate(input_ids=prompt, max_new_tokens=5, do_sample=False), eager)
    assert graphs.captures == 0  # wrapped experts decode eagerly
    merged = wrapped.merge_and_unload()
    assert torch.equal(merged.generate(prompt, max_new_tokens=5, do_sample=False), eager)
    assert graphs.captures == 1


def test_cache_adopts_and_releases_states():
    config = tiny_config()
    cache = mom.MoMCache(config, batch_size=2)
    for i, s in enumerate(cache.conv_states + cache.ssm_states):
        s.fill_(i)
    target = cache.zeros_like()
    cache.adopt_states(target.conv_states, target.ssm_states)
    assert cache.holds_states(target.conv_states, target.ssm_states)
    assert [int(s[0, 0, 0]) for s in target.conv_states + target.ssm_states] == list(range(2 * config.n_layer))
    cache.release_states()
    assert not cache.holds_states(target.conv_states, target.ssm_states)
    target.conv_states[0].fill_(-1)
    assert int(cache.conv_states[0][0, 0, 0]) == 0


@needs_generate_cache
def test_beam_search_with_graphs_equals_beam_search_without(pick):
    model = _model()
    prompt = _mixed_rows(model, batch=2)[:, :6]
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=2)
    without = model.generate(prompt, use_cache=False, **kwargs)
    model.decode_graphs = graphs = _eager_graphs()
    assert torch.equal(model.generate(prompt, **kwargs), without)  # the reordered cache is copied in every step
    assert graphs.captures == 1


def test_copied_and_pickled_models_capture_their_own_graphs():
    import copy
    import pickle

    model = _model()
    model.decode_graphs = _eager_graphs()
    model.generate(_mixed_rows(model)[:, :6], max_new_tokens=3, do_sample=False)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.decode_graphs is not model.decode_graphs and not other.decode_graphs.graphs
