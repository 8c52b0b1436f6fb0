"""CUDA-graph decoding: a model's one-token step captured once per (batch size, dtype, autocast, device),
replayed per token.

As mamba-ssm's ``generate(cg=True)`` (``mamba_ssm/utils/generation.py``, ``capture_graph``): a `DecodeGraph` owns
static buffers for the step's input ids (b, 1), every layer's recurrent state and the logits (b, V); its graph reads
and writes exactly those, so a replay costs one launch instead of the step's hundreds. A step picks each row's
experts on the device (`mom.model.routing.project_rows`), so one graph serves any mix of modalities across rows.

The states live in the graph's buffers while a cache decodes with it: the first replayed step of a `MoMCache` copies
its states in and the cache holds the buffers from then on (`MoMCache.adopt_states`); when another cache takes the
graph, the previous one gets private copies back (`MoMCache.release_states`). A cache whose tensors were replaced
since (beam search's reorder, a crop) is copied in again.

A graph holds the addresses of the weights it read at capture: in-place changes are seen, replaced tensors are not.
So `DecodeGraphs` drops its graphs when the model's weights (each parameter's and buffer's storage, dtype and shape)
or modules differ from those captured: checked when a cache is bound, and at every step whether a module or parameter
was assigned anywhere (torch's global registration hooks: peft wrapping an expert, ``merge_and_unload``,
``load_state_dict(assign=True)``). Graphs apply only to models of plain torch and mom modules (`is_plain`): a module
from elsewhere (a peft LoRA wrapper, whose merged / active-adapter switches are Python branches a graph would freeze)
decodes eagerly, through the same sync-free step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from mom.model import inputs, registrations
from mom.model.cache import MoMCache

WARMUP_STEPS = 2  # eager runs on a side stream before capture (allocator and Triton autotuning settle), as mamba-ssm
PLAIN_MODULE_PREFIXES = ("torch.nn.", "mom.", "transformers.")  # module types a graph may capture

StepFn = Callable[[torch.Tensor, MoMCache], torch.Tensor]  # (ids (b, 1), cache) -> logits (b, V), no host sync
Replay = Callable[[], None]
Capture = Callable[[Callable[[], None], object], Replay]  # (fn writing the static outputs, memory pool) -> replay

def capture_cuda_graph(fn: Callable[[], None], pool: object, warmup: int = WARMUP_STEPS) -> Replay:
    """Warm ``fn`` up on a side stream (``warmup`` runs, on the recording's path: `inputs.rehearsal`; none where the
    caller warmed it up, e.g. a training step, whose runs change the weights), capture it into a
    ``torch.cuda.CUDAGraph`` in ``pool``; -> its replay."""
    if warmup:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), inputs.rehearsal():
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype on ``device_type`` now, None where it is off: part of a graph's key, as a recording runs in the
    dtypes it saw."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def is_plain(model: nn.Module) -> bool:
    """Whether every module of ``model`` is a torch, transformers or mom module (nothing a graph could freeze)."""
    return all(type(m).__module__.startswith(PLAIN_MODULE_PREFIXES) for m in model.modules())


def fingerprint(model: nn.Module) -> tuple:
    """The modules and the storage, dtype and shape of every parameter and buffer: what a capture depends on."""
    modules = tuple((name, id(m)) for name, m in model.named_modules())
    named = (*model.named_parameters(), *model.named_buffers())
    return modules, tuple(name for name, _ in named), storage_places(t for _, t in named)


def storage_places(tensors: Iterable[torch.Tensor]) -> tuple:
    """Each tensor's address, dtype and shape: where a recorded graph reads it (a graph holds addresses, so a tensor
    whose storage was replaced, by a ``.data`` swap or ``model.to``, is no longer read by it)."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in tensors)


