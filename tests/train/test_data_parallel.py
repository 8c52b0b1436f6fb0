"""Data parallelism on CPU: two ranks through the real ``deepspeed`` launcher under ZeRO-0, -1, -2 and -3 against
one rank with gradient accumulation over the same global batches (`fixed_batches`), 20 steps, fp32. The two-rank
runs take the mixers' fused Function (on CPU with its pure-PyTorch conv and scan), the one-rank reference the module
path.

Each global batch is split between the ranks so that rank 1 never sees speech (an uneven modality mix: the speech
experts get gradients from rank 0 only). Every stage must finish (no hang), log the one-rank run's losses step for
step and end with its weights (speech experts included: no expert's gradient reduction is skipped), the same on
both ranks. ZeRO-3 therefore also matches ZeRO-0 loss for loss, and under ZeRO-3 the fused Function runs on the
experts' gathered weights (`mom.train.distributed.register_direct_reads`) rather than falling back to module calls.

Slow tier: one launch of two processes running four short trainings (about a minute on two busy cores).
"""

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from fixed_batches import FixedBatches, global_batches
from test_deepspeed_launch import cpu_launch_env
from test_train import FAST, TINY, corpus_for_tests, train_losses

import mom
import mom.train.loop as loop
from mom.train.recipe import load_recipe
from mom.train.resolve import resolve_model_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS = 20
STAGES = ("0", "1", "2", "3")
# fp32 on CPU; a modest learning rate keeps Adam from magnifying summation-order differences over the 20 steps; no
# weight decay, so a weight that moved got a gradient
# ZeRO-3 keeps parameters under its persistence threshold (1e5 elements by default: all of this tiny model's) whole
# on every rank; 0 partitions them all, as a real model's large ones are
PARTITION_ALL = "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"
COMMON = [*FAST, "optim.lr=1e-3", "optim.warmup_steps=0", "optim.weight_decay=0", f"train.max_steps={STEPS}",
          "train.log_every=1", "train.eval_batches=0", "train.export_hf=false", "train.save_every=0",
          PARTITION_ALL]

