"""Process group, device / precision choice and the DeepSpeed engine, built from a recipe.

DeepSpeed stays here: model code never imports it. One ``setup()`` covers every way of starting:

* one process, no launcher (``mom-train --config ...``): a world of size 1 is made up (gloo on CPU);
* ``deepspeed`` / ``torchrun`` launchers: they set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...;
* ``accelerate launch --config_file launch/accelerate_*.yaml -m mom.train``: accelerate starts the processes through
  torchrun (a ``MULTI_GPU`` or ``DEEPSPEED`` config), which sets the same variables, plus ``ACCELERATE_*`` ones. The
  engine stays mom's own and the recipe decides the DeepSpeed config: an accelerate ``deepspeed_config`` (plugin)
  that disagrees with the recipe is refused (`check_accelerate`), one that agrees changes nothing. A ``use_cpu:
  true`` config starts a single process (accelerate's CPU launcher needs mpirun for more): a world of one, warned;
* ``srun python -m mom.train`` under SLURM: ranks are taken from ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
  ``SLURM_LOCALID`` (``MASTER_ADDR`` / ``MASTER_PORT`` must be exported, see launch/slurm.sbatch).

Precision (``train.dtype``): fp32 on CPU; on GPU "bf16", DeepSpeed's bf16 mode, which runs forward/backward with bf16
weights and keeps an fp32 master copy of EVERY parameter (``A_log``, ``D`` and the Δ bias included) that the optimizer
updates; or "autocast_bf16": fp32 weights throughout, matmuls in bf16 under ``torch.autocast`` (mamba-ssm's own
recipe), so ``A_log``, ``D`` and the Δ bias are never rounded to bf16. "auto" picks autocast_bf16 at ZeRO stage 0
and bf16 above (`mom.train.resolve.precision`); docs/training.md compares them.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from mom.train import resolve
from mom.train.recipe import DeepSpeedConfig, Recipe, TrainConfig
from mom.utils.devices import pick_device

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Where this process runs: ``rank`` of ``world_size`` (``local_rank`` on its node), device and precision.

    ``precision``: "fp32"; "bf16" (DeepSpeed bf16: bf16 weights in forward/backward, fp32 master weights in the
    optimizer); "autocast_bf16" (fp32 weights, matmuls in bf16 under ``torch.autocast``).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    precision: str = "fp32"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the matmuls (what peak FLOP/s and MFU refer to)."""
        return torch.float32 if self.precision == "fp32" else torch.bfloat16


def setup(train: TrainConfig, deepspeed_cfg: DeepSpeedConfig) -> Context:
    """Initialise the process group (idempotent); device and precision from ``train.device`` / ``train.dtype``
    (``auto``: `mom.train.resolve.precision`, which depends on the ZeRO stage this world runs)."""
    _fill_env_from_slurm()
    if "RANK" not in os.environ:  # one process, no launcher: a world of one (nobody joins it: any free port)
        if (note := _accelerate_single_process_note()) is not None:
            print(f"WARNING: {note}", file=sys.stderr, flush=True)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")

    on_gpu = pick_device(train.device, "train.device").type == "cuda"
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is first imported
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        _share_cpu_threads()

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines (config dumps...) drown the progress bar
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not on_gpu:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (minutes with a cold
        # cache); gloo is all the CPU path (tests, debugging) needs.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=None if on_gpu else "gloo", verbose=False)
        atexit.register(teardown)
    world_size = torch.distributed.get_world_size()
    precision = resolve.precision(train.dtype, on_gpu, resolve.zero_stage(deepspeed_cfg.zero_stage, world_size))
    return Context(torch.distributed.get_rank(), world_size, local_rank, device, precision)


def deepspeed_config(recipe: Recipe, ctx: Context) -> dict[str, Any]:
    """DeepSpeed's JSON config for ``recipe`` (``deepspeed.extra`` merged in last); where `clip_mode` allows it,
    clipping and the overflow check are left to `ClipAndSkip`."""
    config = requested_config(recipe, ctx)
    mode = clip_mode(config)
    if mode is not None:
        config["gradient_clipping"] = 0.0
    if mode == "deepspeed_norm":
        # DeepSpeed's bf16 overflow check reads every gradient (a few kernels each) and then the device, and its
        # clipping reads the norm on the host: both move to the device (`ClipAndSkip`)
        config["bf16"]["check_grad_overflow"] = False
    return config


def requested_config(recipe: Recipe, ctx: Context) -> dict[str, Any]:
    """What the recipe asks of DeepSpeed (``deepspeed.extra`` merged in last), before `deepspeed_config` leaves
    clipping and the overflow check to `ClipAndSkip`."""
    ds, optim = recipe.deepspeed, recipe.optim
    adamw: dict[str, Any] = {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                             "weight_decay": optim.weight_decay}
    if ds.offload_optimizer == "none":  # torch's fused AdamW (CPU and GPU); with offload DeepSpeed picks its CPU Adam
        adamw.update(torch_adam=True, fused=True)
    stage = resolve.zero_stage(ds.zero_stage, ctx.world_size)
    zero: dict[str, Any] = {"stage": stage}
    for key, target in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_param)):
        if target != "none":
            zero[key] = {"device": target, "pin_memory": True}
            if target == "nvme":
                zero[key]["nvme_path"] = ds.nvme_path
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # lets save_16bit_model() gather full weights
    config = {
        "train_micro_batch_size_per_gpu": recipe.data.batch_size,
        "gradient_accumulation_steps": recipe.train.grad_accum,
        "train_batch_size": recipe.data.batch_size * recipe.train.grad_accum * ctx.world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": adamw},
        "zero_optimization": zero,
        "bf16": {"enabled": ctx.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # mom.train.metrics logs; keep DeepSpeed's own step printing off
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) synchronizes the device at every forward and step
        "timers": {"throughput": {"enabled": False}},
    }
    if ctx.precision == "autocast_bf16":  # fp32 weights; nn.Linear / Conv1d run in bf16 (DeepSpeed's default list)
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return merge(config, ds.extra)


