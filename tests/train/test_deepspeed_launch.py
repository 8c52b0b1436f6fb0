"""Two CPU processes through the real ``deepspeed`` launcher: ZeRO-2 (via the CLI) and ZeRO-3 (via train()).

Both runs inject one NaN step. Checked afterwards: loss decreases, the NaN step was skipped, the checkpoints hold
every rank's shard, and the Hugging Face export loads with AutoModelForCausalLM and reproduces the trained model
(ZeRO-2: the weights consolidated from the DeepSpeed checkpoint; ZeRO-3: the live engine's logits). And a Ctrl-C to
the launcher's process group: both ranks stop after the same step and save one checkpoint together.

Slow tier (``-m slow``): each launch takes about a minute on two busy CPU cores.
"""

import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_interrupt import wait_for_steps
from test_train import FAST, TINY, corpus_for_tests
from transformers import AutoModelForCausalLM

import mom  # noqa: F401  (registers MoM with the Auto classes)
from mom.train.checkpoint import read_meta, verify
from mom.train.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # not those of an in-process run



def cpu_launch_env() -> dict[str, str]:
    """The environment of a test's CPU ``deepspeed`` launch: without this process's rank variables and GPUs, one
    thread per rank, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_ENV, "CUDA_VISIBLE_DEVICES")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from mom.train.recipe import load_recipe
    from mom.cli.train import main
    from mom.train.loop import train

    out, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it
    main(["--config", overrides[0], *overrides[1:], "deepspeed.zero_stage=2", f"train.out_dir={out}/z2"])
    result = train(load_recipe(overrides[0], [*overrides[1:], "deepspeed.zero_stage=3", f"train.out_dir={out}/z3"]))
    engine = result["engine"]
    ids = torch.randint(0, engine.module.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=ids).logits  # every rank runs it: ZeRO-3 gathers the weights collectively
    if dist.get_rank() == 0:
        torch.save({"input_ids": ids, "logits": logits}, f"{out}/z3_logits.pt")
    """
)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not installed")
    tmp = tmp_path_factory.mktemp("launch")
    corpus = corpus_for_tests(tmp_path_factory)
    (tmp / "driver.py").write_text(DRIVER)
    overrides = [str(TINY), f"data.path={corpus}", *FAST, "train.max_steps=8", "train.log_every=1",
                 "train.save_every=4", "train.inject_nan_steps=[3]"]
    env = cpu_launch_env()
    port = str(29500 + os.getpid() % 1000)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", port, str(tmp / "driver.py"), str(tmp), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc.stdout + proc.stderr


@pytest.mark.parametrize("stage", ["z2", "z3"])
def test_two_ranks_train_skip_nan_and_checkpoint(launched, stage):
    tmp, log = launched
    run = tmp / stage
    records = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[2]["loss"] is None and records[2]["skipped_steps"] == 1  # step 3: NaN injected, skipped
    assert records[-1]["skipped_steps"] == 1 and math.isfinite(records[-1]["loss"])
    assert records[-1]["loss"] < records[0]["loss"] - 0.1
    validation = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "validation"]
    assert validation[-1]["loss"] < records[0]["loss"]
    assert records[-1]["tokens"] == 8 * 2 * 2 * 64  # steps * ranks * batch * seq_len
    assert "step 3: non-finite loss or gradient, update skipped" in log
    ckpt = run / "checkpoints" / "step-00000008"
    assert (run / "checkpoints" / "latest").read_text() == ckpt.name
    assert {p.name for p in ckpt.glob("rank-*.pt")} == {"rank-00000.pt", "rank-00001.pt"}
    assert len(list(ckpt.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one optimizer shard per rank


def test_zero2_export_equals_the_consolidated_checkpoint(launched):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = launched[0] / "z2"
    exported = AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    state = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step-00000008")
    trained = type(exported)(exported.config).eval()
    missing, unexpected = trained.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the tied lm_head is stored once
    ids = torch.randint(0, exported.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=1e-6)


def test_zero3_export_reproduces_the_engine_logits(launched):
    saved = torch.load(launched[0] / "z3_logits.pt")
    exported = AutoModelForCausalLM.from_pretrained(launched[0] / "z3" / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(saved["input_ids"]).logits, saved["logits"], rtol=0, atol=1e-6)


def test_ctrl_c_to_the_launcher_checkpoints_every_rank_once(corpus_dir, tmp_path):
    """As a terminal's Ctrl-C: SIGINT to the whole process group (launcher and ranks; the launcher also sends
    SIGTERM to the ranks)."""
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not installed")
    out = tmp_path / "run"
    env = cpu_launch_env()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(30500 + os.getpid() % 1000), "--module", "mom.train",
           "--config", str(TINY), f"data.path={corpus_dir}", f"train.out_dir={out}", *FAST, "train.max_steps=100000",
           "train.log_every=1", "train.eval_batches=0", "train.export_hf=false", "deepspeed.zero_stage=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for_steps(proc, out / "metrics.jsonl", 2)
    os.killpg(proc.pid, signal.SIGINT)
    log, _ = proc.communicate(timeout=180)  # returns once every rank closed its output
    lines = [x for x in log.splitlines() if "mom-train: interrupted (SIGINT) at step" in x]
    assert len(lines) == 1, log[-3000:]  # rank 0 reports
    step = int(lines[0].split(" at step ")[1].split(":")[0])
    checkpoint = out / "checkpoints" / f"step-{step:08d}"
    assert verify(checkpoint) is None and read_meta(checkpoint)["step"] == step
    assert {p.name for p in checkpoint.glob("rank-*.pt")} == {"rank-00000.pt", "rank-00001.pt"}
    assert len(list(checkpoint.glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert "mom/train" not in log  # no traceback through the trainer (the launcher prints its own KeyboardInterrupt)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return corpus_for_tests(tmp_path_factory)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
