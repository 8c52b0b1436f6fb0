"""Prefill graphs (`mom.model.prefill_graph`): when a prompt shape is recorded, what a replay gives back, and when
the forward runs eagerly instead. On CPU `PrefillGraphs` runs with an eager "capture": a replay runs the recorded
prefill again on the static buffers, believing itself recorded (so it neither checks its ids nor reads the device,
as a replayed graph does not), so that its buffers, checks and invalidation are those of the CUDA path; the last
test records real CUDA graphs."""

import contextlib
from unittest import mock

import pytest
import torch
from helpers import interleaved_ids, tiny_config

import mom
from mom.model import inputs, modeling, prefill_graph
from mom.model.cache import MoMCache
from mom.model.prefill_graph import PrefillGraphs
from mom.ops import backend, grouped

RUNS = [(0, 5), (1, 6), (2, 4), (0, 3)]  # 18 tokens a row


def _model(**overrides) -> mom.MoMForCausalLM:
    torch.manual_seed(0)
    model = mom.MoMForCausalLM(tiny_config(**overrides)).eval()
    model.prefill_graphs = _eager_graphs()
    return model


REHEARSALS = []  # one entry per forward run in `_as_if_recording` (the tests read it)


@contextlib.contextmanager
def _as_if_recording():
    """Forwards in this block take a recorded forward's path (`mom.model.inputs.capturing` is true), as
    `mom.model.inputs.rehearsal` makes them on CUDA."""
    REHEARSALS.append(1)
    recording = lambda t: True  # noqa: E731
    with mock.patch.object(modeling, "capturing", recording), mock.patch.object(inputs, "capturing", recording):
        yield


def _as_recorded(fn, pool):
    """An eager "capture": the replay runs ``fn`` as a recorded forward would run."""

    def replay() -> None:
        with _as_if_recording():
            fn()

    return replay


def _eager_graphs(capture=_as_recorded) -> PrefillGraphs:
    return PrefillGraphs(capture=capture, device_type="cpu", rehearse=_as_if_recording)


def _ids(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return interleaved_ids(model.config, batch, RUNS, generator=torch.Generator().manual_seed(seed))


def _prefill(model, ids, cuda_graph: bool = True, keep: int = 1, **kwargs):
    cache = MoMCache(model.config)
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True, logits_to_keep=keep, cuda_graph=cuda_graph, **kwargs)
    return out.logits, cache


def _assert_same_prefill(got, want) -> None:
    (logits, cache), (want_logits, want_cache) = got, want
    torch.testing.assert_close(logits, want_logits)
    assert cache.seqlen_offset == want_cache.seqlen_offset
    for a, b in zip(cache.conv_states + cache.ssm_states, want_cache.conv_states + want_cache.ssm_states, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("keep", [1, 3])
def test_a_shape_is_recorded_the_second_time_and_replayed_for_other_prompts_of_it(keep):
    model = _model()
    graphs = model.prefill_graphs
    first, second, third = _ids(model, seed=0), _ids(model, seed=1), _ids(model, seed=2)
    _assert_same_prefill(_prefill(model, first, keep=keep), _prefill(model, first, cuda_graph=False, keep=keep))
    assert graphs.captures == 0 and not graphs.graphs  # a shape seen once runs eagerly
    _assert_same_prefill(_prefill(model, second, keep=keep), _prefill(model, second, cuda_graph=False, keep=keep))
    assert graphs.captures == 1
    got = _prefill(model, third, keep=keep)  # replayed on the third prompt's ids
    assert graphs.captures == 1
    _assert_same_prefill(got, _prefill(model, third, cuda_graph=False, keep=keep))
    assert got[0].shape == (2, keep, model.config.vocab_size)


@pytest.mark.parametrize("overrides", [{"mixer": "mamba2", "d_model": 32, "headdim": 8, "d_state": 8},
                                       {"channel_mixer": "einfft"}, {"channel_mixer": "selective"}],
                         ids=["mamba2", "einfft", "selective channel mixer"])
def test_other_mixers_replay_the_eager_prefill(overrides):
    model = _model(**overrides)
    for seed in range(3):  # eager, recorded, replayed
        ids = _ids(model, seed=seed)
        _assert_same_prefill(_prefill(model, ids), _prefill(model, ids, cuda_graph=False))
    assert model.prefill_graphs.captures == 1


def test_the_replayed_prefill_generates_what_the_eager_one_does():
    model = _model()
    ids = _ids(model)
    want = model.generate(ids, max_new_tokens=5, do_sample=False, cuda_graph=False)
    for _ in range(3):  # eager, recorded, replayed
        assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, cuda_graph=False,
                                          prefill_cuda_graph=True), want)
    assert model.prefill_graphs.captures == 1


