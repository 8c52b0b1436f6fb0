"""Where a decode step's GPU time goes, kernel by kernel: MoM's step next to mamba-ssm's, both eager.

    python benchmarks/profile_decode.py                         # 768 x 24, batch 1, rows of text
    python benchmarks/profile_decode.py --batch 64 --rows mixed # rows cycling through the modalities
    python benchmarks/profile_decode.py --prefill 2048          # the prompt's forward instead (fresh cache each call)
    python benchmarks/profile_decode.py --prefill 2048 --batch 16 --timeline   # + each side's GPU timeline
    python benchmarks/profile_decode.py --prefill 2048 --prelude # + where the host's time goes: before the first layer,
                                                                 #   and within one layer
    python benchmarks/profile_decode.py --prefill 2048 --batch 16 --graph-path   # MoM's prefill as a prefill graph
                                                                 #   records it (the kernels its replays run)

`bench_generate.py` times the captured step whole ("mom decode step alone"); this attributes a step to its kernels
(the routed projections, the conv and state updates, the norms, the LM head, small elementwise ops) on each side, so
that the gap between the two shows by kernel. Both run eagerly (the kernels a CUDA graph replays, without the graph):
MoM as ``model(ids, cache=..., use_cache=True)`` one token per row after a prompt (the forward's input checks
included), mamba-ssm as ``MambaLMHeadModel(ids, inference_params=...)`` after the same prompt length. Per side: a
table of kernels (calls and device time per step, largest first), then the kernels and device microseconds per step.
With ``--prefill N`` the profiled call is an N-token prompt's forward into a fresh cache (logits of the last position
only, as ``generate()`` asks), and each side also prints its wall time per call (synchronised): wall time well above
the kernels' device time means the call waits on the host (launches and Python), not on the GPU, and its host time
from the call's start to its first layer (the prelude: input checks, cache, routing, embedding; the GPU has nothing
queued until then, so every microsecond of it is idle device time) and within one layer; ``--prelude`` splits
that time into PyTorch's top-level ops (by name, with their calls and time) and the Python between them (the longest
stretches, with the ops on either side), and does the same for one layer (the second: from its forward to the
third's), whose host time a one-row prefill waits on 24 times. ``--timeline`` adds each side's GPU timeline over a
few calls (`profile_lm.timeline`: the time kernels ran, the idle stretches longer than 30 us with the kernels on
either side, launches by kind), which shows where such a wait falls. ``--graph-path`` runs MoM's prefill on the path
that a prefill graph records (`mom.model.inputs.rehearsal`: the tokens per modality not read, the routed GEMMs grouped
on the device, every expert weight cast), eagerly, so that its table lists the kernels a replayed prefill runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import profiled  # noqa: E402
from bench_generate import mamba_ssm_side, mom_side, prompt_ids, step_ids  # noqa: E402
from profile_lm import timeline  # noqa: E402

import mom  # noqa: E402
from mom.model import inputs  # noqa: E402

PROMPT = 64  # prompt tokens before the profiled steps (a step's cost does not depend on the prompt's length)


def kernel_table(step, steps: int) -> dict[str, tuple[int, float]]:
    """{kernel name: (calls per step, device us per step)} over ``steps`` calls of ``step`` after a warm-up."""
    prof = profiled(step, steps)
    table: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            table[event.name][0] += 1
            table[event.name][1] += event.device_time
    return {name: (calls // steps, us / steps) for name, (calls, us) in table.items()}


def wall_ms(step, calls: int = 5) -> float:
    """The fastest of ``calls`` synchronised calls of ``step``, in ms (after two warm-up calls)."""
    best = float("inf")
    for i in range(calls + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= 2:
            best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def host_us(call, end: torch.nn.Module, start: torch.nn.Module | None = None, calls: int = 9) -> float:
    """The median host time (us) from the start of a synchronised ``call`` (or from ``start``'s forward) to ``end``'s
    forward (after two warm-up calls), unprofiled. From the call's start to its first layer, the prelude: the host's
    work before the first layer's kernels, while the GPU idles; between two layers, one layer's host time, which a
    prefill that waits on the host pays once per layer."""
    marks: dict[str, float] = {}  # the first time each hook fired in this call

    def mark(key: str) -> None:  # a pre-hook that returns None, so the module's arguments pass unchanged
        marks.setdefault(key, time.perf_counter())

    hooks = [module.register_forward_pre_hook(lambda *_, key=key: mark(key))
             for key, module in (("start", start), ("end", end)) if module is not None]
    times = []
    try:
        for i in range(calls + 2):
            torch.cuda.synchronize()
            marks.clear()
            if start is None:  # from the call's start
                marks["start"] = time.perf_counter()
            call()
            torch.cuda.synchronize()
            if i >= 2:
                times.append((marks["end"] - marks["start"]) * 1e6)
    finally:
        for hook in hooks:
            hook.remove()
    return statistics.median(times)


def one_layer(layers: torch.nn.ModuleList) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The stretch that stands for one layer's host time: from the second layer's forward to the third's (the first
    layer's own start follows the prelude); None for a model of fewer than three layers."""
    return (layers[1], layers[2]) if len(layers) > 2 else None


def host_line(call, layers: torch.nn.ModuleList) -> str:
    """`host_us` to the first layer, and within one layer (`one_layer`) where there is one to time."""
    line = f"host time to the first layer {host_us(call, layers[0]):.0f} us"
    layer = one_layer(layers)
    if layer is not None:
        line += f", in one layer (the second) {host_us(call, layer[1], layer[0]):.0f} us"
    return line


def host_ops(call, end: torch.nn.Module, start: torch.nn.Module | None = None
             ) -> tuple[float, list[tuple[float, float, str]]]:
    """Where the host's time goes from ``start``'s forward (the call's start if None) to ``end``'s, in one
    synchronised ``call`` (after two warm-up calls): -> (that time in us; PyTorch's top-level CPU ops in that stretch
    as (start us, duration us, name), in order). What lies between the ops is Python: the model's own and its
    wrappers', and the profiler's own bookkeeping, which makes the call slower than `host_us` measures it: compare
    the parts, not the total."""
    def marker(name: str) -> None:
        with torch.profiler.record_function(name):
            pass

    hooks = [end.register_forward_pre_hook(lambda *_: marker("profile_decode.end"))]
    if start is not None:
        hooks.append(start.register_forward_pre_hook(lambda *_: marker("profile_decode.start")))
    try:
        for _ in range(2):
            call()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()  # the profiler's own first-event costs fall here, not in the call measured
            torch.cuda.synchronize()
            marker("profile_decode.call")
            call()
            torch.cuda.synchronize()
    finally:
        for hook in hooks:
            hook.remove()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.time_range.start)
    called = next(e.time_range.start for e in events if e.name == "profile_decode.call")
    begin = called if start is None else next(e.time_range.start for e in events
                                              if e.name == "profile_decode.start" and e.time_range.start > called)
    finish = next(e.time_range.start for e in events
                  if e.name == "profile_decode.end" and e.time_range.start > begin)
    ops, last_end = [], begin
    for e in events:
        if e.name.startswith("profile_decode.") or not begin <= e.time_range.start < finish:
            continue
        if e.time_range.start >= last_end:  # top level: not inside the previous op
            ops.append((e.time_range.start - begin, e.time_range.end - e.time_range.start, e.name))
            last_end = e.time_range.end
    return finish - begin, ops


