"""Benchmark generation: MoM's `generate` against mamba-ssm's `MambaLMHeadModel.generate(cg=True)` (and, with --hf,
transformers' `MambaForCausalLM.generate`), same process, same prompt, bf16 weights, greedy.

    python benchmarks/bench_generate.py                       # 768x24, prompt 2048, 256 new tokens, batch 1 and 64
    python benchmarks/bench_generate.py --batch 1 --new 64 --hf
    python benchmarks/bench_generate.py --mixed             # MoM only: rows decoding different modalities vs one
    python benchmarks/bench_generate.py --eager             # MoM's decode steps without its CUDA graph
    python benchmarks/bench_generate.py --prefill-only      # the prompt's forward only, both sides, no generate()
    python benchmarks/bench_generate.py --prefill-only --prefill-graph   # + MoM's prefill replayed from a CUDA graph

Per batch size, one line per side, then the ratios: MoM's prefill speed and decode tokens/s over mamba-ssm's; for a
batch of several rows, also MoM's decode with rows in different modalities over rows in one ("mixed rows").
The mixed-rows line times MoM twice with a logits processor that keeps every generated token of row i in one
modality's vocabulary: "mom uniform" all rows text, "mom mixed" row i in modality i mod M (so each step mixes
modalities across rows); the same processor runs on both, so the ratio isolates the mixed-modality step. --mixed
runs only that comparison. The plain "mom" side is MoM's ``generate`` as a user calls it, which for this plain greedy
call runs MoM's own loop (`mom.model.generate_loop`: no read of the device between steps); "mom, tf loop" times the same
call in transformers' loop (which reads the device after every step), and a ratio line compares the two. A logits
processor (the rows sides) always runs in transformers' loop, which needs transformers >= 5.24 to carry MoM's cache:
with an older one those sides are left out. --prefill-graph adds the side "mom, prefill graph": MoM with its prompt's
forward recorded into a CUDA graph the second time its shape comes and replayed after (`mom.model.prefill_graph`;
generate(prefill_cuda_graph=True), the default); its line also gives the recording call's time and the replay's
largest logit difference from an eager forward. Last, per batch, MoM's decode step alone ("mom decode step
alone": `decode_logits` on fixed ids, 200 steps after a prefill, uniform and mixed rows), what no loop around it can
go below.

For each side: prefill (the prompt's forward with a fresh recurrent state, logits of the last position only: MoM
and mamba-ssm; the fastest of --prefill-reps calls), decode tokens/s (batch x new tokens over generate's time minus
the prefill's), and the peak memory of generate next to that of a run with 8x fewer new tokens (equal if memory is
constant in the tokens generated). A side that runs out of memory is reported as OOM. Prompts interleave text,
image and speech runs (`bench_common`).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transformers  # noqa: E402
from bench_common import interleaved_modalities  # noqa: E402

import mom  # noqa: E402
from mom.model.generate_loop import DeviceLogitsProcessor  # noqa: E402
from mom.model.modeling import GENERATE_CARRIES_CACHE  # noqa: E402

VOCAB = 50280  # mamba-ssm's GPT-NeoX vocabulary (50277) padded to a multiple of 8
VOCAB_SPLIT = (VOCAB - 8192 - 4096, 8192, 4096)  # text / image / speech


def prompt_ids(config: mom.MoMConfig, batch: int, length: int) -> torch.Tensor:
    """(batch, length) ids, modalities interleaved in runs, each id drawn from its modality's vocabulary."""
    modality = interleaved_modalities(batch, length, device="cuda")
    offsets = torch.tensor(config.vocab_offsets, device="cuda")
    sizes = torch.tensor(config.vocab_sizes, device="cuda")
    return offsets[modality] + (torch.rand(batch, length, device="cuda") * sizes[modality]).long()


def step_ids(config: mom.MoMConfig, batch: int, rows: str, device: str = "cuda") -> torch.Tensor:
    """(batch, 1) ids of one decode step: "uniform" every row a text id, "mixed" row i an id of modality i mod M."""
    modality = torch.arange(batch, device=device) % config.num_modalities if rows == "mixed" else (
        torch.zeros(batch, dtype=torch.long, device=device))
    return (torch.tensor(config.vocab_offsets, device=device)[modality] + 1).view(batch, 1)


