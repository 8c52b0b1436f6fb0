"""LoRA adapters on pretrained MoM models (peft): the ``lora:`` recipe section, target names, freezing policy.

A projection named in ``config.decouple`` is a `mom.RoutedLinear` holding one plain ``nn.Linear`` expert per
modality (``backbone.layers.3.mixer.in_proj.image``); a shared projection is an ``nn.Linear`` itself
(``backbone.layers.3.mixer.in_proj``). peft selects a module when a target equals its full name or is a suffix of it
at a ``.`` boundary, so the target ``in_proj.image`` picks the image expert of ``in_proj`` in every layer. A hybrid's
attention layers have ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` (`mom.model.attention`), per modality when
the Mamba projection they follow is decoupled (``in_proj`` for q, k, v; ``out_proj`` for o).

    settings = LoraSettings.from_dict({"projections": ["in_proj", "out_proj"], "modalities": ["image"]})
    peft_model = wrap(base_model, settings)      # only the LoRA factors (+ modules_to_save) are trainable
    save_adapter(peft_model, "out/adapter", settings)
    model = load_adapter(fresh_base, "out/adapter")   # == PeftModel.from_pretrained unless train_A_D

The selective channel mixer's projections (``config.channel_mixer: selective``, `mom.model.channel_mixers`) are
presets too: ``channel_in_proj``, ``channel_x_proj``, ``channel_dt_proj``, ``channel_out_proj``, per modality in a
MoM. EinFFT's complex weights are not ``nn.Linear``: LoRA does not apply to them; train them in full with
``modules_to_save: [channel_mixer]``.

Frozen unless asked: every base weight, ``conv1d`` (``train_conv`` or ``modules_to_save: [conv1d]``) and the SSM
decay / skip parameters (``train_A_D``: every ``A_log`` and ``D``, the sequence mixers' and the selective channel
mixer's, and Mamba-2's ``dt_bias``, as the model lists them, `MoMPreTrainedModel.ssm_parameters`; peft cannot save
bare parameters, so they go to `EXTRA_PARAMS_FILE` next to the adapter).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from mom.model.attention import ATTENTION_PROJECTIONS, DECOUPLED_WITH
from mom.model.channel_mixers import CHANNEL_PROJECTIONS, channel_mixer_decoupled
from mom.model.config import MIXER_PROJECTIONS, PROJECTIONS
from mom.model.routing import RoutedLinear
from mom.model.transfusion import IMAGE_MODULES, MoMTransfusionForCausalLM
from mom.utils.atomic import atomic_directory
from mom.utils.configio import from_dict

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Embedding)  # module types peft's LoRA can wrap (that MoM contains)
EXTRA_PARAMS_FILE = "mom_trained_params.safetensors"  # the SSM parameters trained with train_A_D (full tensors)
_LAYER_PREFIX = re.compile(r"^backbone\.layers\.\d+\.(mixer\.)?|^backbone\.")  # stripped to list short names


# ---- the `lora:` recipe section ----------------------------------------------------------------
@dataclass
class LoraSettings:
    """The ``lora:`` section of a fine-tuning recipe.

    Args:
        r: rank of the LoRA factors.
        alpha: LoRA scaling numerator (the update is ``alpha / r * B @ A``).
        dropout: dropout on the LoRA branch input.
        projections: preset: projection kinds to adapt (subset of ``in_proj, x_proj, dt_proj, out_proj``; with
            a selective channel mixer, ``channel_in_proj, channel_x_proj, channel_dt_proj, channel_out_proj``; in a
            hybrid's attention layers, ``q_proj, k_proj, v_proj, o_proj``).
        modalities: preset: whose experts to adapt; ``None`` means every modality (and, for a projection that
            the base does not decouple, the shared ``nn.Linear``). Naming modalities for a shared projection is
            an error: there is no per-modality module to adapt.
        target_modules: extra raw peft targets (names or ``.``-bounded suffixes such as ``in_proj.image`` or
            ``backbone.layers.0.mixer.x_proj.text``), or one regex string matched against full module names
            (then ``projections`` must be empty).
        modules_to_save: modules trained in full and saved with the adapter (peft ``modules_to_save``).
        train_conv: train the depthwise ``conv1d`` of every layer in full (adds it to ``modules_to_save``).
        train_A_D: train every SSM decay / skip parameter in full (``A_log`` and ``D`` of every scan, the selective
            channel mixer's included, and Mamba-2's ``dt_bias``: `ssm_params`), saved in `EXTRA_PARAMS_FILE`.
        train_image_modules: a Transfusion-setting base (`mom.model.transfusion`): train its image-only modules
            (patch projection ``image_in``, timestep MLP ``time_embed``, ``noise_head``) in full (adds them to
            ``modules_to_save``); with ``projections`` and ``modalities: [image]`` the whole image path adapts.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    projections: list[str] = field(default_factory=list)
    modalities: list[str] | None = None
    target_modules: list[str] | str = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    train_conv: bool = False
    train_A_D: bool = False
    train_image_modules: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r: must be an integer >= 1, got {self.r!r}")
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"lora.{name}: must be a number, got {value!r}")
            setattr(self, name, float(value))
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        _check_names("projections", self.projections)
        if self.modalities is not None:
            _check_names("modalities", self.modalities)
            if not self.modalities:
                raise ValueError("lora.modalities: empty list; leave it out (null) to adapt every modality")
        if isinstance(self.target_modules, str):
            if self.projections:
                raise ValueError("lora.target_modules: a regex string cannot be combined with projections; "
                                 "give target_modules as a list of names instead")
            try:
                re.compile(self.target_modules)
            except re.error as e:
                raise ValueError(f"lora.target_modules: invalid regex {self.target_modules!r} ({e})") from None
        else:
            _check_names("target_modules", self.target_modules)
        _check_names("modules_to_save", self.modules_to_save)
        for name in ("train_conv", "train_A_D", "train_image_modules"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"lora.{name}: must be true or false, got {getattr(self, name)!r}")
        valid = PROJECTIONS + CHANNEL_PROJECTIONS + ATTENTION_PROJECTIONS
        unknown = [p for p in self.projections if p not in valid]
        if unknown:
            raise ValueError(f"lora.projections: unknown projection(s) {unknown}; valid: {list(valid)}")
        if self.modalities is not None and not self.projections:
            raise ValueError("lora.modalities: only used with projections (the preset); set projections too")
        if (not self.projections and not self.target_modules and not self.modules_to_save and not self.train_conv
                and not self.train_image_modules):
            if self.train_A_D:
                raise ValueError("lora: train_A_D alone trains no adapter; add projections or target_modules")
            raise ValueError("lora: nothing to adapt; set projections (preset) or target_modules")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSettings:
        """Build from a recipe's ``lora:`` mapping; unknown keys raise ``ValueError`` naming them."""
        return from_dict(cls, d, "lora", check_types=False)  # __post_init__ checks types with its own messages

    @property
    def all_modules_to_save(self) -> list[str]:
        extra = (["conv1d"] if self.train_conv else []) + (list(IMAGE_MODULES) if self.train_image_modules else [])
        return list(dict.fromkeys(self.modules_to_save + extra))