@dataclass
class DecodeGraph:
    """One captured step: static ids (b, 1), states (as a `MoMCache` holding them) and logits (b, V); ``owner``: the
    cache that holds the states now (weakly)."""

    input_ids: torch.Tensor
    cache: MoMCache
    logits: torch.Tensor
    replay: Replay
    owner: weakref.ref[MoMCache] | None = None

    def bound_to(self, cache: MoMCache) -> bool:
        return cache.holds_states(self.cache.conv_states, self.cache.ssm_states)

    def owned_by(self, cache: MoMCache) -> bool:
        """Whether ``cache`` was the last to bind (it may hold other tensors since: beam search reorders them)."""
        return self.owner is not None and self.owner() is cache

    def bind(self, cache: MoMCache) -> None:
        """Make ``cache`` hold this graph's states (its own copied in); the previous holder gets private copies."""
        self.release()
        cache.adopt_states(self.cache.conv_states, self.cache.ssm_states)
        self.owner = weakref.ref(cache)

    def release(self) -> None:
        owner = self.owner() if self.owner is not None else None
        if owner is not None and self.bound_to(owner):
            owner.release_states()
        self.owner = None

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Decode one token per row for the bound cache: ids (b, 1) -> logits (b, V), a copy."""
        self.input_ids.copy_(input_ids)
        self.replay()
        return self.logits.clone()


class DecodeGraphs:
    """A model's decode graphs, keyed by (batch, state dtype, autocast's dtype, device); built on first use, dropped
    when the model's weights change (module docstring). ``capture`` and ``device_type`` default to CUDA graphs on CUDA
    tensors; the tests pass an eager capture to run the buffer management on CPU."""

    def __init__(self, capture: Capture = capture_cuda_graph, device_type: str = "cuda") -> None:
        self.capture, self.device_type = capture, device_type
        self.graphs: dict[tuple, DecodeGraph] = {}
        self.captures = 0  # graphs captured so far (the tests read it)
        self._pool: object = None
        self._fingerprint: tuple | None = None
        self._registrations: object = None
        self._plain = False  # `is_plain(model)`, as of the registration token ``_plain_checked``
        self._plain_checked: object = None

    def __deepcopy__(self, memo: dict) -> DecodeGraphs:
        return DecodeGraphs(self.capture, self.device_type)  # a copied model captures its own graphs

    def __reduce__(self) -> tuple:
        return DecodeGraphs, ()  # a pickled model is unpickled without graphs (it captures its own)

    def applies(self, model: nn.Module, input_ids: torch.Tensor, cache: MoMCache) -> bool:
        """Whether a step on ``input_ids`` (b, 1) after ``cache`` can replay a graph (model of plain modules, tensors
        of ``device_type``, no gradient, a cache that is not recording states for rollback and whose states keep their
        size: a hybrid model's key/value cache grows every step, so it decodes eagerly)."""
        if input_ids.device.type != self.device_type or torch.is_grad_enabled() or cache.recording:
            return False
        if not cache.fixed_size:
            return False
        if self._plain_checked is not registrations.current():
            self._plain, self._plain_checked = is_plain(model), registrations.current()
        return self._plain

    def step(self, model: nn.Module, step_fn: StepFn, input_ids: torch.Tensor, cache: MoMCache) -> torch.Tensor:
        """One token per row through the graph of this batch (captured now if new): ids (b, 1) -> logits (b, V);
        ``cache``'s states advance (it holds the graph's buffers from now on). The weights are checked when a new
        cache binds and after any module or parameter assignment; a cache whose states were replaced since it bound
        (beam search's reorder) is copied in again."""
        key = (input_ids.shape[0], cache.conv_states[0].dtype, autocast_dtype(self.device_type), input_ids.device)
        graph = self.graphs.get(key)
        if self._registrations is not registrations.current() or graph is None or not graph.owned_by(cache):
            self._registrations = registrations.current()
            current = fingerprint(model)
            if current != self._fingerprint:
                self.clear()
                self._fingerprint = current
            graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(step_fn, input_ids, cache)
        if not graph.bound_to(cache):
            graph.bind(cache)
        return graph.step(input_ids)

    def clear(self) -> None:
        """Drop every graph (their caches get private copies of their states first)."""
        for graph in self.graphs.values():
            graph.release()
        self.graphs.clear()
        self._pool = None
        self._fingerprint = None

    def _capture(self, step_fn: StepFn, input_ids: torch.Tensor, cache: MoMCache) -> DecodeGraph:
        with torch.inference_mode(False), torch.no_grad():  # buffers that a later no-grad forward may update
            static_ids = torch.zeros_like(input_ids)
            static_cache = cache.zeros_like()
            static_logits = torch.empty_like(step_fn(static_ids, static_cache))  # (b, V)

        def run() -> None:
            static_logits.copy_(step_fn(static_ids, static_cache))

        if self._pool is None and self.device_type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        self.captures += 1
        return DecodeGraph(static_ids, static_cache, static_logits, self.capture(run, self._pool))