@torch.inference_mode()
def replay_ms(model: mom.MoMForCausalLM, prompt: torch.Tensor, rows: str, steps: int = 200) -> float:
    """ms per decode step alone (`decode_logits`: the graph replay where one applies) after ``prompt``'s prefill, the
    same ids every step, outside any generate() loop."""
    cache = mom.MoMCache(model.config)
    model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
    ids = step_ids(model.config, prompt.shape[0], rows, prompt.device.type)
    for _ in range(3):  # capture and warm-up
        model.decode_logits(ids, cache)
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        model.decode_logits(ids, cache)
    sync()
    return (time.perf_counter() - start) / steps * 1e3


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(seconds, peak GiB allocated) of one call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


class RowModality(DeviceLogitsProcessor):
    """A logits processor: row i may only write ids of modality ``modality_of_row(i)`` (an additive -inf mask). It
    reads nothing on the host, so MoM's own generate loop runs it (`mom.model.generate_loop`)."""

    def __init__(self, config: mom.MoMConfig, mixed: bool) -> None:
        self.config, self.mixed = config, mixed
        self.bias: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.bias is None or self.bias.shape != scores.shape:
            rows = torch.arange(scores.shape[0], device=scores.device)
            modality = rows % self.config.num_modalities if self.mixed else torch.zeros_like(rows)
            offsets = torch.tensor(self.config.vocab_offsets, device=scores.device)[modality, None]
            sizes = torch.tensor(self.config.vocab_sizes, device=scores.device)[modality, None]
            ids = torch.arange(scores.shape[1], device=scores.device)
            inside = (ids >= offsets) & (ids < offsets + sizes)
            self.bias = torch.where(inside, 0.0, float("-inf")).to(scores.dtype)
        return scores + self.bias


def mom_side(d_model: int, n_layer: int, rows: str | None = None, cuda_graph: bool = True,
             transformers_loop: bool = False, prefill_graph: bool = False):
    """``rows``: None, or "uniform" / "mixed" (`RowModality`); ``cuda_graph``: generate()'s graph decode;
    ``transformers_loop``: transformers' own generate() loop even for the plain greedy call (which MoM's
    ``generate`` runs in its own loop, `mom.model.generate_loop`); ``prefill_graph``: the prefill replayed from a
    CUDA graph (`mom.model.prefill_graph`)."""
    from transformers import GenerationMixin, LogitsProcessorList

    config = mom.MoMConfig(vocab_sizes=VOCAB_SPLIT, d_model=d_model, n_layer=n_layer)
    model = mom.MoMForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.keep_ssm_params_fp32()  # A_log and D stay fp32, as in training and in from_pretrained

    def prefill(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=True, logits_to_keep=1, cuda_graph=prefill_graph).logits  # (b, 1, V)

    processors = LogitsProcessorList([RowModality(config, rows == "mixed")] if rows else [])

    call = functools.partial(GenerationMixin.generate, model) if transformers_loop else model.generate

    def generate(ids: torch.Tensor, new: int) -> torch.Tensor:
        return call(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                    eos_token_id=None, logits_processor=processors, cuda_graph=cuda_graph,
                    prefill_cuda_graph=prefill_graph)

    return model, prefill, generate


def mamba_ssm_side(d_model: int, n_layer: int):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.utils.generation import InferenceParams

    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg={"layer": "Mamba1"},
                      rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)
    model = MambaLMHeadModel(cfg, device="cuda", dtype=torch.bfloat16).eval()

    def prefill(ids: torch.Tensor) -> None:
        params = InferenceParams(max_seqlen=ids.shape[1] + 1, max_batch_size=ids.shape[0])
        model(ids, inference_params=params, num_last_tokens=1)

    def generate(ids: torch.Tensor, new: int) -> torch.Tensor:
        return model.generate(ids, max_length=ids.shape[1] + new, cg=True, top_k=1)

    return model, prefill, generate


def hf_side(d_model: int, n_layer: int):
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=d_model, num_hidden_layers=n_layer, state_size=16,
                      residual_in_fp32=True)
    model = MambaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()

    def prefill(ids: torch.Tensor) -> None:
        model(ids, use_cache=True, logits_to_keep=1)

    def generate(ids: torch.Tensor, new: int) -> torch.Tensor:
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                              eos_token_id=None)

    return model, prefill, generate


SIDES = {"mom": mom_side, "mom, tf loop": functools.partial(mom_side, transformers_loop=True),
         "mamba-ssm": mamba_ssm_side, "transformers": hf_side,
         "mom uniform": functools.partial(mom_side, rows="uniform"),
         "mom mixed": functools.partial(mom_side, rows="mixed"),
         "mom, prefill graph": functools.partial(mom_side, prefill_graph=True)}


