"""launch/*: every launcher says what it runs and why it cannot; --dry-run prints the command and each rank's
environment and starts nothing (CPU, through bash)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/tiny_mom.yaml"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def launch(script: str, *args: str, path: str = "/usr/bin:/bin", **env: str) -> subprocess.CompletedProcess:
    """Run launch/<script> from the repository root with a bare environment (no GPU tools, no deepspeed)."""
    return subprocess.run([BASH, f"launch/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env})


def ranks(stdout: str) -> list[dict[str, str]]:
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in stdout.splitlines() if line.startswith("rank ")]


def one_error(result: subprocess.CompletedProcess, prog: str, *needles: str) -> None:
    assert result.returncode == 2, result
    error = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(error) == 1 and error[0].startswith(f"{prog}: error: "), result.stderr
    for needle in needles:
        assert needle in error[0], error[0]


def test_single_node_without_gpus_says_why():
    """Issue 18.7: was a silent exit 127 (nvidia-smi missing under pipefail)."""
    one_error(launch("single_node.sh", RECIPE), "single_node.sh", "nvidia-smi not found", "NUM_GPUS=N",
              f"mom-train --config {RECIPE}")
    one_error(launch("single_node.sh", RECIPE, NUM_GPUS="0"), "single_node.sh", "no GPU found")
    one_error(launch("single_node.sh", "recipes/nope.yaml", NUM_GPUS="1"), "single_node.sh", "recipes/nope.yaml")


def test_single_node_without_deepspeed_says_what_it_was_about_to_run():
    result = launch("single_node.sh", RECIPE, "train.max_steps=5", NUM_GPUS="2")
    one_error(result, "single_node.sh", "deepspeed not found")
    assert f"deepspeed --num_gpus 2 --master_port 29500 --module mom.train --config {RECIPE} train.max_steps=5" in (
        result.stderr
    )


def test_single_node_dry_run():
    result = launch("single_node.sh", "--dry-run", RECIPE, "train.max_steps=5", NUM_GPUS="2", MASTER_PORT="29600")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["deepspeed", "--num_gpus", "2", "--master_port", "29600", "--module", "mom.train",
                                "--config", RECIPE, "train.max_steps=5"]
    assert ranks(result.stdout) == [
        {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29600"}
        for r in (0, 1)
    ]


def test_multi_node_dry_run_numbers_ranks_across_hosts(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two machines\nnode-a slots=2\n\nnode-b slots=3\n")
    result = launch("multi_node.sh", "--dry-run", str(hostfile), RECIPE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:7] == ["deepspeed", "--hostfile", str(hostfile), "--master_addr",
                                                         "node-a", "--master_port", "29500"]
    got = ranks(result.stdout)
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for r in got] == [
        ("0", "0", "5"), ("1", "1", "5"), ("2", "0", "5"), ("3", "1", "5"), ("4", "2", "5")]
    assert all(r["MASTER_ADDR"] == "node-a" for r in got)
    one_node = launch("multi_node.sh", "--dry-run", str(hostfile), RECIPE, NODE_RANK="1")
    assert "--no_ssh --node_rank 1" in one_node.stdout.splitlines()[0]
    assert [r["RANK"] for r in ranks(one_node.stdout)] == ["2", "3", "4"]  # this host's ranks only


def test_multi_node_errors(tmp_path):
    one_error(launch("multi_node.sh", str(tmp_path / "none"), RECIPE), "multi_node.sh", "hostfile", "not found")
    bad = tmp_path / "bad"
    bad.write_text("node-a gpus=2\n")
    one_error(launch("multi_node.sh", str(bad), RECIPE), "multi_node.sh", "expected '<host> slots=<GPUs>'")
    good = tmp_path / "good"
    good.write_text("node-a slots=1\nnode-b slots=1\n")
    one_error(launch("multi_node.sh", str(good), RECIPE, NODE_RANK="2"), "multi_node.sh", "NODE_RANK=2")
    one_error(launch("multi_node.sh", str(good), RECIPE), "multi_node.sh", "deepspeed not found")


def test_slurm_dry_run_and_errors(tmp_path):
    one_error(launch("slurm.sbatch", "--dry-run", RECIPE), "slurm.sbatch", "not inside a SLURM job", "sbatch")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # stands in for SLURM's: expands "gpu[1-2]"
    scontrol.write_text("#!/bin/sh\nprintf 'gpu1\\ngpu2\\n'\n")
    scontrol.chmod(0o755)
    env = {"path": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_JOB_ID": "7",
           "GPUS_PER_NODE": "2"}
    result = launch("slurm.sbatch", "--dry-run", RECIPE, **env)
    assert result.returncode == 0, result.stderr
    assert "gpu1 slots=2\ngpu2 slots=2" in result.stdout and "hostfile hostfile-7" in result.stdout
    assert [(r["RANK"], r["LOCAL_RANK"]) for r in ranks(result.stdout)] == [("0", "0"), ("1", "1"), ("2", "0"),
                                                                            ("3", "1")]
    assert "--no_ssh --node_rank $SLURM_NODEID --master_addr gpu1" in result.stderr
    assert not (ROOT / "hostfile-7").exists()  # a dry run writes nothing
    one_error(launch("slurm.sbatch", RECIPE, **env), "slurm.sbatch", "deepspeed not found")


# ---- launch/study.sh: the study's named runs -------------------------------------------------------------------
def test_study_names_map_to_recipes_seeds_and_the_ablation():
    result = launch("study.sh", "--dry-run", "--set", "train.max_steps=5", "tis_40m_mom", "tis_40m_dense_s2",
                    "tis_40m_inproj", "t2i_150m_inout_s1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "mom-train --config recipes/study/tis_40m_mom.yaml train.max_steps=5 train.out_dir=runs/study/tis_40m_mom "
        "--resume auto",
        "mom-train --config recipes/study/tis_40m_dense.yaml train.seed=2 data.seed=2 train.max_steps=5 "
        "train.out_dir=runs/study/tis_40m_dense_s2 --resume auto",
        "mom-train --config recipes/study/tis_40m_mom.yaml model.decouple=[in_proj] train.max_steps=5 "
        "train.out_dir=runs/study/tis_40m_inproj --resume auto",
        "mom-train --config recipes/study/t2i_150m_mom.yaml model.decouple=[in_proj,out_proj] train.seed=1 "
        "data.seed=1 train.max_steps=5 train.out_dir=runs/study/t2i_150m_inout_s1 --resume auto",
    ]


@pytest.mark.parametrize(("args", "needles"), [
    ((), ("no RUN given",)),
    (("tis_40m_moe",), ("run tis_40m_moe", "variant 'moe'")),
    (("tis_80m_mom",), ("size '80m'",)),
    (("tis_40m_mom_seed1",), ("'seed1' is not sSEED",)),
    (("tis_40m_mom", "tis_40m_mom"), ("named twice",)),
    (("--parallel", "0", "tis_40m_mom"), ("--parallel",)),
    (("--set", "oops", "tis_40m_mom"), ("--set needs key=value",)),
])
def test_study_bad_arguments_are_one_line_errors(args, needles):
    one_error(launch("study.sh", *args), "study.sh", *needles)


def test_study_runs_resumes_and_copies_metrics(tmp_path):
    """One tiny run through the script (its recipe shrunk with --set), its metrics copied to OUT; the same command
    again resumes the finished run instead of training it afresh."""
    tiny = ["--set", f"data.path={ROOT / 'data/small'}", "--set", "model.vocab_sizes=[2048,512,256]",
            "--set", "model.d_model=16", "--set", "model.n_layer=1", "--set", "data.seq_len=32",
            "--set", "data.batch_size=2", "--set", "train.max_steps=2", "--set", "train.eval_every=2",
            "--set", "train.eval_batches=1", "--set", "train.progress=false", "--set", "train.tensorboard=false"]
    work = tmp_path / "work"
    shutil.copytree(ROOT / "launch", work / "launch")
    shutil.copytree(ROOT / "recipes/study", work / "recipes/study")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "OUT": str(tmp_path / "out")}
    for _ in range(2):
        result = subprocess.run([BASH, "launch/study.sh", *tiny, "tis_40m_dense"], cwd=work, capture_output=True,
                                text=True, timeout=120, env=env)
        assert result.returncode == 0 and "tis_40m_dense exit 0" in result.stdout, result
    metrics = (tmp_path / "out/study/tis_40m_dense/metrics.jsonl").read_text()
    assert '"split": "validation"' in metrics and (tmp_path / "out/study/tis_40m_dense/recipe.yaml").is_file()
    log = (work / "runs/study/tis_40m_dense.log").read_text()
    assert log.count("resumed from") == 1  # the second command picked up the finished run


def test_study_starts_a_run_again_after_it_ran_out_of_gpu_memory(tmp_path):
    """A run that hit CUDA's out-of-memory error (other runs held the card) is started again after --oom-wait, from
    its checkpoint; a run failing otherwise is not. A stand-in mom-train on PATH: out of memory on its first start."""
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    shutil.copytree(ROOT / "launch", work / "launch")
    shutil.copytree(ROOT / "recipes/study", work / "recipes/study")
    bin_dir.mkdir()
    fake = bin_dir / "mom-train"
    fake.write_text("""#!/usr/bin/env bash
out=${@: -3:1}; out=${out#train.out_dir=}; mkdir -p "$out"
case "$out" in
  *dense*) echo "ValueError: something else"; exit 2 ;;
esac
if [[ ! -e "$out/started" ]]; then
  touch "$out/started"; echo "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 160.00 MiB"; exit 1
fi
echo "trained"
""")
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run([BASH, "launch/study.sh", "--parallel", "2", "--oom-wait", "0", "tis_40m_mom",
                             "tis_40m_dense"], cwd=work, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result
    assert "tis_40m_mom ran out of GPU memory (try 1 of 20); starting it again in 0 s" in result.stdout
    assert "tis_40m_mom exit 0" in result.stdout and "(trained)" in result.stdout
    assert "tis_40m_dense exit 2" in result.stdout and "tis_40m_dense ran out" not in result.stdout
    log = (work / "runs/study/tis_40m_mom.log").read_text()
    assert log.count("CUDA out of memory") == 1 and log.rstrip().endswith("trained")


def test_study_oom_wait_must_be_seconds():
    one_error(launch("study.sh", "--oom-wait", "soon", "tis_40m_mom"), "study.sh", "--oom-wait must be a whole number")