DRIVER = textwrap.dedent(
    """
    import os
    import sys

    import torch
    import torch.distributed as dist

    sys.path.insert(0, {tests!r})
    from fixed_batches import FixedBatches, global_batches

    import mom.ops.fused as fused
    import mom.ops.scan_ops as scan_ops
    import mom.train.loop as loop
    from mom.train.recipe import load_recipe
    from mom.train.resolve import resolve_model_config

    # the mixers' fused Function on CPU (with the pure-PyTorch conv and scan, as the CPU tests run it), counted: it
    # reads the experts' weights without calling their modules, which ZeRO-3 must have gathered
    calls = [0]
    fused_mixer = fused.fused_mixer
    def counted(*args, **kwargs):
        calls[0] += 1
        return fused_mixer(*args, **kwargs)
    fused.fused_mixer, scan_ops.runs_on, scan_ops.cuda_ops = counted, lambda t: True, lambda: scan_ops.REFERENCE_OPS

    out, stages, recipe_path, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    first = load_recipe(recipe_path, overrides)
    config = resolve_model_config(first)
    batches = global_batches(list(config.vocab_offsets), list(config.vocab_sizes), {steps}, first.data.seq_len)
    loop.build_loader = lambda cfg, rank, world: FixedBatches(batches, rank, world, cfg.batch_size,
                                                              first.train.grad_accum)
    for stage in stages.split(","):
        calls[0] = 0
        run = [f"deepspeed.zero_stage={{stage}}", f"train.out_dir={{out}}/z{{stage}}"]
        recipe = load_recipe(recipe_path, [*overrides, *run])
        engine = loop.train(recipe)["engine"]
        params = dict(engine.module.named_parameters())
        if stage == "3":  # partitioned: gather every parameter to read it whole
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(params.values())):
                weights = {{k: p.detach().clone() for k, p in params.items()}}
        else:
            weights = {{k: p.detach().clone() for k, p in params.items()}}
        names = {{id(p): n for n, p in engine.module.named_parameters()}}
        external = {{name: sorted(names[id(p)] for _, p in m.ds_external_parameters())
                    for name, m in engine.module.named_modules()
                    if hasattr(m, "ds_external_parameters") and list(m.ds_external_parameters())}}  # ZeRO-3's
        torch.save({{"weights": weights, "fused_calls": calls[0], "external": external}},
                   f"{{out}}/z{{stage}}_rank{{dist.get_rank()}}.pt")
    # every rank's results are written; leave without the interpreter's teardown, where a rank that had trained four
    # engines in turn now and then aborted ("terminate called without an active exception", exit code -6)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not installed")
    tmp = tmp_path_factory.mktemp("data_parallel")
    corpus = corpus_for_tests(tmp_path_factory)
    overrides = [f"data.path={corpus}", *COMMON]

    # the reference: one rank, two micro-batches per step, in this process
    recipe = load_recipe(TINY, [*overrides, "train.grad_accum=2", f"train.out_dir={tmp / 'one_rank'}"])
    config = resolve_model_config(recipe)
    batches = global_batches(list(config.vocab_offsets), list(config.vocab_sizes), STEPS, recipe.data.seq_len)
    torch.manual_seed(recipe.train.seed)  # as train() does before building the model
    initial = {k: p.detach().clone() for k, p in mom.MoMForCausalLM(config).named_parameters()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "build_loader", lambda cfg, rank, world: FixedBatches(batches, rank, world, cfg.batch_size, 2))
        engine = loop.train(recipe)["engine"]
    reference = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
    mixers = {name: len(m.directly_read_parameters()) for name, m in engine.module.named_modules()
              if hasattr(m, "directly_read_parameters")}
    speech = [k for k in reference if ".speech." in k]
    assert speech and all(not torch.equal(reference[k], initial[k]) for k in speech)  # they got gradients

    (tmp / "driver.py").write_text(DRIVER.format(tests=str(Path(__file__).parent), steps=STEPS))
    env = cpu_launch_env()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(31500 + os.getpid() % 1000), str(tmp / "driver.py"),
           str(tmp), ",".join(STAGES), str(TINY), *overrides, "train.grad_accum=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, reference, config.n_layer, mixers


def test_the_global_batches_split_unevenly():
    batches = global_batches([0, 48, 80], [48, 32, 16], 3, 64)
    for b in batches:
        assert (b["modality_ids"][:2] == 2).any() and not (b["modality_ids"][2:] == 2).any()
    one = FixedBatches(batches, 0, 1, 2, 2)
    two = [FixedBatches(batches, r, 2, 2, 1) for r in (0, 1)]
    for _ in range(3):  # one rank's two micro-batches are the two ranks' batches
        for r in (0, 1):
            assert torch.equal(next(one)["input_ids"], next(two[r])["input_ids"])


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_equal_one_rank_with_accumulation(runs, stage):
    tmp, reference, n_layer, mixers = runs
    expected, got = train_losses(tmp / "one_rank"), train_losses(tmp / f"z{stage}")  # (step, loss, grad norm)
    assert [r[0] for r in got] == list(range(1, STEPS + 1)) == [r[0] for r in expected]
    assert [r[1] for r in got] == pytest.approx([r[1] for r in expected], rel=1e-5)  # losses
    # the global gradient norm: a speech gradient not averaged with rank 1's zeros would change it (Adam's update
    # hardly would: it is nearly scale-free)
    assert [r[2] for r in got] == pytest.approx([r[2] for r in expected], rel=1e-4)
    saved = [torch.load(tmp / f"z{stage}_rank{r}.pt") for r in (0, 1)]
    # every mixer forward took the fused Function on both ranks (ZeRO-3: its gathered experts were present)
    assert [s["fused_calls"] for s in saved] == [STEPS * n_layer] * 2
    # ZeRO-3 gathers each mixer's experts and conv with the mixer, and none of them for a larger module (an expert
    # read ahead of its mixer's forward would be registered with the model: `mom.model.mixer.quiet_parameter`)
    for external in (s["external"] for s in saved):
        if stage != "3":
            assert external == {}
            continue
        for name, count in mixers.items():
            assert len(external[name]) == count and all(p.startswith(f"{name}.") for p in external[name])
        assert not any(".mixer." in p for module, params in external.items() if module not in mixers for p in params)
    ranks = [s["weights"] for s in saved]
    assert ranks[0].keys() == reference.keys()
    for name, want in reference.items():
        for weights in ranks:
            torch.testing.assert_close(weights[name], want, rtol=1e-4, atol=1e-6, msg=name)