@torch.inference_mode()
def bench_side(name: str, d_model: int, n_layer: int, batch: int, prompt: int, new: int, rounds: int,
               eager: bool = False, prefill_reps: int = 5, prefill_only: bool = False) -> dict:
    torch.cuda.empty_cache()
    side = SIDES[name]
    if eager and name.startswith("mom"):
        side = functools.partial(side, cuda_graph=False)
    model, prefill, generate = side(d_model, n_layer)
    config = mom.MoMConfig(vocab_sizes=VOCAB_SPLIT, d_model=d_model, n_layer=n_layer)
    ids = prompt_ids(config, batch, prompt)
    result: dict = {"side": name}
    if isinstance(model, mom.MoMForCausalLM):
        result["backend"] = model.backend  # "... (fused mixer)" when the prefill can take the fused path
    try:
        prefill(ids)  # warm-up: kernels, autotuning
        if name == "mom, prefill graph":  # the second call of the shape records its graph
            result["record_ms"] = timed(lambda: prefill(ids))[0] * 1e3
        pre, pre_peak = min(timed(lambda: prefill(ids)) for _ in range(prefill_reps))
        result["prefill_ms"], result["prefill_peak_gib"] = pre * 1e3, pre_peak
        if name == "mom, prefill graph":  # the replay's logits against the eager forward's (bf16: last bits differ)
            eager_logits = model(ids, use_cache=True, logits_to_keep=1).logits
            result["max_logit_diff"] = (prefill(ids) - eager_logits).abs().max().item()
        if prefill_only:
            del model
            return result
        # warm-up at the timed length: mamba-ssm captures its CUDA graph for the cache's maximum length, and a longer
        # generate() captures it again (a warm-up of 2 tokens left that capture inside the first timed call)
        generate(ids, new)
        runs = [timed(lambda: generate(ids, new)) for _ in range(rounds)]
        gen_s, peak = min(runs)
        result["decode_tok_s"] = batch * new / max(gen_s - pre, 1e-9)
        result["ms_per_step"] = (gen_s - pre) / new * 1e3
        result["peak_gib"] = peak
        short_s, short_peak = timed(lambda: generate(ids, max(new // 8, 2)))
        result["peak_gib_short"] = short_peak  # peak with 8x fewer new tokens: equal if memory is constant
    except torch.cuda.OutOfMemoryError:
        result["oom"] = True
    del model
    return result


def fmt(r: dict) -> str:
    if r.get("oom"):
        return f"  {r['side']:<13} OOM"
    line = f"  {r['side']:<13} prefill {r['prefill_ms']:9.2f} ms (peak {r['prefill_peak_gib']:6.2f} GiB)"
    if "decode_tok_s" in r:
        line += (f"   decode {r['decode_tok_s']:10.1f} tok/s ({r['ms_per_step']:7.2f} ms/step)   peak "
                 f"{r['peak_gib']:6.2f} GiB (short run {r['peak_gib_short']:6.2f})")
    if "record_ms" in r:
        line += f"   (the recording call {r['record_ms']:.2f} ms; max |logit - eager logit| {r['max_logit_diff']:.3g})"
    return line + (f"   [{r['backend']}]" if "backend" in r else "")


def ratios(results: dict[str, dict], mixed_rows: bool) -> list[str]:
    """The ratio lines: MoM over mamba-ssm (prefill speed, decode tokens/s) and mixed rows over uniform rows."""
    lines = []
    m, base = results.get("mom"), results.get("mamba-ssm")
    if m and base and not (m.get("oom") or base.get("oom")):
        line = (f"  ratio mom / mamba-ssm: prefill {base['prefill_ms'] / m['prefill_ms']:.3f}x speed "
                f"({m['prefill_ms']:.2f} vs {base['prefill_ms']:.2f} ms)")
        if "decode_tok_s" in m:
            line += (f", decode {m['decode_tok_s'] / base['decode_tok_s']:.3f}x tokens/s "
                     f"({m['decode_tok_s']:.1f} vs {base['decode_tok_s']:.1f})")
        lines.append(line)
    graph = results.get("mom, prefill graph")
    if graph and base and not (graph.get("oom") or base.get("oom")):
        lines.append(f"  ratio mom (prefill graph) / mamba-ssm: prefill "
                     f"{base['prefill_ms'] / graph['prefill_ms']:.3f}x speed ({graph['prefill_ms']:.2f} vs "
                     f"{base['prefill_ms']:.2f} ms)")
    own, theirs = results.get("mom"), results.get("mom, tf loop")
    if own and theirs and "decode_tok_s" in own and "decode_tok_s" in theirs:
        lines.append(f"  ratio MoM's loop / transformers' loop (MoM decode): "
                     f"{own['decode_tok_s'] / theirs['decode_tok_s']:.3f}x tokens/s "
                     f"({own['decode_tok_s']:.1f} vs {theirs['decode_tok_s']:.1f})")
    mixed, uniform = results.get("mom mixed"), results.get("mom uniform")
    if mixed_rows and mixed and uniform and not (mixed.get("oom") or uniform.get("oom")):
        lines.append(f"  ratio mixed rows / uniform rows (MoM decode): "
                     f"{mixed['decode_tok_s'] / uniform['decode_tok_s']:.3f}x tokens/s "
                     f"({mixed['decode_tok_s']:.1f} vs {uniform['decode_tok_s']:.1f})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="768x24", help="D_MODELxN_LAYER")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1 and 64)")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1, help="timed calls per side; the fastest counts")
    parser.add_argument("--hf", action="store_true", help="also time transformers' MambaForCausalLM")
    parser.add_argument("--mixed", action="store_true", help="MoM only: rows in different modalities vs one")
    parser.add_argument("--eager", action="store_true", help="MoM decodes without its CUDA graph")
    parser.add_argument("--prefill-reps", type=int, default=5, help="timed prefills per side; the fastest counts")
    parser.add_argument("--prefill-only", action="store_true", help="time the prefill only (no generate())")
    parser.add_argument("--prefill-graph", action="store_true",
                        help="also time MoM with its prefill replayed from a CUDA graph "
                             "(generate(prefill_cuda_graph=True))")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_generate: needs a CUDA device", file=sys.stderr)
        return 2
    # transformers' loop (MoM's rows-restricted sides, and the "tf loop" side) re-runs the whole sequence at every
    # step where transformers does not pass MoM's recurrent cache through generate(); MoM's own loop does not
    # depend on it
    tf_loop = GENERATE_CARRIES_CACHE or args.prefill_only
    if not tf_loop:
        print(f"bench_generate: transformers {transformers.__version__} does not pass MoM's recurrent cache through "
              "generate() (the project's floor is 5.24): the sides in transformers' loop are left out", file=sys.stderr)
    if args.mixed and not tf_loop:
        print("bench_generate: --mixed times transformers' loop, which needs transformers>=5.24", file=sys.stderr)
        return 2
    if args.mixed and args.prefill_only:
        print("bench_generate: --mixed compares decode steps; it cannot go with --prefill-only", file=sys.stderr)
        return 2
    d, n = (int(v) for v in args.model.split("x"))
    print(f"device: {torch.cuda.get_device_name()}  model {d}x{n}  prompt {args.prompt}  new {args.new}  "
          f"MoM decode {'eager' if args.eager else 'CUDA graph'}  transformers {transformers.__version__}  "
          f"torch {torch.__version__}")
    for batch in args.batch or [1, 64]:
        mixed_rows = batch > 1 and not args.prefill_only
        if args.mixed:
            sides = ["mom uniform", "mom mixed"]
        else:
            sides = ["mom"] + (["mom, tf loop"] if tf_loop and not args.prefill_only else []) + ["mamba-ssm"]
            sides += ["mom, prefill graph"] if args.prefill_graph else []
            sides += ["transformers"] if args.hf else []
            sides += ["mom uniform", "mom mixed"] if mixed_rows and tf_loop else []
        print(f"batch {batch}:")
        results = {}
        for s in sides:
            results[s] = bench_side(s, d, n, batch, args.prompt, args.new, args.rounds, args.eager,
                                    args.prefill_reps, args.prefill_only)
            print(fmt(results[s]), flush=True)
        for line in ratios(results, mixed_rows):
            print(line)
        if not args.prefill_only and not args.mixed:  # the step alone: what any loop around it cannot go below
            model, _, _ = mom_side(d, n, cuda_graph=not args.eager)
            prompt = prompt_ids(model.config, batch, args.prompt)
            alone = {rows: replay_ms(model, prompt, rows) for rows in (["uniform", "mixed"] if batch > 1 else
                                                                        ["uniform"])}
            print("  mom decode step alone (decode_logits, fixed ids, no generate loop): "
                  + ", ".join(f"{rows} rows {ms:.3f} ms" for rows, ms in alone.items()))
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