def clip_mode(config: dict[str, Any]) -> str | None:
    """Who clips and skips non-finite steps for ``config`` (`requested_config`), with torch's AdamW as the optimizer:

    * "deepspeed_norm": bf16 ZeRO-1/2 without optimizer offload, fused AdamW, DeepSpeed computing the gradient
      norm and no ``bf16.check_grad_overflow: true`` in ``deepspeed.extra``: `ClipAndSkip`, from DeepSpeed's norm;
    * "own_norm": stage 0 with fp32 weights (``train.dtype`` fp32 or autocast_bf16): DeepSpeed hands the step to
      torch's AdamW as it is, which neither clips on the device nor skips a non-finite step: `ClipAndSkip`, from the
      norm it computes itself;
    * None: DeepSpeed's optimizer wrapper does both (bf16 stage 0, ZeRO-3, offload, an unfused or other optimizer).
    """
    zero, optimizer = config.get("zero_optimization", {}), config.get("optimizer", {})
    params, bf16 = optimizer.get("params", {}), config.get("bf16", {})
    if optimizer.get("type") != "AdamW" or not params.get("torch_adam"):
        return None
    if zero.get("stage", 0) == 0 and not bf16.get("enabled", False):
        return "own_norm"
    if (bf16.get("enabled", False) and bf16.get("check_grad_overflow") is not True and zero.get("stage") in (1, 2)
            and zero.get("offload_optimizer", {}).get("device", "none") == "none"
            and zero.get("compute_grad_norm", True) and params.get("fused")):
        return "deepspeed_norm"
    return None


