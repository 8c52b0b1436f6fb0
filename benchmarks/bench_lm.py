"""Benchmark a whole MoM LM training step against mamba-ssm's `MambaLMHeadModel` (AdamW, bf16 autocast).

    python benchmarks/bench_lm.py                                  # ~115M (768x24) and ~353M (1024x48), batch 8x2048
    python benchmarks/bench_lm.py --model 768x24 --batch 8 --length 2048
    python benchmarks/bench_lm.py --model 768x24 --mask             # + the default call with an all-ones mask
    python benchmarks/bench_lm.py --model 768x24 --launches         # + the call with mamba-ssm's Triton launches
    python benchmarks/bench_lm.py --model 768x24 --graph            # + the default call's step in one CUDA graph

MoM is measured twice: given the batch's tokens per modality, counted on the host (`modality_counts`, as `mom.train`
does), and called as transformers' Trainer and peft call it, ``model(ids, labels=ids)`` (the default call). Prints
tokens/s, peak memory and MFU for each against the dense model and their ratios (MoM / dense), and the default call's
tokens/s over the call with counts; same process, same data; each side is measured --rounds times, alternating, and its
best round is compared. ``--mask`` adds a third MoM side: the default call with an all-ones ``attention_mask`` (what
the Trainer passes when the collator makes one), which the fused path applies on the device unread, and its tokens/s
over the default call's. ``--launches`` adds the call with counts with mamba-ssm's Triton-launching functions as it
ships them (``MOM_DIRECT_LAUNCH=0``: the blocks' add + norm through Triton's autotuner) and the direct launches'
tokens/s over it. ``--graph`` adds the default call's whole step (forward, backward, AdamW) recorded once in a CUDA
graph and replayed (`mom.train.captured_step.CapturedStep`, batches given from pinned CPU memory and checked on the
host), and for reference the dense model's step recorded the same way.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import interleaved_modalities, launches, measure, row  # noqa: E402

import mom  # noqa: E402
from mom.model import flops  # noqa: E402
from mom.train.captured_step import CapturedStep, CaptureError  # noqa: E402

VOCAB = 50280  # mamba-ssm's GPT-NeoX vocabulary (50277) padded to a multiple of 8
VOCAB_SPLIT = (VOCAB - 8192 - 4096, 8192, 4096)  # text / image / speech


def train_step_fn(model, ids, labels, optimizer, forward):
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(model, ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def captured_step_fn(model, ids: torch.Tensor, optimizer, forward) -> Callable[[], None]:
    """The step of `train_step_fn` recorded in a CUDA graph (`CapturedStep`), warmed up and recorded before it is
    returned; its batch comes from pinned CPU memory, as a loader gives it, and is checked on the host."""
    batch = {"ids": ids.cpu().pin_memory()}
    check = getattr(model, "check_inputs", None)
    step = CapturedStep(model, optimizer, loss_fn=lambda model, b: forward(model, b["ids"], b["ids"]),
                        check=None if check is None else lambda ids: check(input_ids=ids, labels=ids))
    for _ in range(step.warmup + 1):
        step(batch)
    return lambda: step(batch)


def make_batch(config: mom.MoMConfig, batch: int, length: int, device: str = "cuda") -> torch.Tensor:
    """(batch, length) token ids, modalities interleaved in runs, each id drawn from its modality's vocabulary."""
    modality_ids = interleaved_modalities(batch, length, device=device)
    offsets = torch.tensor(config.vocab_offsets, device=device)
    sizes = torch.tensor(config.vocab_sizes, device=device)
    return offsets[modality_ids] + (torch.rand(batch, length, device=device) * sizes[modality_ids]).long()


def mom_forward(model, ids, labels, counts=None, attention_mask=None):
    return model(ids, labels=labels, modality_counts=counts, attention_mask=attention_mask).loss


