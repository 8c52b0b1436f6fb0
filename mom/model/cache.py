"""`MoMCache`: the recurrent state of every layer, for O(1)-memory-per-token generation.

A ``transformers`` `Cache`, so that ``generate()`` can start from it, reorder it for beam search and roll it back
for assisted decoding, as it does with the cache of its own Mamba.

A hybrid model's attention layers (``config.attention_layers``, `mom.model.attention`) keep every past key and value
instead, grown by concatenation: the cache knows no maximum length (``generate()`` does not tell it), beam search's
reorder and assisted decoding's rollback are then a row selection and a cut, and these models decode eagerly
(`fixed_size`) rather than through CUDA graphs, which would need the buffers preallocated. Each step copies the layer's
keys and values once (as transformers' ``DynamicCache`` does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Cache

from mom.model.config import MoMConfig


def state_shapes(config: MoMConfig, layer_idx: int, batch_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(conv state, SSM state) shapes of layer ``layer_idx``, by its mixer kind: Mamba-1 (b, d_inner, d_conv) and
    (b, d_inner, d_state); Mamba-2 (b, d_inner + 2 ngroups d_state, d_conv) (x, B and C go through its conv) and
    (b, nheads, headdim, d_state); an attention layer (``config.attention_layers``) keeps keys and values instead:
    states of no channels (b, 0, d_conv) and (b, 0, d_state)."""
    if layer_idx in config.attention_layers:
        return (batch_size, 0, config.d_conv), (batch_size, 0, config.d_state)
    if config.mixer == "mamba2":
        conv_dim = config.d_inner + 2 * config.ngroups * config.d_state
        return (batch_size, conv_dim, config.d_conv), (batch_size, config.nheads, config.headdim, config.d_state)
    return (batch_size, config.d_inner, config.d_conv), (batch_size, config.d_inner, config.d_state)