class ClipAndSkip:
    """Gradient clipping and the skip of a non-finite step, on the device where `clip_mode` allows it.

    There, before each step of torch's AdamW (under ZeRO-1/2 one per parameter group), the gradients are scaled
    down to norm ``optim.grad_clip`` (DeepSpeed's formula, torch's ``clip_grad_norm_``'s too) and the optimizer's
    ``found_inf`` input is set, both from the global gradient norm of this step (+inf when any gradient is not
    finite): DeepSpeed's, just computed by its ZeRO step ("deepspeed_norm"; all-reduced, the same on every rank), or
    computed here over the optimizer's gradients, which DeepSpeed has all-reduced in the backward ("own_norm").
    With ``found_inf`` fused AdamW leaves parameters, moments and step count as they were (under bf16 the weights
    are then recopied unchanged from them). No host sync: ``last()`` (was the last step skipped) and ``norm()`` are
    device tensors, read when the trainer logs. An unfused AdamW under "own_norm" has no ``found_inf``: there the
    flag is read on the host and the step's gradients dropped. Elsewhere DeepSpeed clips and skips on the host:
    ``last()`` is ``not engine.was_step_applied()``, ``norm()`` DeepSpeed's. Build it after loading a checkpoint.
    """

    def __init__(self, engine: Any, recipe: Recipe, ctx: Context) -> None:
        config = requested_config(recipe, ctx)
        self.engine = engine
        self.mode = clip_mode(config)
        self.clip = recipe.optim.grad_clip
        self.fused = bool(config["optimizer"]["params"].get("fused"))
        self._norm: Any = None  # this step's gradient norm (a 0-dim device tensor)
        self._scale: torch.Tensor | None = None
        self._flag: torch.Tensor | None = None
        if self.mode == "deepspeed_norm":
            engine.optimizer.clip_grad = 0.0  # a checkpoint saved while DeepSpeed clipped restores its clip_grad
        if self.mode is not None:
            engine.basic_optimizer.register_step_pre_hook(self._before_optimizer_step)

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.mode == "own_norm":
            self._set_norm(torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(()))
        elif self.engine.optimizer._global_grad_norm is not self._norm:  # the ZeRO step's first parameter group
            self._set_norm(self.engine.optimizer._global_grad_norm)  # set by DeepSpeed before the optimizer runs
        if self.clip > 0 and grads:
            torch._foreach_mul_(grads, self._scale)
        if self.fused:
            optimizer.found_inf = self._flag
        elif bool(self._flag):  # unfused "own_norm": no found_inf, so the step is emptied
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def _set_norm(self, norm: torch.Tensor) -> None:
        self._norm = norm
        self._flag = (~torch.isfinite(norm)).float().reshape(())  # (), 1.0: skip
        # as DeepSpeed's unscale_and_clip_grads: divide by max(1, (norm + 1e-6) / clip)
        self._scale = 1.0 / torch.clamp((norm.float() + 1e-6) / self.clip, min=1.0) if self.clip > 0 else None

    def last(self) -> torch.Tensor | bool:
        """Whether the last step was skipped (non-finite gradients)."""
        if self.mode is not None:
            return self._flag if self._flag is not None else False
        return not self.engine.was_step_applied()

    def norm(self) -> Any:
        """The last step's gradient norm before clipping (a device tensor, a float, or None before any step)."""
        return self._norm if self.mode == "own_norm" else self.engine.get_global_grad_norm()


def initialize(model: torch.nn.Module, param_groups: Iterable[dict], recipe: Recipe, ctx: Context) -> Any:
    """Wrap ``model`` in a DeepSpeed engine with AdamW over ``param_groups`` (see mom.train.optim.param_groups)."""
    import deepspeed

    recipe = resolve.for_world(recipe, ctx.world_size)  # an "auto" ZeRO stage: the one this world runs
    check_accelerate(recipe, ctx)
    if recipe.deepspeed.zero_stage == 3:
        register_direct_reads(model)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=deepspeed_config(recipe, ctx))
    if ctx.world_size == 1 and recipe.deepspeed.zero_stage == 0:
        # alone, there is nothing to all-reduce; DeepSpeed would still flatten every gradient into a bucket and copy
        # it back, a few kernels per parameter tensor after each backward
        engine.enable_backward_allreduce = False
    return engine


def register_direct_reads(model: torch.nn.Module) -> None:
    """Tell ZeRO-3 about parameters a module reads without calling the submodule that owns them: every module with a
    ``directly_read_parameters()`` method (MoM's mixers: their fused fast path reads the experts' weights) gets them
    registered as its external parameters, so that ZeRO-3 gathers them whenever that module runs (forward and
    backward, the same on every rank) and the fast path finds them present rather than falling back to module
    calls."""
    import deepspeed

    for module in model.modules():
        read = getattr(module, "directly_read_parameters", None)
        for param in read() if callable(read) else ():
            deepspeed.zero.register_external_parameter(module, param)


# What `accelerate launch` exports from its config's ``deepspeed_config`` section (and the launch flags of the same
# names), and the recipe key that decides the same thing in mom.
ACCELERATE_DEEPSPEED_ENV = {
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": ("zero_stage", "deepspeed.zero_stage", lambda r: r.deepspeed.zero_stage, int),
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ("offload_optimizer_device", "deepspeed.offload_optimizer",
                                                      lambda r: r.deepspeed.offload_optimizer, str.lower),
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ("offload_param_device", "deepspeed.offload_param",
                                                  lambda r: r.deepspeed.offload_param, str.lower),
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": ("gradient_accumulation_steps", "train.grad_accum",
                                               lambda r: r.train.grad_accum, int),
    "ACCELERATE_GRADIENT_CLIPPING": ("gradient_clipping", "optim.grad_clip", lambda r: r.optim.grad_clip, float),
}