def host_counts(config: mom.MoMConfig, ids: torch.Tensor) -> tuple[int, ...]:
    """Tokens per modality of a batch, counted on the host (as `mom.train` does from the CPU batch)."""
    modality = config.modality_of(ids.cpu())
    return tuple(torch.bincount(modality.flatten(), minlength=config.num_modalities).tolist())


def dense_forward(model, ids, labels):
    logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def build(name: str, d_model: int, n_layer: int, device: str = "cuda", counts: tuple[int, ...] | None = None,
          attention_mask: torch.Tensor | None = None):
    """-> (model, forward(model, ids, labels) -> loss) for "mom" or "dense" (mamba-ssm's MambaLMHeadModel).
    ``counts``: the batch's tokens per modality, given to MoM's forward (`host_counts`); None: MoM reads them.
    ``attention_mask``: given to MoM's forward."""
    if name == "mom":
        config = mom.MoMConfig(vocab_sizes=VOCAB_SPLIT, d_model=d_model, n_layer=n_layer)
        forward = functools.partial(mom_forward, counts=counts, attention_mask=attention_mask)
        return mom.MoMForCausalLM(config).to(device), forward
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    dcfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg={"layer": "Mamba1"},
                       rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
    return MambaLMHeadModel(dcfg, device=device), dense_forward


# MoM's calls: (whether the forward is given the counts, whether it is given an all-ones attention_mask)
MOM_CALLS = {"counts": (True, False), "default": (False, False)}
MASK_CALL = {"mask": (False, True)}  # with --mask
LIBRARY_LAUNCHES = "mom counts, mamba-ssm's launches"  # with --launches: MOM_DIRECT_LAUNCH=0
GRAPHED = ("mom default, CUDA graph", "dense, CUDA graph")  # with --graph


