"""A forward's inputs, checked and routed: shapes from host metadata (`check_shapes`), ids and modality ids read
from the device in one host sync together with the per-modality counts (`validate_and_route`, deferred until the
forward's work is enqueued; not read in a forward recorded into a CUDA graph, whose caller checks each batch with
`check_inputs` instead), each id's modality on the device (`modality_of_ids`), the padding mask
(`padding_mask`) and transformers' ``logits_to_keep`` (`kept_positions`). The model (`mom.model.modeling`) and the
Transfusion model (`mom.model.transfusion`) call them first in their forwards."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from mom.model.config import MoMConfig
from mom.model.routing import Routing

IGNORE_INDEX = -100  # label value excluded from the loss (Hugging Face convention)


def check_shapes(
    config: MoMConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None = None,
    **same_shape: torch.Tensor | None,
) -> tuple[int, int]:
    """Check what host metadata tells (no device read): exactly one of ``input_ids`` (b, l) integer ids and
    ``inputs_embeds`` (b, l, d_model) floats, at least one token, and every tensor of ``same_shape`` (modality ids,
    labels...) integer of shape (b, l). -> (b, l)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids (int64 or int32), got dtype {input_ids.dtype}")
        shape, what = tuple(input_ids.shape), "input_ids"
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.d_model:
            raise ValueError(f"inputs_embeds must have shape (batch, length, d_model={config.d_model}), got "
                             f"{tuple(inputs_embeds.shape)}")
        if not inputs_embeds.is_floating_point():
            raise ValueError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}")
        if same_shape.get("modality_ids") is None:
            raise ValueError("inputs_embeds needs modality_ids (batch, length): a MoM routes every position to the "
                             "experts of its modality, which token ids would otherwise tell")
        shape, what = tuple(inputs_embeds.shape[:2]), "inputs_embeds"
    if 0 in shape:
        raise ValueError(f"{what} is empty (batch, length) = {shape}: every row needs at least one token (to "
                         f"generate() from nothing, start the prompt with the BOS id)")
    for name, t in same_shape.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {what} has (batch, length) = {shape}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return shape


