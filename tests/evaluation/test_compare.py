import json
import math

import pytest

from mom.evaluation.compare import Curve, Run, flops_to_reach, read_curve, read_run, report, shares


def write_run(path, steps, flops_per_step, val_losses):
    """A metrics.jsonl like mom-train writes: train rows every step, validation rows at the given steps."""
    rows = [{"split": "train", "step": s, "loss": 9.0, "flops": s * flops_per_step} for s in range(1, max(steps) + 1)]
    for s, (all_loss, text, image) in zip(steps, val_losses):
        rows.append({"split": "validation", "step": s, "loss": all_loss, "loss/text": text, "loss/image": image})
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_read_curve_pairs_validation_with_training_flops(tmp_path):
    run = write_run(tmp_path / "a", [2, 4], 10.0, [(3.0, 3.2, 2.8), (2.0, 2.1, 1.9)])
    curve = read_curve("a", run)
    assert curve.flops == [20.0, 40.0]
    assert curve.losses == {"all": [3.0, 2.0], "image": [2.8, 1.9], "text": [3.2, 2.1]}


def test_flops_to_reach_interpolates_and_reports_never():
    curve = Curve("m", [10.0, 20.0, 30.0], {"all": [4.0, 3.0, 2.0]})
    assert flops_to_reach(curve, "all", 3.5) == pytest.approx(15.0)
    assert flops_to_reach(curve, "all", 4.5) == 10.0  # already below at the first point
    assert flops_to_reach(curve, "all", 1.0) is None


def test_report_gives_share_of_baseline_flops(tmp_path):
    dense = read_run("dense", [write_run(tmp_path / "d", [5, 10], 1.0, [(3.0, 3.0, 3.0), (2.0, 2.5, 1.5)])])
    mom = read_run("mom", [write_run(tmp_path / "m", [5, 10], 1.0, [(2.0, 2.0, 1.0), (1.5, 1.8, 0.9)])])
    text = report([mom, dense], dense)
    assert "dense's final loss" in text
    share_line = [line for line in text.splitlines() if line.startswith("mom ")][-1]
    # mom reaches dense's final losses (2.0 all, 2.5 text, 1.5 image) by its first point: 5 of dense's 10 FLOPs
    assert share_line.split()[1:] == ["50.0%", "50.0%", "50.0%"]


def test_corrupt_metrics_line_names_the_file_but_a_torn_last_line_is_ignored(tmp_path):
    run = write_run(tmp_path / "a", [1], 1.0, [(3.0, 3.0, 3.0)])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "st')  # a crash mid-write
    assert read_curve("a", run).losses["all"] == [3.0]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('\n{"split": "validation", "step": 1, "loss": 2.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:3"):
        read_curve("a", run)


def test_a_window_without_a_modality_is_a_gap_not_a_crash(tmp_path):
    """Issue 18.3: a training-log window with no speech token logs "loss/speech": null."""
    rows = [
        {"split": "train", "step": 1, "flops": 1.0, "loss": 4.0, "loss/text": 4.0, "loss/speech": 3.0},
        {"split": "train", "step": 2, "flops": 2.0, "loss": 3.0, "loss/text": 3.0, "loss/speech": 2.0},
        {"split": "train", "step": 3, "flops": 3.0, "loss": 2.5, "loss/text": 2.5, "loss/speech": None},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curve = read_curve("a", tmp_path, split="train")
    assert curve.losses["speech"][:2] == [3.0, 2.0] and math.isnan(curve.losses["speech"][2])
    assert curve.final("speech") == 2.0 and curve.final("text") == 2.5  # the last measured value
    assert flops_to_reach(curve, "speech", 2.5) == pytest.approx(1.5)  # between the measured points
    assert flops_to_reach(curve, "speech", 1.0) is None and flops_to_reach(curve, "speech", math.nan) is None
    twin = Run("b", [read_curve("b", tmp_path, split="train")])
    base = Run("a", [curve])
    share_line = report([twin, base], base).splitlines()[-1].split()
    # all and text reach their final loss at the last point (3 of 3 FLOPs), speech its last measured one at 2 of 3
    assert share_line == ["b", "100.0%", "66.7%", "100.0%"]


def test_seeds_give_a_mean_target_shares_per_seed_and_a_spread_verdict(tmp_path):
    """Issue 23.3: several seeds per configuration; the baseline's final loss is the mean of its seeds, a share is
    given per seed (median and range), and a difference inside the seed-to-seed spread is no difference."""
    def seeds(name, finals):  # per seed: validation at steps 5 and 10 (1 FLOP a step), final = (all, text, image)
        return read_run(name, [write_run(tmp_path / f"{name}{i}", [5, 10], 1.0, [(4.0, 4.0, 4.0), f])
                               for i, f in enumerate(finals)])

    dense = seeds("dense", [(2.0, 2.0, 2.0), (2.2, 2.1, 2.0), (2.4, 2.2, 2.0)])  # all: mean 2.2, spread 0.4
    mom = seeds("mom", [(1.9, 2.15, 1.0), (2.0, 2.15, 1.1), (2.1, 2.15, 1.2)])
    assert dense.mean_final("all") == pytest.approx(2.2) and dense.spread("all") == pytest.approx(0.4)
    # target 2.2 from 4.0 at 5 FLOPs: mom seed 0 reaches it at 5 + 5 * 1.8 / 2.1 FLOPs of dense's 10
    assert shares(mom, dense, "all")[0] == pytest.approx((5 + 5 * 1.8 / 2.1) / 10)
    assert shares(dense, dense, "all")[2] is None  # the worst dense seed never reaches the mean of its seeds
    text = report([mom, dense], dense)
    assert "mean of its 3 seeds)" in text and "mom (3 seeds)" in text
    verdicts = [line for line in text.splitlines() if line.startswith("mom ")][-1].split()
    # all: -0.2 inside the 0.4 spread; image: -0.9 outside 0.2 (mom's seeds); text: +0.05 inside 0.2 (dense's)
    assert verdicts[1:] == ["-0.2000/0.4000", "no", "diff.", "-0.9000/0.2000", "lower", "+0.0500/0.2000", "no", "diff."]