def bench_model(d_model: int, n_layer: int, batch: int, length: int, iters: int, rounds: int,
                mask: bool = False, library_launches: bool = False, graph: bool = False) -> None:
    """Each side (MoM with counts, MoM's default call, with ``mask`` the default call with an all-ones attention
    mask, with ``library_launches`` the call with counts with mamba-ssm's Triton launches, with ``graph`` MoM's
    default call and dense each in a CUDA graph, dense) measured ``rounds`` times, alternating (a fresh model each
    time); the best round counts (one slow round on either side, from the machine rather than the code, was seen to
    move the ratio by 15%)."""
    device = "cuda"
    config = mom.MoMConfig(vocab_sizes=VOCAB_SPLIT, d_model=d_model, n_layer=n_layer)
    ids = make_batch(config, batch, length, device)
    counts = host_counts(config, ids)  # counted once, off the timed steps
    ones = torch.ones_like(ids)  # made once, off the timed steps, as a collator's mask comes with the batch
    tokens = batch * length
    calls = {**MOM_CALLS, **(MASK_CALL if mask else {})}
    sides = {f"mom {name}": ("mom", counts if given else None, ones if masked else None, True)
             for name, (given, masked) in calls.items()}
    if library_launches:
        sides[LIBRARY_LAUNCHES] = ("mom", counts, None, False)
    if graph:
        sides[GRAPHED[0]], sides[GRAPHED[1]] = ("mom", None, None, True), ("dense", None, None, True)
    sides["dense"] = ("dense", None, None, True)
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, (kind, given, attention_mask, direct) in sides.items():
            if name in GRAPHED and name not in results:
                continue  # its recording failed
            torch.cuda.empty_cache()
            model, forward = build(kind, d_model, n_layer, device, given, attention_mask)
            params = sum(p.numel() for p in model.parameters())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=name in GRAPHED)
            with launches(direct):
                torch.cuda.reset_peak_memory_stats()
                try:
                    step = (captured_step_fn(model, ids, optimizer, forward) if name in GRAPHED
                            else train_step_fn(model, ids, ids, optimizer, forward))
                except CaptureError as e:
                    print(f"  {name}: not recorded: {e}")
                    del results[name]
                    continue
                # a graph's activations were allocated while it was recorded, before measure() resets the peak
                recorded_gib = torch.cuda.max_memory_allocated() / 2**30 if name in GRAPHED else 0.0
                ms, gib, _ = measure(step, warmup=3, iters=iters)
                gib = max(gib, recorded_gib)
            results[name].append((tokens / (ms / 1e3), gib, params))
            del model, optimizer, step
    for name, runs in results.items():
        print(f"  {name} tokens/s per round (k): " + ", ".join(f"{tps / 1e3:.1f}" for tps, _, _ in runs))
    best = {name: max(runs) for name, runs in results.items()}  # (tokens/s, peak GiB, params) of the best round
    tps_dense, mem_dense, p_dense = best["dense"]
    p_mom = best["mom counts"][2]
    print(f"model d_model={d_model} n_layer={n_layer} batch={batch}x{length} params MoM {p_mom/1e6:.1f}M "
          f"dense {p_dense/1e6:.1f}M counts {counts} backend={mom.ops.backend.backend_name(torch.device(device))}")
    mfu_dense = flops.mfu(tps_dense, config, torch.device(device))  # active FLOPs per token are equal
    for name in calls:
        tps, mem, _ = best[f"mom {name}"]
        print(row(f"tokens/s (k), {name}", tps / 1e3, tps_dense / 1e3, "k/s"))
        print(row(f"peak memory, {name}", mem, mem_dense, "GiB"))
        mfu = flops.mfu(tps, config, torch.device(device))
        if mfu is not None and mfu_dense is not None:
            print(row(f"MFU, {name}", mfu, mfu_dense, ""))
    default, with_counts = best["mom default"][0], best["mom counts"][0]
    print(f"{'MoM default / counts':<28} tokens/s {default / 1e3:.1f}k vs {with_counts / 1e3:.1f}k "
          f"ratio {default / with_counts:6.3f}")
    if library_launches:
        library = best[LIBRARY_LAUNCHES][0]
        print(f"{'MoM direct / library launches':<28} tokens/s {with_counts / 1e3:.1f}k vs {library / 1e3:.1f}k "
              f"ratio {with_counts / library:6.3f}")
    if GRAPHED[0] in best:
        print(row("tokens/s (k), CUDA graph", best[GRAPHED[0]][0] / 1e3, tps_dense / 1e3, "k/s"))
        print(row("peak memory, CUDA graph", best[GRAPHED[0]][1], mem_dense, "GiB"))
    if GRAPHED[1] in best:
        graphed = best[GRAPHED[1]][0]
        print(f"{'dense CUDA graph / dense':<28} tokens/s {graphed / 1e3:.1f}k vs {tps_dense / 1e3:.1f}k "
              f"ratio {graphed / tps_dense:6.3f}")
    if mask:
        masked = best["mom mask"][0]
        print(f"{'MoM mask / default':<28} tokens/s {masked / 1e3:.1f}k vs {default / 1e3:.1f}k "
              f"ratio {masked / default:6.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="D_MODELxN_LAYER (repeatable)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="measurements per side, alternating; the best counts")
    parser.add_argument("--mask", action="store_true",
                        help="also measure the default call with an all-ones attention_mask")
    parser.add_argument("--launches", action="store_true", help="also measure the call with counts with mamba-ssm's "
                        "Triton launches (MOM_DIRECT_LAUNCH=0) instead of mom's direct ones")
    parser.add_argument("--graph", action="store_true", help="also measure MoM's default call and dense with the "
                        "whole step recorded in a CUDA graph (mom.train.captured_step)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lm: needs a CUDA device", file=sys.stderr)
        return 2
    print("device:", torch.cuda.get_device_name())
    for spec in args.model or ["768x24", "1024x48"]:
        d, n = (int(v) for v in spec.split("x"))
        bench_model(d, n, args.batch, args.length, args.iters, args.rounds, args.mask, args.launches, args.graph)
    return 0


if __name__ == "__main__":
    sys.exit(main())