def test_autocast_prefills_are_recorded_apart():
    """A recording runs in the dtypes it saw: a prefill under autocast does not replay one recorded without it."""
    model = _model()
    ids = _ids(model)
    for _ in range(2):
        _prefill(model, ids)
    assert model.prefill_graphs.captures == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _prefill(model, ids, cuda_graph=False)
        for _ in range(3):
            _assert_same_prefill(_prefill(model, ids), want)
    assert model.prefill_graphs.captures == 2
    assert want[0].dtype == torch.float32 and not torch.equal(want[0], _prefill(model, ids)[0])  # autocast mattered


def test_generate_records_the_prompts_prefill_unless_told_not_to():
    model = _model()
    ids = _ids(model)
    for _ in range(3):
        model.generate(ids, max_new_tokens=2, do_sample=False, cuda_graph=False, prefill_cuda_graph=False)
    assert model.prefill_graphs.captures == 0
    for _ in range(2):  # the default: recorded at the shape's second prompt
        model.generate(ids, max_new_tokens=2, do_sample=False, cuda_graph=False)
    assert model.prefill_graphs.captures == 1


def test_prefills_recorded_and_replayed_under_inference_mode_give_the_eager_prefill():
    model = _model()
    ids = _ids(model)
    want = _prefill(model, ids, cuda_graph=False)
    with torch.inference_mode():
        for _ in range(3):  # eager, recorded, replayed
            got = _prefill(model, ids)
            _assert_same_prefill(got, want)
            generated = model.generate(ids, max_new_tokens=3, do_sample=False, cuda_graph=False)
    assert model.prefill_graphs.captures == 1
    assert torch.equal(generated, model.generate(ids, max_new_tokens=3, do_sample=False, prefill_cuda_graph=False))


def test_no_recording_where_the_routed_gemms_cannot_group_on_the_device():
    """On CUDA only bf16 GEMMs group their tokens there (`torch._grouped_mm`): an fp32 or fp16 model prefills
    eagerly, without a failed recording's warning."""
    model = _model()
    cuda = torch.device("cuda")
    assert not model._groups_on_device(cuda)  # fp32 (this asks no CUDA device: the dtype decides)
    assert not model.half()._groups_on_device(cuda)
    assert model.float()._groups_on_device(torch.device("cpu"))  # the CPU's grouped GEMM takes fp32


@pytest.mark.parametrize("recorded", [False, True])
def test_bad_ids_raise_before_the_cache_is_written(recorded):
    """Before its recording a shape's prefill runs on the recording's path, which checks nothing: its ids are
    checked first, as for a replay."""
    model = _model()
    ids = _ids(model)
    if recorded:
        _prefill(model, ids)
        _prefill(model, ids)
    bad = ids.clone()
    bad[1, 4] = model.config.vocab_size
    cache = MoMCache(model.config)
    with pytest.raises(ValueError, match=f"token id {model.config.vocab_size} is out of range"):
        with torch.no_grad():
            model(bad, cache=cache, use_cache=True, logits_to_keep=1, cuda_graph=True)
    assert cache.seqlen_offset == 0 and not cache.is_initialized


def test_a_shapes_prefills_before_its_recording_run_on_the_recordings_path():
    """So that a prompt's logits do not depend on whether its shape was recorded yet."""
    model = _model()
    ids = _ids(model)
    REHEARSALS.clear()
    want = _prefill(model, ids, cuda_graph=False)
    assert not REHEARSALS  # an eager forward outside prefill graphs: its own path
    _assert_same_prefill(_prefill(model, ids), want)
    assert len(REHEARSALS) == 1 and model.prefill_graphs.captures == 0


def test_replaced_weights_drop_the_graphs():
    model = _model()
    ids = _ids(model)
    _prefill(model, ids)
    _prefill(model, ids)
    assert len(model.prefill_graphs.graphs) == 1
    with torch.no_grad():
        weight = model.backbone.layers[0].mixer.in_proj["text"].weight
        weight.data = weight.data + 0.5  # a new storage, no module assignment: seen by the weights' check
    got = _prefill(model, ids)
    assert not model.prefill_graphs.graphs  # dropped; this prompt counts as the shape's first again
    _assert_same_prefill(got, _prefill(model, ids, cuda_graph=False))


@pytest.mark.parametrize("case", ["grad", "keep all", "mask", "modality ids", "hidden states", "no flag", "too long",
                                  "attention layer"])
