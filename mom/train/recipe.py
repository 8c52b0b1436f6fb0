"""Training recipes: typed dataclasses loaded from YAML, with ``key=value`` overrides, validated before training.

A recipe has five sections, each mapping one to one onto a dataclass (docs/training.md lists every key)::

    model:      MoMConfig keyword arguments (``modalities`` / ``vocab_sizes``: "auto", the default, is resolved
                from the corpus manifest or the tokenizers by mom.train.resolve); with ``setting: transfusion``
                MoMTransfusionConfig's (continuous image latents, mom.model.transfusion)
    data:       mom.data.loader.DataConfig
    optim:      OptimConfig
    train:      TrainConfig
    deepspeed:  DeepSpeedConfig

    recipe = load_recipe("recipes/tiny_mom.yaml", ["train.max_steps=20", "optim.lr=1e-3"])

Unknown keys and wrong types, in the file or in an override, raise ``ValueError`` naming the dotted key (and the
override, when one set it).
Relative paths are relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mom.data.loader import DataConfig
from mom.model.config import MoMConfig
from mom.model.transfusion import MoMTransfusionConfig
from mom.utils.configio import apply_overrides, blame, check_value, from_dict, read_mapping

AUTO = "auto"  # model.modalities / .vocab_sizes, train.tokenizer_dir / .dtype, deepspeed.zero_stage: mom.train.resolve
AUTO_MODEL_KEYS = ("modalities", "vocab_sizes")
# model.setting: which model a recipe trains (discrete: MoMForCausalLM over token ids, the Chameleon-like and
# text+image+speech settings; transfusion: MoMTransfusionForCausalLM over text tokens and image latents)
SETTINGS: dict[str, type[MoMConfig]] = {"discrete": MoMConfig, "transfusion": MoMTransfusionConfig}


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr`` at ``train.max_steps``.

    Args:
        lr: peak learning rate (reached after ``warmup_steps``).
        betas, eps: AdamW's.
        weight_decay: decoupled weight decay of matrices; never applied to norms, biases, ``A_log``, ``D``.
        decay_embeddings: also decay the (tied) embedding matrix.
        warmup_steps: linear warmup from 0.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: clip the global gradient norm to this (0 disables clipping).
    """

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        _require(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", "need 0 <= b < 1",
                 self.betas)
        _require(self.eps > 0, "optim.eps", "must be > 0", self.eps)
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        _require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)", self.grad_clip)


@dataclass
class TrainConfig:
    """The training loop.

    Args:
        max_steps: optimizer steps; the learning-rate schedule ends here.
        stop_after: end this run after this step (checkpoint saved) although ``max_steps`` is not reached, as a
            job with a time limit does; the next run resumes. ``None``: run to ``max_steps``.
        grad_accum: micro-batches of ``data.batch_size`` rows per optimizer step and data-parallel rank.
        seed: seed of the model initialisation and of torch / numpy / python RNGs (the data order has
            ``data.seed``).
        log_every: log train metrics every this many steps.
        eval_every: evaluate on the validation split every this many steps (0: only at the end).
        eval_batches: validation batches per evaluation and rank (0: no validation).
        save_every: checkpoint every this many steps (0: only at the end).
        keep_last: checkpoints kept (the oldest are deleted).
        out_dir: run directory: checkpoints, metrics.jsonl, tensorboard/, hf/ (the exported model), recipe.yaml.
        resume: "auto" (the latest checkpoint in ``out_dir`` if any), "none" (start fresh: ``out_dir`` must be
            empty, see ``overwrite``), or a checkpoint path.
        overwrite: start fresh although ``out_dir`` holds a run: it is first moved aside (renamed to
            ``<out_dir>.old-<time>``); ``resume: auto`` then means none.
        max_bad_steps: steps with a non-finite loss or gradient that are skipped (with a warning) before the run
            stops with an error.
        device: "auto" (cuda if available, else cpu), "cpu" or "cuda".
        dtype: "auto" (fp32 on cpu; on cuda autocast_bf16 at ZeRO stage 0, bf16 at stages 1-3:
            `mom.train.resolve.precision`), "fp32", "bf16" (DeepSpeed bf16: bf16 weights, fp32 master weights in the
            optimizer) or "autocast_bf16" (fp32 weights, bf16 matmuls under torch.autocast).
        export_hf: write a Hugging Face model (``save_pretrained``, safetensors) to ``out_dir/hf`` at the end.
        tokenizer_dir: multimodal tokenizer directory copied into the export (``hf/tokenizer``); "auto": the
            corpus manifest's ``tokenizer_dir``; ``null``: none.
        progress: show a tqdm progress bar (rank 0).
        tensorboard: also log to ``out_dir/tensorboard`` (needs the ``tensorboard`` package).
        inject_nan_steps: fault injection for tests: rank 0's loss is made NaN at these steps.
        profile_steps: ``[first, last]``: record these steps with torch.profiler and write a trace and a summary to
            ``out_dir/profile`` (`mom.train.profiling`); empty: no profiling.
    """

    max_steps: int = 1000
    stop_after: int | None = None
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    save_every: int = 0
    keep_last: int = 2
    out_dir: str = "runs/default"
    resume: str = "auto"
    overwrite: bool = False
    max_bad_steps: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp32", "autocast_bf16"] = "auto"
    export_hf: bool = True
    tokenizer_dir: str | None = AUTO
    progress: bool = True
    tensorboard: bool = True
    inject_nan_steps: list[int] = field(default_factory=list)
    profile_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "log_every", "keep_last"):
            _require(getattr(self, name) >= 1, f"train.{name}", "must be >= 1", getattr(self, name))
        for name in ("seed", "eval_every", "eval_batches", "save_every", "max_bad_steps"):
            _require(getattr(self, name) >= 0, f"train.{name}", "must be >= 0", getattr(self, name))
        if self.stop_after is not None:
            _require(1 <= self.stop_after, "train.stop_after", "must be >= 1", self.stop_after)
        _require(bool(self.out_dir), "train.out_dir", "must be a non-empty path", self.out_dir)
        _require(bool(self.resume), "train.resume", "must be 'auto', 'none' or a checkpoint path", self.resume)
        p = self.profile_steps
        _require(p == [] or (len(p) == 2 and all(isinstance(x, int) for x in p) and 1 <= p[0] <= p[1]),
                 "train.profile_steps", "must be [] or [first, last] with 1 <= first <= last", p)