def _check_names(key: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"lora.{key}: must be a list of names, got {value!r}")
    duplicates = sorted({v for v in value if value.count(v) > 1})
    if duplicates:
        raise ValueError(f"lora.{key}: duplicate name(s) {duplicates}")


# ---- target names --------------------------------------------------------------------------------
def matches(name: str, target: str) -> bool:
    """peft's rule for a list target: the full module name, or a suffix of it at a ``.`` boundary."""
    return name == target or name.endswith("." + target)


def valid_target_names(model: nn.Module) -> list[str]:
    """Short names (layer prefix stripped) of every module LoRA can wrap, e.g. ``in_proj.image``, ``conv1d``."""
    return sorted({_LAYER_PREFIX.sub("", n) for n, m in model.named_modules() if isinstance(m, ADAPTABLE)})


def preset_targets(config: Any, projections: Iterable[str], modalities: list[str] | None) -> list[str]:
    """Target names for the projection kinds x modalities preset, checked against the base's ``decouple`` (an
    attention projection against the Mamba projection it follows, `DECOUPLED_WITH`)."""
    if modalities is not None:
        unknown = [m for m in modalities if m not in config.modalities]
        if unknown:
            raise ValueError(
                f"lora.modalities: unknown modality(ies) {unknown}; this base has {list(config.modalities)}"
            )
    mixer = getattr(config, "mixer", "mamba1")
    present = MIXER_PROJECTIONS[mixer] + (ATTENTION_PROJECTIONS if getattr(config, "attention_layers", ()) else ())
    absent = [p for p in projections if p not in present + CHANNEL_PROJECTIONS]
    if absent:
        raise ValueError(f"lora.projections: this base's mixer {mixer}"
                         f"{' with attention layers' if present != MIXER_PROJECTIONS[mixer] else ''} has no {absent}; "
                         f"its projections are {list(present)}")
    targets = []
    for proj in projections:
        if proj in CHANNEL_PROJECTIONS and getattr(config, "channel_mixer", None) != "selective":
            raise ValueError(f"lora.projections: {proj!r} belongs to the selective channel mixer, which this base "
                             f"does not have (channel_mixer = {getattr(config, 'channel_mixer', None)!r})")
        routed = (channel_mixer_decoupled(config) if proj in CHANNEL_PROJECTIONS
                  else DECOUPLED_WITH.get(proj, proj) in config.decouple)
        if routed:
            targets += [f"{proj}.{m}" for m in (modalities or config.modalities)]
        elif modalities is None:
            targets.append(proj)  # shared nn.Linear: adapted for every modality at once
        else:
            raise ValueError(
                f"lora.projections: {proj!r} is shared by all modalities in this base (decouple = "
                f"{list(config.decouple)}), so it has no {modalities} expert to adapt; drop it, or adapt the shared "
                f"projection for every modality with target_modules: [{proj}]"
            )
    return targets