def test_other_forwards_run_eagerly(case, monkeypatch):
    model = _model(attention_layers=(1,), attention_heads=2) if case == "attention layer" else _model()
    ids = _ids(model)
    kwargs = {"mask": {"attention_mask": torch.ones_like(ids)},
              "modality ids": {"modality_ids": model.config.modality_of(ids)},
              "hidden states": {"output_hidden_states": True}}.get(case, {})
    if case == "too long":
        monkeypatch.setattr(prefill_graph, "MAX_TOKENS", ids.numel() - 1)
    for _ in range(3):
        cache = MoMCache(model.config)
        with torch.set_grad_enabled(case == "grad"):
            model(ids, cache=cache, use_cache=True, logits_to_keep=0 if case == "keep all" else 1,
                  cuda_graph=case != "no flag", **kwargs)
        assert cache.seqlen_offset == ids.shape[1]
    assert model.prefill_graphs.captures == 0 and not model.prefill_graphs.graphs


def test_a_shape_that_cannot_be_recorded_runs_eagerly_for_good():
    calls = []

    def failing(fn, pool):
        calls.append(fn)
        raise RuntimeError("operation not permitted when stream is capturing")

    model = _model()
    model.prefill_graphs = _eager_graphs(failing)
    ids = _ids(model)
    want = _prefill(model, ids, cuda_graph=False)
    for _ in range(4):
        _assert_same_prefill(_prefill(model, ids), want)
    assert len(calls) == 1 and model.prefill_graphs.captures == 0  # tried once


def test_at_most_max_graphs_shapes_are_kept(monkeypatch):
    monkeypatch.setattr(prefill_graph, "MAX_GRAPHS", 2)
    model = _model()
    shapes = [_ids(model, batch) for batch in (1, 2, 3)]
    for ids in shapes:
        _prefill(model, ids)
        _prefill(model, ids)
    assert model.prefill_graphs.captures == 3
    assert [key[0] for key in model.prefill_graphs.graphs] == [2, 3]  # the least recently used dropped
    _assert_same_prefill(_prefill(model, shapes[0]), _prefill(model, shapes[0], cuda_graph=False))


class _Wrapped(torch.nn.Module):
    """A module from outside torch / transformers / mom around an expert (as a peft LoRA wrapper is)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_a_model_with_modules_from_elsewhere_prefills_eagerly():
    model = _model()
    experts = model.backbone.layers[0].mixer.in_proj
    experts["text"] = _Wrapped(experts["text"])
    ids = _ids(model)
    want = _prefill(model, ids, cuda_graph=False)
    for _ in range(3):
        _assert_same_prefill(_prefill(model, ids), want)
    assert model.prefill_graphs.captures == 0


def test_a_copied_model_records_its_own_graphs():
    import copy
    import pickle

    model = _model()
    ids = _ids(model)
    _prefill(model, ids)
    _prefill(model, ids)
    twin = copy.deepcopy(model)
    assert twin.prefill_graphs is not model.prefill_graphs and not twin.prefill_graphs.graphs
    assert not pickle.loads(pickle.dumps(model.prefill_graphs)).graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("own_weights", [False, True])
def test_cuda_prefill_graph_replays_the_eager_prefill(own_weights, monkeypatch):
    """A real CUDA graph (bf16: the routed GEMMs group the tokens on the device while recording) gives the eager
    prefill's logits and states. ``own_weights``: the eager forward's in_proj and out_proj read each expert's own
    weights (as large prompts do), so only the recording's path casts them all: its warm-up runs must build what
    that path needs (`mom.model.inputs.rehearsal`), as no table can be copied from host memory while recording."""
    if backend.backend_name(torch.device("cuda")) == "reference":
        pytest.skip("mamba-ssm CUDA kernels not importable")
    if own_weights:
        monkeypatch.setattr(grouped, "PER_EXPERT_MACS", 0)
    torch.manual_seed(0)
    config = tiny_config(vocab_sizes=(200, 120, 80), d_model=64, n_layer=2, d_state=16, dt_rank=4)
    model = mom.MoMForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.keep_ssm_params_fp32()
    ids = interleaved_ids(config, 2, [(0, 64), (1, 256), (2, 128), (0, 64)]).cuda()
    want = _prefill(model, ids, cuda_graph=False)
    first = _prefill(model, ids)  # before the recording: eagerly, on the recording's path
    for _ in range(2):
        got = _prefill(model, ids)
    assert model.prefill_graphs.captures == 1
    logits, cache = got
    torch.testing.assert_close(logits, want[0], atol=2e-2, rtol=2e-2)
    assert torch.equal(logits, first[0])  # the same kernels, whether the shape was recorded yet or not
    for a, b in zip(cache.conv_states + cache.ssm_states, want[1].conv_states + want[1].ssm_states, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