def check_accelerate(recipe: Recipe, ctx: Context, env: dict[str, str] | None = None) -> None:
    """Under ``accelerate launch``: refuse an accelerate config that asks for another DeepSpeed setup than the recipe.

    mom builds its DeepSpeed engine from the recipe alone (`deepspeed_config`); the accelerate config only starts
    the processes. Its ``deepspeed_config`` fields (``zero_stage``, ``offload_*_device``,
    ``gradient_accumulation_steps``, ``gradient_clipping``) must therefore equal the recipe's keys, a
    ``deepspeed_config_file`` is refused (put DeepSpeed options in the recipe's ``deepspeed.extra``), and
    ``mixed_precision`` must be ``no`` or match the run's precision (``bf16``; mom has no fp16 / fp8 training).
    Other plugin fields (``zero3_init_flag``, ``zero3_save_16bit_model``...) are not used. `ValueError` naming every
    disagreement; nothing happens outside ``accelerate launch``.
    """
    env = dict(os.environ) if env is None else env
    problems = []
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            problems.append(f"deepspeed_config_file {env['ACCELERATE_DEEPSPEED_CONFIG_FILE']} is not read (mom "
                            "builds the DeepSpeed config from the recipe: put other DeepSpeed options in "
                            "deepspeed.extra)")
        for var, (field, key, ours, parse) in ACCELERATE_DEEPSPEED_ENV.items():
            if var not in env:
                continue
            try:
                theirs = parse(env[var])
            except ValueError:
                problems.append(f"{field}: {env[var]!r} is not a valid value")
                continue
            if theirs != ours(recipe):
                problems.append(f"{field}: {env[var]} but the recipe's {key}: {ours(recipe)}")
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed not in ("no", "bf16"):
        problems.append(f"mixed_precision: {mixed} (mom trains in fp32 or bf16: train.dtype)")
    elif mixed == "bf16" and ctx.precision == "fp32":
        problems.append("mixed_precision: bf16 but this run's train.dtype resolves to fp32")
    if problems:
        raise ValueError("accelerate config disagrees with the recipe, which decides mom's DeepSpeed engine: "
                         + "; ".join(problems) + ". Make them agree (e.g. override the recipe key as key=value) or "
                         "drop the deepspeed_config section (launch/accelerate_multi_gpu.yaml); see docs/training.md")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``, nested mappings merged key by key (new dict; inputs untouched)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def teardown() -> None:
    """Leave the process group, if one is joined. `setup` registers it to run at interpreter exit: NCCL warns about a
    group never destroyed when the process ends (and may hang there). Not earlier: DeepSpeed keeps the groups it
    derives from the world, so a process that trains again (tests, notebooks) keeps its one group."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def decided_on_main(decide: Callable[[], T]) -> T:
    """Run ``decide()`` on rank 0 only and give every rank its result, or raise the exception it raised on every
    rank: a decision about shared files (which checkpoint, may out_dir be used) is then the same everywhere by
    construction, and no rank goes on alone into a collective the others never reach."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return decide()
    box: list[Any] = [None]
    if torch.distributed.get_rank() == 0:
        try:
            box = [(True, decide())]
        except Exception as e:  # sent to the other ranks, raised on all
            box = [(False, e)]
    torch.distributed.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op in a world of one) and return it."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def _fill_env_from_slurm() -> None:
    """Under ``srun`` without a launcher, derive the torch.distributed variables from SLURM's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("running under srun with several tasks: export MASTER_ADDR (and MASTER_PORT) first")
    os.environ.update(
        RANK=os.environ["SLURM_PROCID"],
        WORLD_SIZE=os.environ["SLURM_NTASKS"],
        LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
    )
    os.environ.setdefault("MASTER_PORT", "29500")


def _accelerate_single_process_note() -> str | None:
    """What to say when ``accelerate launch`` with ``use_cpu: true`` started this lone process (its CPU launcher
    starts one process per machine, several only through mpirun): the run is a world of one."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true" or "MASTER_ADDR" not in os.environ:
        return None
    return ("accelerate launch with use_cpu: true started one process (accelerate's CPU launcher starts one per "
            "machine; more only through mpirun), so this run is a world of one. For several processes on one "
            "machine use distributed_type: MULTI_GPU, use_cpu: false (launch/accelerate_multi_gpu.yaml): torchrun "
            "then starts them, on CPU where there is no GPU")


def _share_cpu_threads() -> None:
    """Several CPU ranks on one machine: split the cores instead of oversubscribing them (unless OMP says)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "0")) or 0)
    if not local_world:
        local_world = int(os.environ.get("WORLD_SIZE", "1"))
    if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