def resolve_targets(model: nn.Module, settings: LoraSettings) -> list[str] | str:
    """The peft ``target_modules`` for ``model`` (a MoMForCausalLM); every name must select a wrappable module.

    Raises ``ValueError`` before any training for a name that matches nothing (listing the valid names), a name
    that selects a per-modality container instead of its experts, a module both targeted and in
    ``modules_to_save``, or a tied embedding / LM head (a merge would change both).
    """
    config = model.config
    named = dict(model.named_modules())
    valid = valid_target_names(model)
    for m in settings.all_modules_to_save:
        if not any(matches(n, m) for n in named if n):
            raise ValueError(f"lora.modules_to_save: {m!r} matches no module of the base; valid names: {valid}")
    if isinstance(settings.target_modules, str):
        selected = {n: named[n] for n in named if re.fullmatch(settings.target_modules, n)}
        if not selected:
            raise ValueError(f"lora.target_modules: regex {settings.target_modules!r} matches no module name; "
                             f"names look like 'backbone.layers.0.mixer.in_proj.image'; valid short names: {valid}")
        _check_selected(selected, settings.target_modules, settings, config, valid)
        return settings.target_modules
    targets = preset_targets(config, settings.projections, settings.modalities)
    targets += [t for t in settings.target_modules if t not in targets]
    for target in targets:
        selected = {n: m for n, m in named.items() if n and matches(n, target)}
        if not selected:
            raise ValueError(f"lora.target_modules: {target!r} matches no module of the base; valid names: {valid}")
        _check_selected(selected, target, settings, config, valid)
    return targets


def _check_selected(selected: dict[str, nn.Module], target: str, settings, config, valid) -> None:
    for name, module in selected.items():
        if isinstance(module, RoutedLinear):
            experts = [f"{target}.{m}" for m in module]
            raise ValueError(f"lora.target_modules: {target!r} is a per-modality projection ({name}); "
                             f"target its experts instead, e.g. {experts}")
        if not isinstance(module, ADAPTABLE):
            raise ValueError(f"lora.target_modules: {target!r} selects {name} ({type(module).__name__}), which LoRA "
                             f"cannot wrap; valid names: {valid}")
        if config.tie_word_embeddings and (name == "lm_head" or name.endswith("embeddings")):
            raise ValueError(f"lora.target_modules: {target!r} selects {name}, which is tied to "
                             f"{'backbone.embeddings' if name == 'lm_head' else 'lm_head'}; merging the adapter "
                             "would change both. Fine-tune an untied base (tie_word_embeddings: false) instead")
        clash = [m for m in settings.all_modules_to_save if matches(name, m) or f".{m}." in f".{name}."]
        if clash:
            raise ValueError(f"lora: {name} is both a LoRA target ({target!r}) and inside modules_to_save {clash}")