def report_host(name: str, total: float, ops: list[tuple[float, float, str]], top: int,
                end: str = "the first layer") -> None:
    """`host_ops`' figures: time in ops and between them, the ops by total time, the longest stretches between."""
    in_ops = sum(d for _, d, _ in ops)
    print(f"\n=== {name}: host time {total:.0f} us: {len(ops)} top-level ops taking "
          f"{in_ops:.0f} us, {total - in_ops:.0f} us between them (Python) ===")
    by_op: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for _, d, op in ops:
        by_op[op][0] += 1
        by_op[op][1] += d
    for op, (calls, us) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{us:9.1f} us  {calls:4d} calls  {op}")
    ends = [(0.0, "(start)")] + [(s + d, op) for s, d, op in ops]  # where each op ends
    starts = [(s, op) for s, _, op in ops] + [(total, f"({end})")]  # where the next begins
    gaps = [(start - end_, before, after) for (end_, before), (start, after) in zip(ends, starts)]
    print("longest stretches between ops:")
    for gap, before, after in sorted(gaps, reverse=True)[:5]:
        print(f"{gap:9.1f} us  after {before}, before {after}")


def report_prelude_and_layer(name: str, call, layers: torch.nn.ModuleList, top: int) -> None:
    """`--prelude`: the host's time before the first layer, then within one layer (`one_layer`, where there is one),
    each split by `host_ops`."""
    report_host(f"{name} prelude (to the first layer)", *host_ops(call, layers[0]), top)
    layer = one_layer(layers)
    if layer is not None:
        report_host(f"{name} one layer (the second)", *host_ops(call, layer[1], start=layer[0]), top,
                    end="the third layer")


def report(name: str, table: dict[str, tuple[int, float]], top: int) -> None:
    rows = sorted(table.items(), key=lambda kv: -kv[1][1])
    print(f"\n=== {name}: per step ===")
    for kernel, (calls, us) in rows[:top]:
        print(f"{us:9.1f} us  {calls:4d} calls  {kernel[:110]}")
    if len(rows) > top:
        rest = rows[top:]
        print(f"{sum(us for _, (_, us) in rest):9.1f} us  {sum(c for _, (c, _) in rest):4d} calls  ({len(rest)} more)")
    print(f"total: {sum(c for c, _ in table.values())} kernels, {sum(us for _, us in table.values()):.1f} us device "
          "time per step")


