"""benchmarks/bench_generate.py's report lines on hand-made results (the timing itself needs a GPU)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_generate import fmt, main, ratios, replay_ms, step_ids  # noqa: E402

import mom  # noqa: E402


def side(name, prefill_ms, tok_s=None):
    r = {"side": name, "prefill_ms": prefill_ms, "prefill_peak_gib": 1.5}
    if tok_s is not None:
        r.update(decode_tok_s=tok_s, ms_per_step=1.0, peak_gib=2.0, peak_gib_short=2.0)
    return r


def test_ratio_lines_name_each_comparison():
    results = {"mom": side("mom", 20.0, 900.0), "mamba-ssm": side("mamba-ssm", 19.0, 1000.0),
               "mom uniform": side("mom uniform", 20.0, 800.0), "mom mixed": side("mom mixed", 20.0, 760.0)}
    lines = ratios(results, mixed_rows=True)
    assert lines == ["  ratio mom / mamba-ssm: prefill 0.950x speed (20.00 vs 19.00 ms), decode 0.900x tokens/s "
                     "(900.0 vs 1000.0)",
                     "  ratio mixed rows / uniform rows (MoM decode): 0.950x tokens/s (760.0 vs 800.0)"]
    assert ratios(results, mixed_rows=False) == lines[:1]
    assert ratios({"mom": {"side": "mom", "oom": True}, "mamba-ssm": results["mamba-ssm"]}, True) == []
    with_loop = {**results, "mom, tf loop": side("mom, tf loop", 20.0, 600.0)}
    assert ratios(with_loop, mixed_rows=False) == [lines[0], "  ratio MoM's loop / transformers' loop (MoM "
                                                   "decode): 1.500x tokens/s (900.0 vs 600.0)"]


def test_prefill_only_results_have_no_decode_fields():
    results = {"mom": side("mom", 20.0), "mamba-ssm": side("mamba-ssm", 10.0)}
    assert ratios(results, mixed_rows=False) == ["  ratio mom / mamba-ssm: prefill 0.500x speed (20.00 vs 10.00 ms)"]
    assert "decode" not in fmt(results["mom"]) and "20.00 ms" in fmt(results["mom"])
    assert "OOM" in fmt({"side": "mom", "oom": True})


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it would run the benchmark")
def test_refuses_without_a_gpu(capsys):
    assert main(["--batch", "1"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_step_ids_and_the_step_alone_on_cpu():
    config = mom.MoMConfig(vocab_sizes=(40, 24, 16), d_model=16, n_layer=2, d_state=4)
    mixed = step_ids(config, 5, "mixed", "cpu")
    assert mixed.shape == (5, 1) and config.modality_of(mixed).flatten().tolist() == [0, 1, 2, 0, 1]
    assert config.modality_of(step_ids(config, 4, "uniform", "cpu")).flatten().tolist() == [0, 0, 0, 0]
    model = mom.MoMForCausalLM(config).eval()
    assert replay_ms(model, torch.randint(0, 40, (2, 8)), "mixed", steps=3) > 0


def test_the_prefill_graph_side_reports_its_ratio_and_recording_call():
    graph = {**side("mom, prefill graph", 8.0), "record_ms": 95.5, "max_logit_diff": 0.0625}
    results = {"mom": side("mom", 20.0), "mamba-ssm": side("mamba-ssm", 16.0), "mom, prefill graph": graph}
    assert ratios(results, mixed_rows=False) == [
        "  ratio mom / mamba-ssm: prefill 0.800x speed (20.00 vs 16.00 ms)",
        "  ratio mom (prefill graph) / mamba-ssm: prefill 2.000x speed (8.00 vs 16.00 ms)"]
    assert "(the recording call 95.50 ms; max |logit - eager logit| 0.0625)" in fmt(graph)
