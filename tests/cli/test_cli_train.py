"""`mom-train`'s command line: options and key=value overrides in any order, --overwrite, one-line errors."""

from pathlib import Path

import pytest

from mom.cli.train import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny_mom.yaml"


@pytest.mark.parametrize("argv", [
    ["--config", "r.yaml", "--resume", "none", "train.max_steps=20", "optim.lr=1e-3"],
    ["--config", "r.yaml", "train.max_steps=20", "--resume", "none", "optim.lr=1e-3"],
    ["train.max_steps=20", "optim.lr=1e-3", "--config", "r.yaml", "--resume", "none"],
])
def test_overrides_may_follow_options(argv):
    args = build_parser().parse_intermixed_args(argv)
    assert (args.config, args.resume, args.overrides) == ("r.yaml", "none", ["train.max_steps=20", "optim.lr=1e-3"])


def test_overwrite_and_resume_reach_the_recipe(capsys):
    argv = ["--config", str(TINY), "--resume", "none", "train.max_steps=7", "--overwrite", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7\n" in out and "resume: none\n" in out and "overwrite: true\n" in out


def test_a_bad_override_is_one_line_and_exit_2(capsys):
    assert main(["--config", str(TINY), "--resume", "none", "train.max_steps=ten"]) == 2
    err = capsys.readouterr().err
    assert err == "mom-train: error: override train.max_steps=ten: expected int, got str 'ten'\n"