@torch.inference_mode()
def mom_table(args: argparse.Namespace) -> dict[str, tuple[int, float]]:
    """MoM's step, one token per row after a prompt, or its prefill (`kernel_table`)."""
    model, _, _ = mom_side(args.d_model, args.n_layer)
    if args.prefill:
        prompt = prompt_ids(model.config, args.batch, args.prefill)

        def prefill() -> None:
            with inputs.rehearsal() if args.graph_path else contextlib.nullcontext():
                model(prompt, cache=mom.MoMCache(model.config), use_cache=True, logits_to_keep=1)

        print(f"MoM prefill wall time: {wall_ms(prefill):.2f} ms per call; {host_line(prefill, model.backbone.layers)}")
        if args.prelude:
            report_prelude_and_layer("MoM prefill", prefill, model.backbone.layers, args.top)
        if args.timeline:
            timeline("MoM prefill", prefill, top=args.top)
        return kernel_table(prefill, args.steps)
    cache = mom.MoMCache(model.config)
    model(prompt_ids(model.config, args.batch, PROMPT), cache=cache, use_cache=True, logits_to_keep=1)
    ids = step_ids(model.config, args.batch, args.rows)

    def step() -> None:
        model(ids, cache=cache, use_cache=True)

    if args.timeline:
        timeline("MoM decode step", step, top=args.top)
    return kernel_table(step, args.steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--n-layer", type=int, default=24)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", choices=("uniform", "mixed"), default="uniform",
                        help="MoM's rows: all text, or cycling through the modalities")
    parser.add_argument("--prefill", type=int, default=0, metavar="N",
                        help="profile an N-token prompt's forward instead of a decode step")
    parser.add_argument("--steps", type=int, default=16, help="profiled steps (or prefills) per side")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per side")
    parser.add_argument("--prelude", action="store_true",
                        help="with --prefill: where each side's host time before its first layer, and within one "
                             "layer, goes (PyTorch's ops and the Python between them)")
    parser.add_argument("--graph-path", action="store_true",
                        help="with --prefill: MoM's prefill on the path a prefill graph records, run eagerly")
    parser.add_argument("--timeline", action="store_true",
                        help="also each side's GPU timeline: time running, idle gaps and their neighbours")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode: needs a CUDA device", file=sys.stderr)
        return 2
    what = f"prefill of {args.prefill} tokens" if args.prefill else f"decode step, {args.rows} rows"
    what += " (MoM on a prefill graph's path)" if args.prefill and args.graph_path else ""
    print(f"device: {torch.cuda.get_device_name()}  {args.d_model} x {args.n_layer}  batch {args.batch}  bf16  {what}")

    report("MoM" if args.prefill else f"MoM ({args.rows} rows)", mom_table(args), args.top)
    torch.cuda.empty_cache()

    try:
        dense, _, _ = mamba_ssm_side(args.d_model, args.n_layer)
    except ImportError:
        print("\nmamba-ssm is not installed: its side is left out")
        return 0
    from mamba_ssm.utils.generation import InferenceParams

    with torch.inference_mode():
        if args.prefill:
            prompt = torch.randint(0, dense.config.vocab_size, (args.batch, args.prefill), device="cuda")

            def dense_prefill() -> None:
                fresh = InferenceParams(max_seqlen=args.prefill + 1, max_batch_size=args.batch)
                dense(prompt, inference_params=fresh, num_last_tokens=1)

            print(f"\nmamba-ssm prefill wall time: {wall_ms(dense_prefill):.2f} ms per call; "
                  f"{host_line(dense_prefill, dense.backbone.layers)}")
            if args.prelude:
                report_prelude_and_layer("mamba-ssm prefill", dense_prefill, dense.backbone.layers, args.top)
            if args.timeline:
                timeline("mamba-ssm prefill", dense_prefill, top=args.top)
            report("mamba-ssm", kernel_table(dense_prefill, args.steps), args.top)
            return 0
        params = InferenceParams(max_seqlen=PROMPT + 4 * args.steps, max_batch_size=args.batch)
        prompt = torch.randint(0, dense.config.vocab_size, (args.batch, PROMPT), device="cuda")
        dense(prompt, inference_params=params, num_last_tokens=1)
        params.seqlen_offset = PROMPT
        token = prompt[:, -1:]

        def dense_step() -> None:
            dense(token, inference_params=params, num_last_tokens=1)
            params.seqlen_offset += 1

        if args.timeline:
            timeline("mamba-ssm decode step", dense_step, top=args.top)

        report("mamba-ssm", kernel_table(dense_step, args.steps), args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