def lora_config(model: nn.Module, settings: LoraSettings) -> LoraConfig:
    """The peft ``LoraConfig`` for ``model``; targets resolved and validated first (see `resolve_targets`)."""
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_targets(model, settings),
        modules_to_save=settings.all_modules_to_save or None,
        bias="none",
        # a Transfusion model samples with mom.generation.image_diffusion, not generate(): peft's plain PeftModel
        task_type=None if isinstance(model, MoMTransfusionForCausalLM) else "CAUSAL_LM",
    )


# ---- wrapping and freezing -----------------------------------------------------------------------
def wrap(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """``peft.get_peft_model`` with the recipe's config, then apply the freezing policy and check it."""
    peft_model = get_peft_model(model, lora_config(model, settings))
    if settings.train_A_D:
        for _, param in ssm_params(peft_model):
            param.requires_grad_(True)
    check_trainable(peft_model, settings)
    return peft_model


def ssm_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The SSM decay / skip parameters of a MoM model or of a peft model wrapping one, named as in the base model
    (``backbone.layers.0.mixer.A_log``): the model's own list, `MoMPreTrainedModel.ssm_parameters`."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.ssm_parameters()


def adapter_filter(peft_model: nn.Module, settings: LoraSettings) -> Callable[[str, nn.Parameter], bool]:
    """The freezing policy as a predicate on the peft model's ``(name, parameter)`` (a trainer's
    ``trainable_filter``): LoRA factors, ``modules_to_save`` copies, and with ``train_A_D`` the `ssm_params`."""
    ssm = {id(p) for _, p in ssm_params(peft_model)} if settings.train_A_D else set()

    def trainable(name: str, param: nn.Parameter) -> bool:
        return ".lora_" in name or ".modules_to_save." in name or id(param) in ssm

    return trainable


def check_trainable(peft_model: nn.Module, settings: LoraSettings) -> None:
    """Raise if a parameter outside the policy is trainable, or if the adapter has no trainable parameter."""
    allowed = adapter_filter(peft_model, settings)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    stray = [n for n, p in peft_model.named_parameters() if p.requires_grad and not allowed(n, p)]
    if stray:
        raise RuntimeError(f"lora: base parameters left trainable: {stray[:5]}{' ...' if len(stray) > 5 else ''}")
    if not trainable:
        raise RuntimeError("lora: the adapter has no trainable parameter")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    params = list(model.parameters())  # de-duplicated by identity
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- saving and loading ------------------------------------------------------------------------
def save_adapter(peft_model: PeftModel, out_dir: str | os.PathLike, settings: LoraSettings) -> Path:
    """Save the adapter in peft's format (plus `EXTRA_PARAMS_FILE` with ``train_A_D``), atomically.

    An existing ``out_dir`` is never overwritten: a ``FileExistsError`` names it.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose another adapter directory or remove it")
    with atomic_directory(out_dir) as tmp:
        peft_model.save_pretrained(tmp)
        if settings.train_A_D:
            extra = {n: p.detach().cpu().contiguous() for n, p in ssm_params(peft_model)}
            save_file(extra, str(tmp / EXTRA_PARAMS_FILE))
    return out_dir


def load_adapter(base: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained(base, adapter_dir)``, first restoring the SSM parameters (`ssm_params`) if the
    adapter holds them."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir / 'adapter_config.json'} not found: not a peft adapter directory")
    extra_path = adapter_dir / EXTRA_PARAMS_FILE
    if extra_path.is_file():
        extra = load_file(str(extra_path))
        own = dict(ssm_params(base))
        missing = sorted(set(extra) - set(own))
        if missing:
            raise ValueError(f"{extra_path}: parameters {missing[:3]} do not exist in the base model")
        for name, tensor in extra.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"{extra_path}: {name} has shape {tuple(tensor.shape)}, base has "
                                 f"{tuple(own[name].shape)}")
            own[name].data.copy_(tensor)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
