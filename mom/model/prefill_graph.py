"""CUDA-graph prefills: a prompt shape's forward into a fresh cache, recorded once and replayed for later prompts of
that shape.

A prefill at a few rows waits on the host: launching its thousands of kernels takes several times as long as
running them (docs/performance.md). `PrefillGraphs` records the prefill of one (batch, length, kept positions) shape
the second time that shape comes and replays it from then on (a one-off prompt runs eagerly and records nothing):
the ids are checked on the host first (`MoMForCausalLM.check_inputs`: a recorded forward cannot read the device to
check them), copied into the graph's input, the graph replayed, and its recurrent states copied into the caller's
cache (one multi-tensor copy). Recorded, the forward cannot read the tokens per modality either, so its routed GEMMs
group the tokens on the device (`mom.ops.grouped`), which `torch._grouped_mm` does for bf16 on CUDA; a forward that
must read them (the module path) cannot be recorded, and its shape then runs eagerly for good (the model does not
ask for graphs in dtypes that need the counts: fp32 and fp16 on CUDA). A shape's prefills before its recording run
eagerly on the recording's path too (`mom.model.inputs.rehearsal`, after the same check of the ids), so a prompt's
logits do not depend on whether its shape was recorded yet (the per-expert GEMMs that an eager prefill of many
tokens would run sum in another order than the grouped ones).

A graph keeps its activations' memory (in one pool that every prefill graph of the model shares, as they never run
at once), so only prompts of up to `MAX_TOKENS` tokens are recorded, and at most `MAX_GRAPHS` shapes are kept. It
holds the addresses of the weights it read: the graphs are dropped when a module or parameter is assigned anywhere
(`mom.model.registrations`) or any weight's storage, dtype or shape differs from the recording's (``.data``
swaps and ``model.to``, checked at every replay). Models of plain modules only (`mom.model.graph.is_plain`): a peft
wrapper's switches are Python branches that a graph would freeze.

On by default in ``generate()`` (MoM's own loop; ``prefill_cuda_graph=False`` turns it off), and for
``model(..., cuda_graph=True)`` on a prefill; figures in docs/performance.md.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from mom.model import inputs, registrations
from mom.model.cache import MoMCache
from mom.model.graph import Capture, autocast_dtype, capture_cuda_graph, is_plain, storage_places

logger = logging.getLogger(__name__)

# Tokens (batch x length) up to which a prefill is recorded: a graph keeps its activations' memory (about 1.5 GiB
# for the 768 x 24 model at 16 x 2048, bf16), and a prefill of many rows is bound by the GPU, not the host.
MAX_TOKENS = 16 * 2048
MAX_GRAPHS = 8  # shapes kept; the least recently used is dropped for a new one
RECORD_AT = 2  # a shape is recorded the second time it comes
MAX_SEEN = 64  # shapes counted (seen fewer than RECORD_AT times) at once; the count restarts beyond

PrefillFn = Callable[[torch.Tensor, MoMCache], torch.Tensor]  # (ids (b, l), fresh cache) -> logits (b, k, V)
Rehearse = Callable[[], contextlib.AbstractContextManager]  # forwards in it take a recorded forward's path


@dataclass
class PrefillGraph:
    """One recorded prefill: static ids (b, l), the cache its forward writes, its logits (b, k, V)."""

    input_ids: torch.Tensor
    cache: MoMCache
    logits: torch.Tensor
    replay: Callable[[], None]


class PrefillGraphs:
    """A model's prefill graphs, keyed by (batch, length, kept positions, the weights' dtype, autocast's dtype,
    device) (module docstring). ``capture``, ``rehearse`` and ``device_type`` default to CUDA graphs on CUDA tensors;
    the tests pass an eager capture and rehearsal to run the bookkeeping on CPU."""

    def __init__(self, capture: Capture = capture_cuda_graph, device_type: str = "cuda",
                 rehearse: Rehearse = inputs.rehearsal) -> None:
        self.capture, self.device_type, self.rehearse = capture, device_type, rehearse
        self.graphs: OrderedDict[tuple, PrefillGraph | None] = OrderedDict()  # None: cannot be recorded
        self.seen: dict[tuple, int] = {}  # prefills per shape not recorded yet
        self.captures = 0  # graphs recorded so far (the tests read it)
        self._pool: object = None
        self._registrations: object = None
        self._tensors: list[torch.Tensor] = []  # the model's parameters and buffers, as of ``_registrations``
        self._weights: tuple | None = None  # their storage, dtype and shape at the recordings
        self._plain = False

    def __deepcopy__(self, memo: dict) -> PrefillGraphs:
        return PrefillGraphs(self.capture, self.device_type, self.rehearse)  # a copied model records its own graphs

    def __reduce__(self) -> tuple:
        return PrefillGraphs, ()

    def applies(self, input_ids: torch.Tensor, cache: MoMCache | None, keep_last: int) -> bool:
        """Whether a forward is a prefill this can record: ids (b, l) of ``device_type`` up to `MAX_TOKENS`, more
        than one token, the last ``keep_last`` >= 1 positions' logits, no gradient, into a fresh cache of fixed-size
        states (no attention layer) that records nothing for rollback."""
        return (input_ids.device.type == self.device_type and input_ids.dim() == 2 and input_ids.shape[1] > 1
                and input_ids.numel() <= MAX_TOKENS and 0 < keep_last <= input_ids.shape[1]
                and not torch.is_grad_enabled() and isinstance(cache, MoMCache) and cache.seqlen_offset == 0
                and cache.fixed_size and not cache.recording
                and (not cache.is_initialized or cache.batch_size == input_ids.shape[0]))

    def logits(self, model: nn.Module, prefill: PrefillFn, input_ids: torch.Tensor, cache: MoMCache,
               keep_last: int, check: Callable[[torch.Tensor], None]) -> torch.Tensor | None:
        """The prefill of ``input_ids`` into ``cache`` from this shape's graph (recorded now if this is the shape's
        `RECORD_AT`-th prefill; before that, eagerly on the recording's path): -> logits (b, keep_last, V), with
        ``cache`` holding the states after the prompt; or None where the caller runs it eagerly (a shape that cannot
        be recorded, a model of other modules). ``check(ids)`` raises for bad ids (before anything is written)."""
        self._drop_if_weights_changed(model)
        if not self._plain:
            return None
        key = (*input_ids.shape, keep_last, model.dtype, autocast_dtype(self.device_type), input_ids.device)
        if key in self.graphs:
            graph = self.graphs[key]
            self.graphs.move_to_end(key)
            if graph is None:  # could not be recorded
                return None
        else:
            if key not in self.seen and len(self.seen) >= MAX_SEEN:
                self.seen.clear()  # prompts of many lengths, each seen once: bounded bookkeeping
            self.seen[key] = self.seen.get(key, 0) + 1
            graph = None
        check(input_ids)  # before anything is recorded or written
        if graph is None:
            if self.seen[key] < RECORD_AT:
                with self.rehearse():
                    return prefill(input_ids, cache)
            del self.seen[key]
            graph = self.graphs[key] = self._record(model.config, prefill, input_ids)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
            if graph is None:
                return None
        graph.input_ids.copy_(input_ids)
        graph.replay()
        if not cache.is_initialized:
            cache.allocate(input_ids.shape[0], input_ids.device, graph.cache.conv_states[0].dtype, zero=False)
        torch._foreach_copy_(cache.conv_states, graph.cache.conv_states)  # one dtype a list: the multi-tensor kernel
        torch._foreach_copy_(cache.ssm_states, graph.cache.ssm_states)
        cache.seqlen_offset += input_ids.shape[1]
        return graph.logits.clone()

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self._pool = None
        self._weights = None

    def _drop_if_weights_changed(self, model: nn.Module) -> None:
        """Drop every graph if a module or parameter was assigned, or a weight's storage, dtype or shape changed,
        since the recordings (module docstring)."""
        if self._registrations is not registrations.current():
            self._registrations = registrations.current()
            self._tensors = [*model.parameters(), *model.buffers()]
            self._plain = is_plain(model)
            self.clear()
        weights = storage_places(self._tensors)
        if weights != self._weights:
            self.clear()
            self._weights = weights

    def _record(self, config, prefill: PrefillFn, input_ids: torch.Tensor) -> PrefillGraph | None:
        """Record this shape's prefill (an eager run first: the logits' shape, the cache's states allocated outside
        the graph's pool), or None where it cannot be recorded (it reads the device on the host)."""
        with torch.inference_mode(False), torch.no_grad(), self.rehearse():  # buffers that later no-grad calls write
            static_ids = input_ids.clone()
            static_cache = MoMCache(config)
            static_logits = torch.empty_like(prefill(static_ids, static_cache))  # (b, k, V)

        def run() -> None:
            static_cache.seqlen_offset = 0  # each run is a prefill of the fresh cache (the forward counts the tokens)
            static_logits.copy_(prefill(static_ids, static_cache))

        if self._pool is None and self.device_type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        try:
            replay = self.capture(run, self._pool)
        except RuntimeError as e:
            logger.warning("mom: the prefill of shape %s could not be recorded into a CUDA graph and runs eagerly: %s",
                           tuple(input_ids.shape), str(e).splitlines()[0] if str(e) else type(e).__name__)
            return None
        self.captures += 1
        return PrefillGraph(static_ids, static_cache, static_logits, replay)
