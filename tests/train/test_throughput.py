"""The loop reads nothing from the device between sync points, and still logs the right numbers; the bf16 ZeRO-1
path skips a non-finite step on the device (fused AdamW ``found_inf``) and leaves the weights as they were.

On CPU a "device read" cannot be seen as a sync, so it is counted where it is made: every call, in the main thread,
of the tensor methods that hand a value to Python (``item``, ``tolist``, ``__bool__``, ``__float__``, ...) and of
DeepSpeed's accelerator ``synchronize`` (its throughput timer's, for one, before it was configured off); the
prefetch worker's host-side reads are not on the step's path and are not counted. The GPU configuration (bf16,
ZeRO-1, torch's fused AdamW) is run on CPU: DeepSpeed takes the same code path there.
"""

import threading

import pytest
import torch
from test_train import FAST, TINY, corpus_for_tests

from mom.train import loop
from mom.train.distributed import ClipAndSkip, Context, deepspeed_config
from mom.train.metrics import read_jsonl
from mom.train.recipe import load_recipe
from mom.train.resolve import resolve_model_config

GPU_LIKE = ["train.dtype=bf16", "deepspeed.zero_stage=1", "deepspeed.extra.optimizer.params.fused=true",
            "train.export_hf=false", "train.eval_batches=0"]
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_for_tests(tmp_path_factory)


class ReadCounter:
    """Counts main-thread calls of the tensor methods in READS, and of DeepSpeed's device-wide synchronize, while
    ``active``."""

    def __init__(self, monkeypatch):
        from deepspeed.accelerator import get_accelerator

        self.active, self.count = False, 0
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))
        accelerator = get_accelerator()  # the one instance DeepSpeed calls
        monkeypatch.setattr(accelerator, "synchronize", self._counted(accelerator.synchronize))

    def _counted(self, function):
        def counted(*args, **kwargs):
            if self.active and threading.current_thread() is threading.main_thread():
                self.count += 1
            return function(*args, **kwargs)

        return counted


def recipe(corpus, out, *overrides):
    return load_recipe(TINY, [f"data.path={corpus}", f"train.out_dir={out}", *FAST, *GPU_LIKE, *overrides])


# bf16 ZeRO-1 (DeepSpeed's gradient norm); stage 0 with fp32 weights, as one GPU runs by default (ClipAndSkip's own)
@pytest.mark.parametrize("setting", [[], ["deepspeed.zero_stage=0", "train.dtype=fp32"]], ids=["bf16-zero1", "zero0"])
def test_steps_between_sync_points_read_only_what_the_forward_reads(corpus, tmp_path, monkeypatch, setting):
    counter = ReadCounter(monkeypatch)
    # what one forward + backward of the bare model reads by itself (its input check: docs/performance.md)
    base = recipe(corpus, tmp_path / "unused", *setting)
    model = loop.MoMForCausalLM(resolve_model_config(base))
    batch = next(loop.build_loader(base.data))
    inputs = loop.host_inputs(batch, model.config.num_modalities)
    counter.active = True
    model(**inputs).loss.backward()
    counter.active = False
    per_forward = counter.count
    assert per_forward <= 1

    per_step = []
    real_step = loop.train_step

    def counted_step(*args, **kwargs):
        counter.count, counter.active = 0, True
        try:
            return real_step(*args, **kwargs)
        finally:
            counter.active = False
            per_step.append(counter.count)

    monkeypatch.setattr(loop, "train_step", counted_step)
    out = tmp_path / "run"
    result = loop.train(recipe(corpus, out, *setting, "train.max_steps=3", "train.grad_accum=2", "train.log_every=3",
                               "train.save_every=0"))
    monkeypatch.undo()  # the counters and the step wrapper: the second run goes at full speed
    assert result["step"] == 3
    assert per_step == [2 * per_forward] * 3  # two micro-batches a step, nothing else read

    # the numbers read at the log steps are the same as when every step is read (a run logging each step)
    every = tmp_path / "every"
    loop.train(recipe(corpus, every, *setting, "train.max_steps=3", "train.grad_accum=2", "train.log_every=1",
                      "train.save_every=0"))
    (record,) = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    by_one = [r for r in read_jsonl(every / "metrics.jsonl") if r["split"] == "train"]
    assert record["step"] == 3 and len(by_one) == 3
    assert record["grad_norm"] == by_one[-1]["grad_norm"] and record["tokens"] == by_one[-1]["tokens"]
    assert min(r["loss"] for r in by_one) <= record["loss"] <= max(r["loss"] for r in by_one)
    assert len({r["loss"] for r in by_one}) == 3 and record["tokens_per_s"] > 0


