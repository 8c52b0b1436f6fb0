"""On one GPU through the ``deepspeed`` launcher: under ZeRO-3 (every parameter partitioned) the mixers take the
fused fast path on the experts' gathered weights, and train as under ZeRO-0 (GPU tier)."""

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from test_data_parallel import PARTITION_ALL
from test_deepspeed_launch import LAUNCH_ENV
from test_train import FAST, TINY, corpus_for_tests

from mom.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.gpu
STEPS = 6

DRIVER = textwrap.dedent(
    """
    import sys

    import torch

    import mom.ops.fused as fused
    from mom.cli.train import main

    calls = [0]
    fused_mixer = fused.fused_mixer
    def counted(*args, **kwargs):
        calls[0] += 1
        return fused_mixer(*args, **kwargs)
    fused.fused_mixer = counted

    out, stage, *args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main([*args, f"deepspeed.zero_stage={stage}", f"train.out_dir={out}/z{stage}"])
    torch.save(calls[0], f"{out}/z{stage}_fused_calls.pt")
    """
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stage", ["0", "3"])
def test_zero3_takes_the_fast_path(tmp_path_factory, stage):
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not installed")
    tmp = tmp_path_factory.getbasetemp() / "zero3_fast_path"
    tmp.mkdir(exist_ok=True)
    (tmp / "driver.py").write_text(DRIVER)
    corpus = corpus_for_tests(tmp_path_factory)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PYTHONPATH=str(ROOT))
    cmd = ["deepspeed", "--num_gpus", "1", "--master_port", str(33500 + int(stage)), str(tmp / "driver.py"),
           str(tmp), stage, "--config", str(TINY), f"data.path={corpus}", *FAST, f"train.max_steps={STEPS}",
           "train.log_every=1", "train.eval_batches=0", "train.export_hf=false", "optim.lr=1e-3", PARTITION_ALL,
           "train.dtype=bf16"]  # both stages in bf16 (auto would give stage 0 autocast_bf16): comparable losses
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert torch.load(tmp / f"z{stage}_fused_calls.pt") == STEPS * 1  # FAST: one layer, one forward per step
    assert read_jsonl(tmp / f"z{stage}" / "metrics.jsonl")[-1]["peak_gib"] > 0
    if stage == "3":  # the same losses as ZeRO-0 (bf16)
        losses = [[r["loss"] for r in read_jsonl(tmp / f"z{s}" / "metrics.jsonl") if r["split"] == "train"]
                  for s in ("0", "3")]
        assert losses[1] == pytest.approx(losses[0], rel=2e-2)
