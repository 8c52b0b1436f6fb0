"""Ctrl-C (SIGINT) and SLURM's SIGTERM during `mom-train` (a subprocess): the step in progress finishes, a checkpoint
is saved, one line says where and how to resume, the exit code is 128 + the signal; the checkpoint resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import FAST, TINY, corpus_for_tests

from mom.train.checkpoint import read_meta, verify
from mom.train.loop import train
from mom.train.metrics import read_jsonl
from mom.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_for_tests(tmp_path_factory)


def wait_for_steps(proc: subprocess.Popen, metrics: Path, n: int, timeout: float = 300) -> None:
    """Until ``metrics`` has ``n`` train records (the process is inside the loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.is_file() and sum(r["split"] == "train" for r in read_jsonl(metrics)) >= n:
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {n} training steps within {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_checkpoints_and_rerun_resumes(corpus, tmp_path, signum):
    out = tmp_path / "run"
    overrides = [f"data.path={corpus}", f"train.out_dir={out}", *FAST, "train.max_steps=100000", "train.log_every=1",
                 "train.eval_batches=0", "train.export_hf=false"]
    # a world of its own: not the variables an earlier in-process run of this session set (its port is taken)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "mom.train", "--config", str(TINY), *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(proc, out / "metrics.jsonl", 2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    (line,) = [x for x in stderr.splitlines() if x.startswith("mom-train:")]
    step = int(line.split(" at step ")[1].split(":")[0])
    checkpoint = out / "checkpoints" / f"step-{step:08d}"
    assert line == f"mom-train: interrupted ({name}) at step {step}: checkpoint {checkpoint}; run the same command " \
                   "to resume"
    assert f"{name}: stopping after this step to save a checkpoint" in stderr
    assert verify(checkpoint) is None and read_meta(checkpoint)["step"] == step
    assert (out / "checkpoints" / "latest").read_text() == checkpoint.name

    result = train(load_recipe(TINY, [*overrides, f"train.stop_after={step + 1}"]))  # the same recipe, resumed
    assert result["step"] == step + 1 and result["checkpoint"] == str(out / "checkpoints" / f"step-{step + 1:08d}")
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"] == list(range(1, step + 2))
