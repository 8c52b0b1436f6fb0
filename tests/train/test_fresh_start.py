"""A fresh start never mixes with an earlier run in the same out_dir (issue 18.1), a finished recipe rerun says it is
complete (18.5), the start-up line names device, dtype, ZeRO stage and backend (18.8)."""

import json
from pathlib import Path

import pytest
import torch
from test_train import FAST, TINY, corpus_for_tests

from mom.cli.train import main
from mom.model import flops
from mom.model.modeling import MoMForCausalLM
from mom.train.checkpoint import META, Checkpointer
from mom.train.distributed import Context
from mom.train.loop import claim_out_dir
from mom.train.metrics import read_jsonl
from mom.train.recipe import load_recipe
from mom.train.resolve import resolve_model_config

CTX = Context(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_for_tests(tmp_path_factory)


def steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))


def test_fresh_start_into_an_earlier_runs_directory(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--config", str(TINY), f"data.path={corpus}", f"train.out_dir={out}", *FAST, "train.export_hf=false",
            "train.eval_batches=1"]
    assert main([*base, "train.max_steps=6", "train.save_every=2"]) == 0  # the longer, earlier run
    assert steps(out) == ["step-00000004", "step-00000006"]
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()

    # --resume none is refused (overrides after it are parsed), and nothing is touched
    assert main([*base, "--resume", "none", "train.max_steps=3", "train.save_every=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mom-train: error: train.out_dir {out} already holds a run with checkpoints up to "
                          "step-00000006; starting afresh there would mix two runs.") and err.count("\n") == 1
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before

    # --overwrite moves the earlier run aside whole; rotation, latest and the summary are the new run's
    fresh = [*base, "train.max_steps=3", "train.save_every=1"]
    assert main([*fresh, "--overwrite"]) == 0
    captured = capsys.readouterr()
    (aside,) = tmp_path.glob("run.old-*")
    assert f"moved the previous contents of {out} to {aside} (train.overwrite)" in captured.err
    assert {aside / p.relative_to(out): data for p, data in before.items()} == {
        p: p.read_bytes() for p in sorted(aside.rglob("*")) if p.is_file()}
    assert steps(out) == ["step-00000002", "step-00000003"]
    assert (out / "checkpoints" / "latest").read_text() == "step-00000003"
    assert f"checkpoint: {out}/checkpoints/step-00000003" in captured.out
    model = MoMForCausalLM(resolve_model_config(load_recipe(TINY, base[2:])))
    size = flops.human(sum(p.numel() for p in model.parameters()))
    assert (f"start: {size} parameters ({size} trained), 1 rank on cpu, dtype fp32, ZeRO stage 0, backend reference, "
            "fused path off (use_fast_path=true)") in captured.out
    assert "overwrite: false" in (out / "recipe.yaml").read_text()  # the saved recipe resumes this run
    metrics = (out / "metrics.jsonl").read_text()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"] == [3]

    # the same command again: already complete, nothing trained, metrics untouched
    assert main(fresh) == 0
    captured = capsys.readouterr()
    assert (f"{out} is already complete (step 3 of train.max_steps=3): nothing to do (checkpoint "
            f"{out}/checkpoints/step-00000003); raise train.max_steps") in captured.out
    assert "validation" not in captured.out and (out / "metrics.jsonl").read_text() == metrics

    # resume: auto continues the new run (step 3), never the earlier one (step 6)
    assert main([*base, "train.max_steps=4", "train.save_every=1"]) == 0
    assert f"resumed from {out}/checkpoints/step-00000003 (step 3)" in capsys.readouterr().out
    assert steps(out) == ["step-00000003", "step-00000004"]

    # a rollback to step 3 sets the later step 4 aside: one history, so rotation keeps the new saves
    assert main([*base, "train.max_steps=5", "train.save_every=1", "--resume", str(out / "checkpoints" /
                                                                                   "step-00000003")]) == 0
    err = capsys.readouterr().err
    assert f"WARNING: step-00000004 is after step 3, which this run continues: set aside as {out}/checkpoints/" \
           "step-00000004.superseded" in err
    assert steps(out) == ["step-00000004", "step-00000004.superseded", "step-00000005"]
    assert json.loads((out / "checkpoints" / "step-00000004" / META).read_text())["step"] == 4
    assert (out / "checkpoints" / "latest").read_text() == "step-00000005"


def test_which_directories_a_start_may_use(tmp_path, monkeypatch):
    out = tmp_path / "run"
    ckpt = Checkpointer(out / "checkpoints", keep_last=2, ctx=CTX)
    assert claim_out_dir(out, ckpt, "none", None, overwrite=False) == []  # missing: fine
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    (out / "recipe.yaml").write_text("")
    assert claim_out_dir(out, ckpt, "auto", None, overwrite=False) == []  # a start that saved nothing: rerun it
    with pytest.raises(ValueError, match="already holds metrics.jsonl, recipe.yaml; starting afresh"):
        claim_out_dir(out, ckpt, "none", None, overwrite=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds metrics.jsonl, notes.txt, recipe.yaml; starting afresh"):
        claim_out_dir(out, ckpt, "auto", None, overwrite=False)
    with pytest.raises(ValueError, match=f"already holds .*; starting from {tmp_path}/other there would mix"):
        claim_out_dir(out, ckpt, str(tmp_path / "other"), tmp_path / "other" / "step-00000001", overwrite=False)
    inside = out / "checkpoints" / "step-00000001"
    with pytest.raises(ValueError, match="the checkpoint to resume from .* is inside it"):
        claim_out_dir(out, ckpt, str(inside), inside, overwrite=True)
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match="will not move .* aside, it holds the current directory"):
        claim_out_dir(out, ckpt, "none", None, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