def test_bf16_zero1_skips_a_non_finite_step_on_the_device(corpus, tmp_path):
    out = tmp_path / "nan"
    result = loop.train(recipe(corpus, out, "train.max_steps=3", "train.log_every=3", "train.save_every=1",
                               "train.keep_last=3", "train.inject_nan_steps=[2]"))
    assert result["skipped_steps"] == 1
    engine = result["engine"]
    assert engine.basic_optimizer.param_groups[0]["fused"]

    def weights(step):
        ckpt = out / "checkpoints" / f"step-{step:08d}"
        module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        optim = torch.load(next(ckpt.glob("*optim_states.pt")), weights_only=False)["optimizer_state_dict"]
        return module, optim["single_partition_of_fp32_groups"]

    (w1, fp32_1), (w2, fp32_2), (w3, _) = weights(1), weights(2), weights(3)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped step changed no bf16 weight
    assert all(torch.equal(a, b) for a, b in zip(fp32_1, fp32_2))  # nor an fp32 master weight
    assert not all(torch.equal(w2[k], w3[k]) for k in w2)  # the next step trains again
    assert all(torch.isfinite(v.float()).all() for v in w3.values())
    record = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"][-1]
    assert record["step"] == 3 and record["skipped_steps"] == 1 and record["loss"] is not None


def test_clipping_moves_to_the_device_only_where_deepspeed_would_not_check_itself(corpus, tmp_path):
    cpu = Context(0, 1, 0, torch.device("cpu"), "bf16")
    gpu_like = deepspeed_config(recipe(corpus, tmp_path, "optim.grad_clip=0.5"), cpu)
    assert gpu_like["bf16"]["check_grad_overflow"] is False and gpu_like["gradient_clipping"] == 0.0
    unfused = recipe(corpus, tmp_path, "deepspeed.extra.optimizer.params.fused=false", "optim.grad_clip=0.5")
    config = deepspeed_config(unfused, cpu)
    assert "check_grad_overflow" not in config["bf16"] and config["gradient_clipping"] == 0.5  # DeepSpeed's, as before
    kept = deepspeed_config(recipe(corpus, tmp_path, "deepspeed.extra.bf16.check_grad_overflow=true"), cpu)
    assert kept["bf16"]["check_grad_overflow"] is True and kept["gradient_clipping"] == 1.0  # the recipe's word wins

    class Engine:
        def was_step_applied(self):
            return False

    guard = ClipAndSkip(Engine(), unfused, cpu)
    assert guard.mode is None and guard.last() is True  # DeepSpeed's own host flag


@pytest.mark.slow  # four short runs
def test_clipping_on_the_device_equals_deepspeeds(corpus, tmp_path):
    """The same 3 steps with DeepSpeed clipping (and checking) on the host, with ClipAndSkip, and with ClipAndSkip
    resuming a checkpoint DeepSpeed clipped for (which restores DeepSpeed's clip_grad): the same numbers."""
    host = "deepspeed.extra.bf16.check_grad_overflow=true"
    runs = {}
    for name, first in (("deepspeed", [host]), ("device", []), ("resumed", [host, "train.stop_after=2"])):
        out = tmp_path / name
        args = ["train.max_steps=3", "train.log_every=1", "train.save_every=0", "optim.grad_clip=0.3"]
        loop.train(recipe(corpus, out, *args, *first))  # the gradient norms are about 1: clipping is active
        if name == "resumed":
            loop.train(recipe(corpus, out, *args))
        runs[name] = [(r["loss"], r["grad_norm"]) for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "train"]
    assert runs["device"] == runs["deepspeed"] == runs["resumed"]
    assert all(norm > 0.3 for _, norm in runs["device"])