def validate_and_route(
    config: MoMConfig,
    input_ids: torch.Tensor | None,
    modality_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    modality_counts: Sequence[int] | torch.Tensor | None = None,
    defer: bool = True,
    shift_labels: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> tuple[Routing, Callable[[], object]]:
    """Check shapes (`check_shapes`) and values, and build the batch's `Routing` (modality ids derived from the token
    ids if not given; given ones must agree with them). -> (routing, finish): call ``finish()`` once the forward's
    work is enqueued.

    The value checks (ids in range, modality ids that agree with the ids' vocabulary ranges) are read from the
    device together with the per-modality token counts, in ONE host sync; reading anything from the device waits for
    all the work queued before it: at the start of a training forward, the previous step's backward. So:

    - ``defer``: no sync now. ``finish`` reads the checks and the device's counts after the forward is enqueued, so
      the GPU never waits for the host, and raises if either is wrong. Until then nothing may index with an unchecked
      id: the forward clamps token ids for the embedding, and the loss comes after. With ``modality_counts`` (tokens
      per modality, counted by the caller on the host, e.g. from the CPU batch as `mom.train` does) the routing
      has its counts at once; without, it has none until that read (the fused GPU path needs none: it groups tokens
      by offsets on the device), and a path that needs them earlier (the module path) makes it then, ONE sync still
      (``finish`` then reads nothing more). Either way the counts are known before any backward.
    - not ``defer`` (a forward that writes a cache): the one sync now, the given counts checked with the rest.
    """
    check_shapes(config, input_ids, inputs_embeds, modality_ids=modality_ids, labels=labels, shift_labels=shift_labels)
    V, M = config.vocab_size, config.num_modalities
    # name -> (values on the device, each (1,), whether the values read say it failed, the message then); a range check
    # reads its tensor's min and max (one launch), the others whether any position is bad: few launches, as a
    # prefill's GPU idles until the host has run everything before its first layer (docs/performance.md)
    checks: dict[str, tuple[tuple[torch.Tensor, ...], Callable[[list[int]], bool], Callable[[], str]]] = {}

    def first(t: torch.Tensor, bad: torch.Tensor) -> int:
        return int(t[bad][0])

    def in_range(name: str, t: torch.Tensor, n: int, valid: str) -> None:
        lo, hi = t.aminmax()
        checks[name] = ((lo.view(1), hi.view(1)), lambda v: v[0] < 0 or v[1] >= n,
                        lambda: f"{name} {first(t, (t < 0) | (t >= n))} is out of range; valid: [0, {n}){valid}")

    derived = None
    if input_ids is not None:
        in_range("token id", input_ids, V, "")
        derived = modality_of_ids(config, input_ids)  # (b, l)
    if modality_ids is not None:
        in_range("modality id", modality_ids, M, f" {config.modalities}")
        if derived is not None:
            contradict = modality_ids != derived

            def routing_message() -> str:
                token, given = first(input_ids, contradict), first(modality_ids, contradict)
                return (f"modality_ids contradict the token ids: token id {token} belongs to "
                        f"{config.modalities[first(derived, contradict)]!r} but its modality id is {given} "
                        f"({config.modalities[given]!r}); modality ids must follow the vocabulary ranges (first ids "
                        f"{config.vocab_offsets} of {config.modalities})")

            checks["routing"] = ((contradict.any().view(1),), lambda v: bool(v[0]), routing_message)
    for name, t in (("label", labels), ("shift label", shift_labels)):
        if t is not None:
            bad = ((t < 0) & (t != IGNORE_INDEX)) | (t >= V)
            checks[name] = ((bad.any().view(1),), lambda v: bool(v[0]), lambda t=t, name=name, bad=bad: (
                f"{name} {first(t, bad)} is out of range; valid: [0, {V}) or {IGNORE_INDEX}"))
    routing = Routing((derived if modality_ids is None else modality_ids).long(), M)
    # one tensor (one cat, whose dtypes it promotes to a common one) and one read for every check and the counts
    values = torch.cat([*(t for v, _, _ in checks.values() for t in v), routing.device_counts])

    def read() -> tuple[int, ...]:
        """The one host sync: raise for the first failed check, else return the device's counts."""
        got, at = values.tolist(), 0
        for v, failed, message in checks.values():
            if failed(got[at : at + len(v)]):
                raise ValueError(message())
            at += len(v)
        return tuple(got[at:])

    if defer and capturing(routing.modality_ids):
        # recorded into a CUDA graph (`mom.train.captured_step`): nothing can be read now, and counts given for this
        # batch would be baked into the graph for every batch replayed after it; the step checks each batch before
        # it goes in (`check_inputs`), and the routed GEMMs group the tokens on the device
        return routing, lambda: None
    given = None if modality_counts is None else tuple(int(c) for c in modality_counts)

    def check() -> tuple[int, ...]:
        actual = read()
        if given is not None and actual != given:
            raise ValueError(f"modality_counts {given} do not match the batch's tokens per modality {actual} "
                             f"{config.modalities}")
        return actual

    if not defer:
        routing.set_counts(check())
        return routing, lambda: None
    if given is not None:
        routing.set_counts(given)
        return routing, check
    routing.host_counts.reader = check  # the one read: where a path first needs the counts, else at finish
    return routing, routing.host_counts.read


def check_inputs(
    config: MoMConfig,
    input_ids: torch.Tensor | None,
    modality_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> None:
    """Raise ValueError for inputs a forward would reject (`validate_and_route`'s checks, made now: one read of the
    inputs' device, none for CPU tensors)."""
    validate_and_route(config, input_ids, modality_ids, labels, defer=False, shift_labels=shift_labels,
                       inputs_embeds=inputs_embeds)


_rehearsing = threading.local()  # .depth: `rehearsal` blocks entered on this thread


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s device is recording a CUDA graph on the current stream (nothing may be read from it now), or
    warming a recording up (`rehearsal`)."""
    return t.is_cuda and (getattr(_rehearsing, "depth", 0) > 0 or torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def rehearsal() -> Iterator[None]:
    """Forwards run in this block take a recorded forward's path (`capturing`: the checks left to the caller, the
    routed GEMMs grouping the tokens on the device), so that what that path builds lazily (the weight cast's address
    tables, Triton's compiles and tunings) is built by the warm-up runs before a recording, where copying from host
    memory fails. The caller checks the inputs, as for a recording."""
    _rehearsing.depth = getattr(_rehearsing, "depth", 0) + 1
    try:
        yield
    finally:
        _rehearsing.depth -= 1


@functools.cache
def _vocab_bounds(offsets: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The first id of every modality but the first, on the device: copied there once, not at every forward (a copy
    from host memory waits for the device)."""
    return torch.tensor(offsets, device=device, dtype=dtype)


def modality_of_ids(config: MoMConfig, ids: torch.Tensor) -> torch.Tensor:
    """The modality of each unified id (same shape), on the device, unchecked and without a host sync (ids out of
    range land in the first or last modality; `MoMConfig.modality_of` is the checked host-side twin)."""
    bounds = _vocab_bounds(tuple(config.vocab_offsets[1:]), ids.device, ids.dtype)
    return torch.bucketize(ids.contiguous(), bounds, right=True)


def padding_mask(attention_mask: torch.Tensor | None, b: int, l: int, past: int,
                 unread: bool = False) -> torch.Tensor | None:
    """The (b, l) bool mask of the forward's real tokens (nonzero in ``attention_mask``), or None: none given, or
    read to hold no padding. ``past``: tokens already in the cache; the mask may then also cover them (b, past + l), as
    transformers passes it, and goes unused: tokens after a cached prefix are never padding.

    Whether every position is a real token is read on the host (a sync: at the start of a training step it waits for
    the previous step's backward) unless ``unread``: the mask is then passed on as it is, all ones or not, for mixers
    that apply it on the device at no more cost (`mom.model.mixer.masks_on_device`)."""
    if attention_mask is None:
        return None
    allowed = [(b, l)] + ([(b, past + l)] if past else [])
    if tuple(attention_mask.shape) not in allowed:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {(b, l)}"
                         + (f" (or {(b, past + l)} with the {past} cached tokens)" if past else ""))
    if past or (not unread and bool(attention_mask.all())):
        return None
    return attention_mask.bool()


def kept_positions(logits_to_keep: int | torch.Tensor) -> slice | torch.Tensor:
    """transformers' ``logits_to_keep``: an int k keeps the last k positions (0 keeps all), a 1-D tensor the positions
    it indexes."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1 or logits_to_keep.is_floating_point():
            raise ValueError(f"logits_to_keep as a tensor must be 1-D integer positions, got shape "
                             f"{tuple(logits_to_keep.shape)} dtype {logits_to_keep.dtype}")
        return logits_to_keep
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be a non-negative int or an index tensor, got {logits_to_keep!r}")
    return slice(-logits_to_keep, None) if logits_to_keep else slice(0, None)