@dataclass
class DeepSpeedConfig:
    """How DeepSpeed shards and offloads (mom.train.distributed turns this into DeepSpeed's JSON config).

    Args:
        zero_stage: 0 (plain data parallel), 1 (shard optimizer states), 2 (+ gradients), 3 (+ parameters), or
            "auto": 0 in a world of one (nothing to shard), 1 on several ranks (`mom.train.resolve.zero_stage`).
        offload_optimizer: "none", "cpu" or "nvme" (ZeRO-Offload; stage >= 1; uses DeepSpeedCPUAdam).
        offload_param: "none", "cpu" or "nvme" (stage 3 only).
        nvme_path: directory for "nvme" offload.
        extra: merged last into the generated DeepSpeed config (nested dicts merge key by key), for any
            DeepSpeed option this recipe does not name, e.g. ``{zero_optimization: {overlap_comm: true}}``.
    """

    zero_stage: int | Literal["auto"] = 0
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.zero_stage in (0, 1, 2, 3, AUTO), "deepspeed.zero_stage", "must be 0, 1, 2, 3 or auto",
                 self.zero_stage)
        if self.offload_optimizer != "none":
            _require(self.zero_stage in (1, 2, 3), "deepspeed.offload_optimizer", "needs zero_stage 1, 2 or 3",
                     self.offload_optimizer)
        if self.offload_param != "none":
            _require(self.zero_stage == 3, "deepspeed.offload_param", "needs zero_stage 3", self.offload_param)
        if "nvme" in (self.offload_optimizer, self.offload_param):
            _require(bool(self.nvme_path), "deepspeed.nvme_path", "required for nvme offload", self.nvme_path)


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "deepspeed": DeepSpeedConfig}


