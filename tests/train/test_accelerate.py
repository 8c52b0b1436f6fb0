"""``accelerate launch -m mom.train`` with the shipped configs (launch/accelerate_*.yaml), and how mom reads an
accelerate config's DeepSpeed plugin: the recipe decides, a disagreeing plugin is refused in one line.

The slow tier launches two CPU processes three ways (the ``deepspeed`` launcher, accelerate without and with a
DeepSpeed plugin), all at ZeRO stage 2 in fp32: the losses must be equal step for step, each run writes one
checkpoint holding both ranks' files.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_train import FAST, TINY, corpus_for_tests

from mom.train.checkpoint import verify
from mom.train.distributed import Context, _accelerate_single_process_note, check_accelerate
from mom.train.metrics import read_jsonl
from mom.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"plain": ROOT / "launch" / "accelerate_multi_gpu.yaml",
           "deepspeed": ROOT / "launch" / "accelerate_deepspeed.yaml"}
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
CPU = Context(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), precision="fp32")


def plugin_env(**fields) -> dict[str, str]:
    """The variables ``accelerate launch`` exports for a DeepSpeed config (as accelerate 1.16 names them)."""
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no", **fields}


# ---- the plugin against the recipe ------------------------------------------------------------------------------
def test_an_agreeing_plugin_or_none_is_accepted():
    recipe = load_recipe(TINY, ["deepspeed.zero_stage=2"])
    check_accelerate(recipe, CPU, {})  # not under accelerate
    check_accelerate(recipe, CPU, {"ACCELERATE_MIXED_PRECISION": "no"})  # accelerate without plugin
    check_accelerate(recipe, CPU, plugin_env(ACCELERATE_DEEPSPEED_ZERO_STAGE="2",
                                             ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="none",
                                             ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="none",
                                             ACCELERATE_GRADIENT_ACCUMULATION_STEPS="1",
                                             ACCELERATE_GRADIENT_CLIPPING="1.0",
                                             ACCELERATE_DEEPSPEED_ZERO3_INIT="false"))  # a field mom does not use
    bf16 = Context(0, 2, 0, CPU.device, "autocast_bf16")
    check_accelerate(recipe, bf16, {"ACCELERATE_MIXED_PRECISION": "bf16"})


def test_a_disagreeing_plugin_is_refused_naming_every_field():
    recipe = load_recipe(TINY)  # zero_stage 0, grad_accum 1, grad_clip 1.0
    with pytest.raises(ValueError) as error:
        check_accelerate(recipe, CPU, plugin_env(ACCELERATE_DEEPSPEED_ZERO_STAGE="2",
                                                 ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4",
                                                 ACCELERATE_GRADIENT_CLIPPING="1.0",
                                                 ACCELERATE_MIXED_PRECISION="bf16"))
    message = str(error.value)
    assert message.startswith("accelerate config disagrees with the recipe, which decides mom's DeepSpeed engine: ")
    assert "zero_stage: 2 but the recipe's deepspeed.zero_stage: 0" in message
    assert "gradient_accumulation_steps: 4 but the recipe's train.grad_accum: 1" in message
    assert "gradient_clipping" not in message  # agrees
    assert "mixed_precision: bf16 but this run's train.dtype resolves to fp32" in message
    assert "\n" not in message


@pytest.mark.parametrize(("env", "expected"), [
    (plugin_env(ACCELERATE_DEEPSPEED_CONFIG_FILE="ds.json"), "deepspeed_config_file ds.json is not read"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "mixed_precision: fp16 (mom trains in fp32 or bf16"),
    (plugin_env(ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu"),
     "offload_optimizer_device: cpu but the recipe's deepspeed.offload_optimizer: none"),
    (plugin_env(ACCELERATE_DEEPSPEED_ZERO_STAGE="two"), "zero_stage: 'two' is not a valid value"),
])
def test_what_mom_cannot_honour_is_refused(env, expected):
    with pytest.raises(ValueError, match="accelerate config disagrees") as error:
        check_accelerate(load_recipe(TINY), CPU, env)
    assert expected in str(error.value)


def test_a_use_cpu_launch_that_started_one_process_is_named(monkeypatch):
    for var in ("ACCELERATE_USE_CPU", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert _accelerate_single_process_note() is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # accelerate's CPU launcher, --num_processes 1: nothing to say
    assert _accelerate_single_process_note() is None
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # --num_processes 2 without mpirun: one process, a world of one
    note = _accelerate_single_process_note()
    assert "started one process" in note and "launch/accelerate_multi_gpu.yaml" in note


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_configs_load_with_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS[name]))
    assert config.num_processes == 2 and not config.use_cpu  # use_cpu would start one process
    assert config.distributed_type == ("DEEPSPEED" if name == "deepspeed" else "MULTI_GPU")
    if name == "deepspeed":  # the plugin agrees with a stage-2 recipe of the same clipping
        fields = yaml.safe_load(CONFIGS[name].read_text())["deepspeed_config"]
        env = plugin_env(ACCELERATE_DEEPSPEED_ZERO_STAGE=str(fields["zero_stage"]),
                         ACCELERATE_GRADIENT_CLIPPING=str(fields["gradient_clipping"]))
        check_accelerate(load_recipe(ROOT / "recipes" / "t2i_760m_mom.yaml"), CPU, env)


# ---- real launches, two CPU processes -----------------------------------------------------------------------------
def launch(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def train_args(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), f"data.path={corpus}", f"train.out_dir={out}", *FAST, "train.max_steps=4",
            "train.log_every=1", "train.save_every=4", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    for tool in ("deepspeed", "accelerate"):
        if shutil.which(tool) is None:
            pytest.skip(f"the {tool} launcher is not installed")
    tmp = tmp_path_factory.mktemp("accelerate")
    corpus = corpus_for_tests(tmp_path_factory)
    port = str(31500 + os.getpid() % 1000)
    commands = {
        "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", port, "--module", "mom.train"],
        "plain": ["accelerate", "launch", "--config_file", str(CONFIGS["plain"]), "--num_processes", "2", "-m",
                  "mom.train"],
        "plugin": ["accelerate", "launch", "--config_file", str(CONFIGS["deepspeed"]), "--num_processes", "2", "-m",
                   "mom.train"],
    }
    out = {}
    for name, cmd in commands.items():  # stage 2 everywhere: the recipe decides, the plugin says the same
        proc = launch([*cmd, *train_args(tmp / name, corpus, "deepspeed.zero_stage=2")])
        assert proc.returncode == 0, f"{name}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = tmp / name
    return out, corpus, tmp


@pytest.mark.slow
def test_accelerate_launch_trains_like_the_deepspeed_launcher(runs):
    out, _, _ = runs
    losses = {}
    for name, run in out.items():
        records = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert records[-1]["tokens"] == 4 * 2 * 2 * 64  # steps * ranks * batch * seq_len: two ranks
        losses[name] = [r["loss"] for r in records]
        checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
        assert checkpoints == ["step-00000004"], name
        ckpt = run / "checkpoints" / "step-00000004"
        assert verify(ckpt) is None
        assert {p.name for p in ckpt.glob("rank-*.pt")} == {"rank-00000.pt", "rank-00001.pt"}
    assert losses["plain"] == losses["deepspeed"]  # fp32, same engine config, same data: bit for bit
    assert losses["plugin"] == losses["deepspeed"]
    assert losses["deepspeed"][-1] < losses["deepspeed"][0]


@pytest.mark.slow
def test_a_plugin_that_disagrees_stops_the_launch_in_one_line(runs):
    _, corpus, tmp = runs
    out = tmp / "conflict"
    cmd = ["accelerate", "launch", "--config_file", str(CONFIGS["deepspeed"]), "--num_processes", "2", "-m",
           "mom.train", *train_args(out, corpus)]  # tiny_mom.yaml: zero_stage 0, the plugin: 2
    proc = launch(cmd)
    assert proc.returncode != 0
    # one message per rank (the two ranks write at once, so their lines may interleave: count, don't split)
    message = "mom-train: error: accelerate config disagrees with the recipe"
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert proc.stderr.count("zero_stage: 2 but the recipe's deepspeed.zero_stage: 0") == 2
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
