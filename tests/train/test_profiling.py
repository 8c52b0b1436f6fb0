"""train.profile_steps: torch.profiler over chosen steps, a trace and a summary per rank, losses unchanged."""

import json

import pytest
from test_train import TINY, corpus_for_tests, recipe, train_losses

from mom.train.loop import train
from mom.train.profiling import covered_us
from mom.train.recipe import load_recipe

RUN = ["train.max_steps=4", "train.log_every=1", "train.export_hf=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_for_tests(tmp_path_factory)


def losses(out_dir):
    return [loss for _, loss, _ in train_losses(out_dir)]


def test_profiled_steps_write_trace_and_summary_and_change_no_loss(corpus, tmp_path):
    profiled, plain = tmp_path / "profiled", tmp_path / "plain"
    train(recipe(corpus, profiled, *RUN, "train.profile_steps=[2, 3]"))
    train(recipe(corpus, plain, *RUN))
    assert losses(profiled) == losses(plain)  # the profiler only watches

    summary = (profiled / "profile" / "summary-rank0.txt").read_text()
    first = summary.splitlines()[0]
    assert first.startswith("mom-train steps 2-3, rank 0: 2 steps, wall ") and first.endswith(" ms/step")
    assert float(first.split("wall ")[1].split()[0]) > 0
    assert "by self host time:" in summary and "aten::" in summary
    assert "GPU kernels" not in summary  # CPU run: no device time
    trace = json.loads((profiled / "profile" / "trace-rank0.json").read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])


def test_run_ending_before_the_last_profiled_step_writes_nothing(corpus, tmp_path):
    out = tmp_path / "short"
    result = train(recipe(corpus, out, *RUN, "train.profile_steps=[3, 9]"))
    assert result["step"] == 4 and not (out / "profile").exists()


@pytest.mark.parametrize("value", ["[3, 2]", "[0, 2]", "[2]", "[1, 2, 3]"])
def test_bad_profile_steps_are_named(value):
    with pytest.raises(ValueError, match="train.profile_steps"):
        load_recipe(TINY, [f"train.profile_steps={value}"])


def test_device_busy_time_counts_overlaps_once():
    assert covered_us([]) == 0
    assert covered_us([(0, 10), (5, 15), (20, 30), (22, 25), (30, 31)]) == 15 + 10 + 1
    assert covered_us([(5, 6), (0, 10)]) == 10
