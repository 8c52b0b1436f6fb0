"""`mom-compare`: the report and plot of runs, and one-line errors for bad runs."""

import json

import pytest

from mom.cli.compare import main


def write_run(path, losses):
    """A metrics.jsonl with one train and one validation record per step; ``losses``: validation "loss" values."""
    rows = []
    for step, loss in enumerate(losses, 1):
        rows.append({"split": "train", "step": step, "loss": 9.0, "flops": float(step), "loss/speech": None})
        rows.append({"split": "validation", "step": step, "loss": loss, "loss/text": loss})
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def one_error_line(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("mom-compare: error: ") and err.count("\n") == 1 and needle in err, err


def test_report_and_plot(tmp_path, capsys):
    a = write_run(tmp_path / "a", [3.0, 2.0])
    b = write_run(tmp_path / "b", [2.5, 1.0])
    assert main(["--run", f"a={a}", "--run", f"b={b}", "--baseline", "a"]) == 0
    out = capsys.readouterr().out
    assert "FLOPs to reach a's final loss" in out
    assert out.splitlines()[-1].split()[1:] == ["66.7%", "66.7%"]  # b reaches 2.0 at 1 + (2.5-2)/(2.5-1) of a's 2
    pytest.importorskip("matplotlib")
    png = tmp_path / "cmp.png"
    assert main(["--run", f"a={a}", "--run", f"b={b}", "--baseline", "a", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000 and "plot:" in capsys.readouterr().out


def test_seeds_as_comma_separated_directories_and_the_plot_of_a_band(tmp_path, capsys):
    a = [write_run(tmp_path / f"a{i}", [3.0, 2.0 + 0.1 * i]) for i in range(2)]
    b = [write_run(tmp_path / f"b{i}", [2.5, 1.0 + 0.1 * i]) for i in range(2)]
    png = tmp_path / "seeds.png"
    args = ["--run", "a=" + ",".join(map(str, a)), "--run", "b=" + ",".join(map(str, b)), "--baseline", "a"]
    assert main([*args, *(["--out", str(png)] if _has_matplotlib() else [])]) == 0
    out = capsys.readouterr().out
    assert "a (2 seeds)" in out and "mean of its 2 seeds" in out and "no diff." not in out.split("spread")[-1]
    assert png.is_file() or not _has_matplotlib()
    with pytest.raises(SystemExit) as e:
        main(["--run", f"a={a[0]},", "--baseline", "a"])
    assert e.value.code == 2 and "an empty directory" in capsys.readouterr().err


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_train_split_with_a_null_modality_loss(tmp_path, capsys):
    """Issue 18.3: --split train --baseline with "loss/speech": null reported, not a TypeError."""
    a = write_run(tmp_path / "a", [3.0, 2.0])
    assert main(["--run", f"a={a}", "--run", f"b={a}", "--baseline", "a", "--split", "train"]) == 0
    assert "speech" in capsys.readouterr().out


def test_bad_runs_are_one_line_errors(tmp_path, capsys):
    assert main(["--run", f"x={tmp_path / 'missing'}"]) == 2
    one_error_line(capsys, "no metrics file")
    (tmp_path / "hf").mkdir()
    assert main(["--run", f"x={tmp_path / 'hf'}"]) == 2  # not a run directory
    one_error_line(capsys, "is it a mom-train out_dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert main(["--run", f"x={empty}"]) == 2
    one_error_line(capsys, "no validation records")
    with pytest.raises(SystemExit) as e:
        main(["--run", f"a={write_run(tmp_path / 'a', [1.0])}", "--baseline", "nope"])
    assert e.value.code == 2 and "--baseline 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--run", "no-equals-sign"])
    assert "expected NAME=DIR" in capsys.readouterr().err
