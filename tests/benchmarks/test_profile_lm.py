"""benchmarks/profile_lm.py's timeline summary on a hand-made trace (the profiling itself needs a GPU)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from profile_lm import summarize_timeline  # noqa: E402


def kernel(name, ts, dur, cat="kernel"):
    return {"cat": cat, "name": name, "ts": ts, "dur": dur}


def test_timeline_busy_gaps_and_launches_per_step():
    events = [
        kernel("nvjet_sm90_tst_256x128_h_bz_TNT", 0, 100),
        kernel("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float> >(int)", 50, 100),
        kernel("gather_cols_kernel", 200, 10),  # idle 50 us before it
        kernel("Memcpy DtoH (Device -> Pageable)", 210, 5, cat="gpu_memcpy"),
        kernel("gather_cols_kernel", 235, 15),  # idle 20 us: under the threshold
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000},  # host events are ignored
    ]
    summary = summarize_timeline(events, steps=1)
    assert summary["span_ms"] == pytest.approx(0.250)
    assert summary["busy_ms"] == pytest.approx(0.180)  # the overlap of the first two counted once
    assert summary["gaps_ms"] == pytest.approx(0.050)
    assert summary["gaps"] == [(50, events[1]["name"], "gather_cols_kernel")]
    assert summary["launches"] == {"gather_cols_kernel": 2, "GEMM (cuBLAS)": 1, "PyTorch FillFunctor": 1,
                                   "Memcpy DtoH": 1}
    assert summarize_timeline(events, steps=2)["launches"]["gather_cols_kernel"] == 1


def test_timeline_without_gpu_activity_is_an_error():
    with pytest.raises(ValueError, match="no GPU activity"):
        summarize_timeline([{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1}], steps=1)