class MoMCache(Cache):
    """Per Mamba layer: the last ``d_conv`` conv inputs and the SSM state (`state_shapes`: Mamba-1 (b, d_inner,
    d_conv) and (b, d_inner, d_state)). Per attention layer (``config.attention_layers``): its keys and values (b,
    heads, t, d_head) after the rotary embedding, and which of them later tokens may see (b, t) (not padding, not an
    earlier packed document); its conv and SSM states have no channels (b, 0, ...), so that every layer has one.

    ``seqlen_offset`` counts the tokens already consumed; 0 means the next forward is a prefill. Built with a
    ``batch_size`` the states are allocated at once; without one, by the model's first forward (as ``generate()``
    builds it, before beam search sets the batch).

    After `activate_past_recording` the model saves the states before each of the last ``recurrent_states_to_keep``
    tokens of a forward (every token if ``None``), and `crop` rolls the cache back to one of them.
    """

    def __init__(
        self,
        config: MoMConfig,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(layers=[])  # states are held here, not in transformers' per-layer objects
        self.config = config
        self.n_layer, self.d_inner = config.n_layer, config.d_inner
        self.d_conv, self.d_state = config.d_conv, config.d_state
        self.attention_layers, self.attention_heads = config.attention_layers, config.attention_heads
        self.attention_keys: dict[int, torch.Tensor] = {}  # layer -> (b, heads, t, d_head)
        self.attention_values: dict[int, torch.Tensor] = {}  # layer -> (b, heads, t, d_head)
        self.attention_valid: dict[int, torch.Tensor] = {}  # layer -> (b, t) bool: keys a later token sees
        self.conv_states: list[torch.Tensor] = []
        self.ssm_states: list[torch.Tensor] = []
        self.seqlen_offset = 0
        self.recording = False
        self.states_to_keep: int | None = None
        self.history: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # states before each recorded token
        if batch_size is not None:
            self.allocate(batch_size, device, dtype)

    def allocate(self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype,
                 zero: bool = True) -> None:
        """Zero states for ``batch_size`` rows; the conv window in ``dtype``, the SSM state in fp32 (every backend
        accumulates it in fp32); attention layers: no key yet, keys and values in ``dtype``. ``zero=False`` leaves
        the states unset, for a forward that writes every layer's states whole before reading any (a prefill: each
        mixer writes its conv window, left-padded with zeros, and its SSM state), sparing the zeroing's launches."""
        attention = set(self.attention_layers)
        kinds = {i in attention: i for i in range(self.n_layer)}  # one layer of each kind: the config is read once each
        by_kind = {kind: state_shapes(self.config, i, batch_size) for kind, i in kinds.items()}
        shapes = [by_kind[i in attention] for i in range(self.n_layer)]
        self.conv_states = _states([conv for conv, _ in shapes], device, dtype, zero)
        self.ssm_states = _states([ssm for _, ssm in shapes], device, torch.float32, zero)
        d_head = self.config.d_model // self.attention_heads
        empty = (batch_size, self.attention_heads, 0, d_head)
        self.attention_keys = {i: torch.zeros(empty, device=device, dtype=dtype) for i in self.attention_layers}
        self.attention_values = {i: torch.zeros(empty, device=device, dtype=dtype) for i in self.attention_layers}
        self.attention_valid = {i: torch.zeros((batch_size, 0), device=device, dtype=torch.bool)
                                for i in self.attention_layers}

    def zeros_like(self) -> MoMCache:
        """A new cache of the same batch, dtype and device, its states zero."""
        state = self.conv_states[0]
        return MoMCache(self.config, self.batch_size, state.device, state.dtype)

    def __len__(self) -> int:
        return self.n_layer

    def __repr__(self) -> str:
        return f"MoMCache(n_layer={self.n_layer}, batch_size={self.batch_size}, seqlen_offset={self.seqlen_offset})"

    @property
    def is_initialized(self) -> bool:
        return bool(self.conv_states)

    @property
    def batch_size(self) -> int:
        """Rows of the states; -1 before they are allocated (as transformers' caches)."""
        return self.conv_states[0].shape[0] if self.conv_states else -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def fixed_size(self) -> bool:
        """Whether every state keeps its size as tokens come (no attention layer's key/value cache grows): what a
        CUDA graph can capture (`mom.model.graph`)."""
        return not self.attention_layers

    @property
    def is_linear(self) -> list[bool]:
        return [i not in self.attention_layers for i in range(self.n_layer)]

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.n_layer

    @property
    def is_croppable(self) -> bool:
        return self.recording

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen_offset

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # a recurrent state has no length limit

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seqlen_offset > 0

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every state tensor (and every recorded one) by ``fn(state)``."""
        self.conv_states = [fn(s) for s in self.conv_states]
        self.ssm_states = [fn(s) for s in self.ssm_states]
        self.history = [([fn(s) for s in conv], [fn(s) for s in ssm]) for conv, ssm in self.history]
        for states in (self.attention_keys, self.attention_values, self.attention_valid):
            states.update({i: fn(s) for i, s in states.items()})

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        self._map(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda s: s.repeat_interleave(repeats, dim=0))

    def holds_states(self, conv_states: list[torch.Tensor], ssm_states: list[torch.Tensor]) -> bool:
        """Whether this cache's states are exactly these tensors (the same objects, e.g. a CUDA graph's buffers)."""
        return (len(conv_states) == len(self.conv_states) and len(ssm_states) == len(self.ssm_states)
                and all(a is b for a, b in zip(self.conv_states + self.ssm_states, conv_states + ssm_states)))

    def adopt_states(self, conv_states: list[torch.Tensor], ssm_states: list[torch.Tensor]) -> None:
        """Copy the states into these tensors (same shapes) and hold them from now on: whoever writes them in place
        (a CUDA graph's replay, `mom.model.graph`) advances this cache."""
        for dst, src in zip(conv_states + ssm_states, self.conv_states + self.ssm_states, strict=True):
            dst.copy_(src)
        self.conv_states, self.ssm_states = list(conv_states), list(ssm_states)

    def release_states(self) -> None:
        """Hold private copies of the states again (after `adopt_states`, before the tensors are given to another)."""
        self.conv_states = [s.clone() for s in self.conv_states]
        self.ssm_states = [s.clone() for s in self.ssm_states]

    def reset(self) -> None:
        for s in self.conv_states + self.ssm_states:
            s.zero_()
        self._cut_attention(0)
        self.seqlen_offset = 0
        self.history = []

    # ---- attention layers' keys and values ------------------------------------------------------------------------
    def store_attention(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """A prefill's keys and values (b, heads, l, d_head) and which of them later tokens see (b, l)."""
        dtype = self.attention_keys[layer_idx].dtype
        self.attention_keys[layer_idx] = keys.to(dtype)
        self.attention_values[layer_idx] = values.to(dtype)
        self.attention_valid[layer_idx] = valid.bool()

    def append_attention(self, layer_idx: int, keys: torch.Tensor,
                         values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append new tokens' keys and values (b, heads, l, d_head) (real tokens, seen by later ones) -> every key and
        value (b, heads, t + l, d_head) and which of them the new tokens may see (b, t + l)."""
        k, v = self.attention_keys[layer_idx], self.attention_values[layer_idx]
        seen = self.attention_valid[layer_idx]
        new = torch.ones(seen.shape[0], keys.shape[2], dtype=torch.bool, device=seen.device)
        self.attention_keys[layer_idx] = k = torch.cat([k, keys.to(k.dtype)], dim=2)
        self.attention_values[layer_idx] = v = torch.cat([v, values.to(v.dtype)], dim=2)
        self.attention_valid[layer_idx] = seen = torch.cat([seen, new], dim=1)
        return k, v, seen

    def _cut_attention(self, length: int) -> None:
        """Keep the first ``length`` tokens of every attention layer's keys and values."""
        for states in (self.attention_keys, self.attention_values):
            states.update({i: s[:, :, :length] for i, s in states.items()})
        self.attention_valid.update({i: s[:, :length] for i, s in self.attention_valid.items()})

    # ---- rolling back (assisted decoding) ---------------------------------------------------------------------
    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        self.recording = True
        self.states_to_keep = recurrent_states_to_keep
        self.history = []

    def is_recording_past(self, layer_idx: int = 0) -> bool:
        return self.recording

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return (self.states_to_keep or 0) if self.recording else 0

    def tokens_to_record(self, length: int) -> int:
        """How many of a forward's last ``length`` tokens the model runs one by one to record the states before them."""
        if not self.recording:
            return 0
        return length if self.states_to_keep is None else min(self.states_to_keep, length)

    def record(self) -> None:
        """Save a copy of the current states (called by the model before a recorded token)."""
        self.history.append(([s.clone() for s in self.conv_states], [s.clone() for s in self.ssm_states]))
        if self.states_to_keep is not None:
            del self.history[: -max(self.states_to_keep, 1)]

    def crop(self, tokens_to_remove: int) -> None:
        """``crop(-n)``: forget the last ``n`` tokens, restoring the states recorded before them; ``crop(0)`` only
        drops the record. Needs `activate_past_recording` first, and ``n`` at most the tokens recorded since the
        last crop."""
        if tokens_to_remove > 0:
            raise ValueError(f"MoMCache.crop takes minus the number of tokens to remove, got {tokens_to_remove}")
        n = -tokens_to_remove
        if n and not self.recording:
            raise RuntimeError("MoMCache.crop: call activate_past_recording() before the forwards to roll back")
        if n > len(self.history):
            raise ValueError(f"MoMCache.crop: cannot remove {n} tokens, only {len(self.history)} were recorded")
        if n:
            conv, ssm = self.history[-n]
            self.conv_states, self.ssm_states = conv, ssm
            self.seqlen_offset -= n
            self._cut_attention(self.seqlen_offset)  # keys and values are not recorded: they are cut
        self.history = []


def _states(shapes: list[tuple[int, ...]], device: torch.device | str | None, dtype: torch.dtype,
            zero: bool) -> list[torch.Tensor]:
    """Tensors of these shapes, zeroed (``zero``): the layers of each shape share one allocation, a prefill at batch
    1 being bound by its host time, of which one allocation per layer and kind was a part (docs/performance.md).
    Each layer's part is taken with ``.data``, so that autograd sees separate tensors, each with its own version
    counter, as separate allocations would be (views of one buffer share theirs: a write into one layer's state would
    then invalidate another's that a backward saved)."""
    new = torch.zeros if zero else torch.empty
    parts = {shape: iter(new((shapes.count(shape), *shape), device=device, dtype=dtype).unbind(0))
             for shape in dict.fromkeys(shapes)}  # per distinct shape, in layer order
    return [next(parts[shape]).data for shape in shapes]