@dataclass
class Recipe:
    """A validated training recipe. ``model`` holds MoMConfig keyword arguments ("auto" allowed, see module doc)."""

    model: dict[str, Any]
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def model_config(self, **auto: Any) -> MoMConfig:
        """The `MoMConfig`; ``auto`` supplies the values of keys the recipe sets to "auto" (e.g. ``vocab_sizes``)."""
        kwargs = dict(self.model)
        config_class = SETTINGS[kwargs.pop("setting", "discrete")]
        for key, value in kwargs.items():
            if value == AUTO and key in AUTO_MODEL_KEYS:
                if key not in auto:
                    raise ValueError(f"model.{key} is 'auto': pass {key}=... (see mom.train.resolve)")
                kwargs[key] = auto[key]
        return config_class(**kwargs)

    def tokens_per_step(self, world_size: int) -> int:
        """Tokens per optimizer step over all data-parallel ranks (padding included)."""
        return world_size * self.data.batch_size * self.train.grad_accum * self.data.seq_len

    def total_tokens(self, world_size: int) -> int:
        """Tokens of the whole schedule (``train.max_steps`` steps)."""
        return self.tokens_per_step(world_size) * self.train.max_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able mapping; ``Recipe.from_dict(r.to_dict())`` gives an equal recipe."""
        out: dict[str, Any] = {"model": _plain(self.model)}
        for name in SECTIONS:
            out[name] = _plain(dataclasses.asdict(getattr(self, name)))
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> Recipe:
        """Validate a parsed recipe mapping (see `load_recipe`)."""
        if not isinstance(raw, dict):
            raise ValueError(f"recipe: must be a mapping of sections, got {type(raw).__name__}")
        known = ("model", *SECTIONS)
        for key in raw:
            if key not in known:
                raise ValueError(f"{key}: unknown recipe section; valid sections are {list(known)}")
        if "data" not in raw:
            raise ValueError("data: section required (at least data.path)")
        model = _check_model(raw.get("model") or {})
        sections = {}
        for name, cls_ in SECTIONS.items():
            section = raw.get(name)
            section = {} if section is None else section
            if not isinstance(section, dict):
                raise ValueError(f"{name}: must be a mapping, got {type(section).__name__}")
            sections[name] = from_dict(cls_, section, name)
        return cls(model=model, **sections)


# ---- loading -----------------------------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply dotted ``key=value`` overrides (`mom.utils.configio.apply_overrides`), validate.

    An error is blamed on the override that set the key it names, else on the recipe file.
    """
    raw = read_mapping(path, "recipe", of="sections")
    applied = apply_overrides(raw, overrides, recipe_schema())
    try:
        return Recipe.from_dict(raw)
    except ValueError as e:
        raise blame(e, applied, f"recipe {path}") from e


def recipe_schema() -> dict[str, Any]:
    """What an override may set: {section: dataclass or {key: annotation}} (``model``: MoMConfig's arguments)."""
    return {"model": model_schema(), **SECTIONS}


def model_schema(setting: str | None = None) -> dict[str, Any]:
    """{key: annotation} of the ``model:`` section: the config's keyword arguments of ``setting`` (None: of every
    setting, the keys an override may set), "auto" allowed where it may be, and ``setting`` itself."""
    classes = list(SETTINGS.values()) if setting is None else [MoMConfig, SETTINGS[setting]]
    schema: dict[str, Any] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls.__init__)
        params = inspect.signature(cls.__init__).parameters
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        schema.update({n: hints.get(n, Any) for n, p in params.items() if n != "self" and p.kind in keyword})
    for key in AUTO_MODEL_KEYS:
        schema[key] = Literal["auto"] | schema[key]
    schema["setting"] = Literal[tuple(SETTINGS)]
    return schema


# ---- validation --------------------------------------------------------------------------------------------------
def _check_model(model: Any) -> dict[str, Any]:
    if not isinstance(model, dict):
        raise ValueError(f"model: must be a mapping of MoMConfig arguments, got {type(model).__name__}")
    model = {"modalities": AUTO, "vocab_sizes": AUTO, **model}  # mom.train.resolve resolves them unless given
    setting = model.get("setting", "discrete")
    check_value(setting, Literal[tuple(SETTINGS)], "model.setting")
    schema = model_schema(setting)
    for key, value in model.items():
        if key not in schema:
            other = [s for s in SETTINGS if key in model_schema(s)]
            where = f" (a key of model.setting: {other[0]})" if other else ""
            raise ValueError(f"model.{key}: unknown key{where}; valid keys are {sorted(schema)}")
        check_value(value, schema[key], f"model.{key}")  # checked only: the config converts
    trial = {k: v for k, v in model.items() if k != "setting"}
    if AUTO in (model["modalities"], model["vocab_sizes"]):  # placeholders: the corpus gives the real ones
        if setting == "transfusion":
            trial.update(modalities=("text", "image"), vocab_sizes=(8, 1))
        else:
            trial.update(modalities=("text",), vocab_sizes=(8,))
    try:  # catch bad values (decouple names, sizes) now rather than after the corpus is opened
        SETTINGS[setting](**trial)
    except ValueError as e:
        raise ValueError(f"model.{e}") from e
    return model


def _require(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key}: {what}, got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
