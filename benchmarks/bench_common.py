"""Shared helpers for the GPU benchmarks: interleaved modality layouts, timing and memory measurement."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

import mom
from mom.ops.triton.rebind import DIRECT_LAUNCH_ENV

DEFAULT_RUNS = (64, 256, 128)  # text / image / speech run lengths, repeated along the sequence


def interleaved_modalities(batch: int, length: int, runs=DEFAULT_RUNS, device="cuda") -> torch.Tensor:
    """(batch, length) modality ids cycling through runs of the given lengths (0, 1, 2, 0, ...)."""
    row, m = [], 0
    while len(row) < length:
        row += [m] * runs[m]
        m = (m + 1) % len(runs)
    return torch.tensor(row[:length], device=device).expand(batch, -1).contiguous()


LAYOUTS = ("balanced", "skewed", "single")


def layout_modalities(layout: str, batch: int, length: int, runs=DEFAULT_RUNS, device="cuda") -> torch.Tensor:
    """(batch, length) modality ids of a named batch layout (issue 22's three):

    - ``balanced``: every row cycles through runs of the given lengths (`interleaved_modalities`);
    - ``skewed``: about 90% text, 10% image and no speech in even rows; odd rows 85% text, 10% image, 5% speech (a
      modality absent from some rows), in runs of 256 positions;
    - ``single``: every token text.
    """
    if layout == "balanced":
        return interleaved_modalities(batch, length, runs, device)
    if layout == "single":
        return torch.zeros(batch, length, dtype=torch.long, device=device)
    if layout != "skewed":
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    rows = []
    for b in range(batch):
        block = [0] * 230 + [1] * 26 if b % 2 == 0 else [0] * 218 + [1] * 26 + [2] * 12  # 256 positions
        rows.append((block * (length // 256 + 1))[:length])
    return torch.tensor(rows, device=device)


def shares(modality_ids: torch.Tensor, num_modalities: int) -> str:
    """``text 90.0% image 10.0% speech 0.0%``-style summary of a layout."""
    counts = torch.bincount(modality_ids.reshape(-1), minlength=num_modalities).tolist()
    names = ("text", "image", "speech")[:num_modalities]
    return " ".join(f"{n} {c / modality_ids.numel():.1%}" for n, c in zip(names, counts))


def mom_mixer(num_modalities: int, d_model: int, decouple, fast: bool = True, device: str = "cuda"):
    """One MoM mixer layer with Mamba's initialisation (built through the LM, which initialises it)."""
    config = mom.MoMConfig(modalities=("text", "image", "speech")[:num_modalities], vocab_sizes=(16,) * num_modalities,
                           d_model=d_model, n_layer=1, decouple=decouple, use_fast_path=fast)
    return mom.MoMForCausalLM(config).backbone.layers[0].mixer.to(device)


def layer_inputs(batch: int, length: int, d_model: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """A layer benchmark's fwd+bwd operands: the input x (b, l, d) fp32, requiring grad (autocast casts it, as an
    LM's fp32 residual stream), and the output's gradient (b, l, d) bf16."""
    x = torch.randn(batch, length, d_model, device=device, requires_grad=True)
    return x, torch.randn(batch, length, d_model, device=device, dtype=torch.bfloat16)


def measure(fn: Callable[[], None], warmup: int = 5, iters: int = 20) -> tuple[float, float, float]:
    """(mean milliseconds per call, peak GiB allocated during the calls, GiB resident before them).

    Resident: what stays allocated between calls (parameters, their gradients, optimizer states, inputs); peak minus
    resident is what a call adds (activations and temporaries)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, torch.cuda.max_memory_allocated() / 2**30, resident


def fastest(sides: dict[str, Callable[[], None]], rounds: int = 3, iters: int = 20) -> dict[str, float]:
    """{name: the fastest mean ms per call} over ``rounds`` alternating rounds of `measure` (one per side a round),
    so that a slow spell of the machine falls on every side alike."""
    times: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name] = min(times.get(name, float("inf")), measure(fn, iters=iters)[0])
    return times


def print_fastest(times: dict[str, float], new: str, old: str, note: str = "") -> None:
    """`fastest`'s times, one line per side (``note`` after each), then the ratio ``new`` / ``old``."""
    width = max(len(name) for name in times)
    for name, ms in times.items():
        print(f"  {name:<{width}} {ms * 1e3:8.1f} us{note}")
    print(f"  ratio {new} / {old}: {times[new] / times[old]:.3f}x time")


def profiled(step: Callable[[], None], steps: int, warmup: int = 3):
    """A ``torch.profiler.profile`` (CUDA activity only) of ``steps`` calls of ``step``, after ``warmup`` calls
    (autotuning, allocator) and a synchronize; the profiled calls end with one too."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof


def row(name: str, mom_value: float, dense_value: float, unit: str) -> str:
    ratio = mom_value / dense_value if dense_value else float("nan")
    return f"{name:<28} MoM {mom_value:10.3f} {unit:<6} dense {dense_value:10.3f} {unit:<6} ratio {ratio:6.3f}"


@contextlib.contextmanager
def launches(direct: bool) -> Iterator[None]:
    """Within: mom calls mamba-ssm's Triton-launching functions as rebound copies that launch directly once tuned
    (``direct``), or as mamba-ssm ships them (`mom.ops.triton.rebind`, ``MOM_DIRECT_LAUNCH``); restored after."""
    previous = os.environ.get(DIRECT_LAUNCH_ENV)
    os.environ[DIRECT_LAUNCH_ENV] = "1" if direct else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DIRECT_LAUNCH_ENV)
        else:
            os.environ[DIRECT_LAUNCH_ENV] = previous
