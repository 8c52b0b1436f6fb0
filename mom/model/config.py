"""`MoMConfig`: the hyper-parameters of a Mixture-of-Mamba language model.

The unified vocabulary is laid out contiguously in modality order (Chameleon
style): ids ``[0, vocab_sizes[0])`` belong to the first modality (text, which
also holds the special tokens BOS/EOS/begin-image/...), the next
``vocab_sizes[1]`` ids to the second modality, and so on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PretrainedConfig

from mom.ops.projections import PROJECTIONS  # re-exported: flops, lora and the benchmarks import it from here

# mixer kind: the sequence mixer of every block, and the token-wise projections it has (what ``decouple`` may name)
MIXERS: tuple[str, ...] = ("mamba1", "mamba2")
MIXER_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "mamba1": PROJECTIONS,
    "mamba2": ("in_proj", "out_proj"),  # Mamba-2's in_proj produces z, x, B, C and dt: no x_proj / dt_proj
}
CHANNEL_MIXERS = (None, "einfft", "selective")  # config.channel_mixer (`mom.model.channel_mixers`)


class MoMConfig(PretrainedConfig):
    """Configuration of a MoM (or, with ``decouple=()``, a dense Mamba) causal LM.

    Args:
        modalities: modality names; the first one is the text modality.
        vocab_sizes: vocabulary size of each modality, in the same order.
        d_model: residual stream width.
        n_layer: number of Mamba blocks.
        d_state: SSM state size N per channel.
        d_conv: width of the shared depthwise causal convolution.
        expand: ``d_inner = expand * d_model``.
        dt_rank: rank of the Δ projection; ``"auto"`` is ``ceil(d_model / 16)`` as in Mamba.
        decouple: which token-wise projections get one expert per modality
            (subset of ``in_proj, x_proj, dt_proj, out_proj``); ``()`` is a dense Mamba.
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: Mamba's Δ initialisation.
        conv_bias, bias: biases of the conv and of ``in_proj``/``out_proj``.
        rms_norm: RMSNorm (Mamba's default) if true, else LayerNorm.
        norm_epsilon: epsilon of the norms.
        residual_in_fp32: keep the residual stream in fp32.
        rescale_prenorm_residual: scale ``out_proj`` init by ``1/sqrt(n_layer)`` (GPT-2 scheme).
        initializer_range: std of the embedding init.
        bos_token_id, eos_token_id, pad_token_id: the special ids (``PretrainedConfig`` fields, saved with the config);
            ``generate()`` stops a row at ``eos_token_id`` and pads finished rows with ``pad_token_id``.
        reset_at_document_boundaries: with a packed batch's ``seq_idx`` given to ``forward``, start every document
            from a zero conv window and SSM state, as if it were alone in its row (runs the reference scan: the
            mamba-ssm Mamba-1 kernel has no per-document reset).
        use_fast_path: on CUDA with mamba-ssm and causal-conv1d, run each mixer through `mom.ops.fused` (one autograd
            Function in the scan's layout) when no document reset, filled cache or padded prefill is involved and
            every expert is a plain ``nn.Linear``; the module path otherwise. Same maths; false forces the module path.
        mixer: the sequence mixer of every block: ``mamba1`` (`mom.model.mixer.MoMMixer`) or ``mamba2`` (the SSD
            mixer, `mom.model.mamba2.Mamba2Mixer`, whose projections are ``in_proj`` and ``out_proj``; the default
            ``decouple`` then means both). ``dt_rank`` and the ``dt_*`` init of ``dt_proj`` are Mamba-1's only.
        headdim, ngroups, chunk_size: Mamba-2's head size (``d_inner / headdim`` heads, one scalar decay each),
            groups of heads sharing B and C, and the SSD scan's chunk length.
        channel_mixer: an optional token-wise channel-mixing sublayer after every block's sequence mixer (pre-norm,
            residual; `mom.model.channel_mixers`): None, ``"einfft"`` (SiMBA's EinFFT) or ``"selective"``
            (MambaMixer's selective channel mixer). Its weights are per modality whenever ``decouple`` is non-empty.
        einfft_blocks: EinFFT's block-diagonal weights have this many blocks (must divide ``d_model`` with
            ``channel_mixer: einfft``).
        einfft_shrink: EinFFT's soft-shrinkage threshold on the spectral output (SiMBA's sparsity threshold).
        channel_groups: the selective channel mixer scans each token's channels as this many positions of
            ``d_model / channel_groups`` channels (must divide ``d_model`` with ``channel_mixer: selective``).
        channel_d_state: state size of the selective channel mixer's scan.
        layer_averaging: MambaMixer's weighted averaging of earlier features: the input of every block (and of the
            final norm) is a learned, input-independent weighted sum of the embedding and all earlier blocks' outputs.
        attention_layers: indices of the blocks whose mixer is causal self-attention (`mom.model.attention`) instead of
            Mamba (a hybrid, MambaVision / Jamba style, e.g. ``(18, 21)`` of 24); ``()`` is a pure Mamba stack.
        attention_heads: heads of those attention mixers; ``"auto"`` is ``d_model // 64`` (head size 64, as GPT-2 and
            LLaMA), lowered to the nearest divisor of ``d_model`` (at least 1). Must divide ``d_model`` into heads of
            even size (rotary embeddings rotate channel pairs).
    """

    model_type = "mom"

    def __init__(
        self,
        modalities: Sequence[str] = ("text", "image", "speech"),
        vocab_sizes: Sequence[int] = (1024, 1024, 512),
        d_model: int = 256,
        n_layer: int = 4,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        decouple: Sequence[str] = PROJECTIONS,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        rms_norm: bool = True,
        norm_epsilon: float = 1e-5,
        residual_in_fp32: bool = True,
        rescale_prenorm_residual: bool = True,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        use_cache: bool = True,
        reset_at_document_boundaries: bool = False,
        use_fast_path: bool = True,
        # mixer kind
        mixer: str = "mamba1",
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        # channel mixing
        channel_mixer: str | None = None,
        einfft_blocks: int = 4,
        einfft_shrink: float = 0.01,
        channel_groups: int = 8,
        channel_d_state: int = 8,
        layer_averaging: bool = False,
        # hybrid attention
        attention_layers: Sequence[int] = (),
        attention_heads: int | str = "auto",
        **kwargs,
    ) -> None:
        self.modalities = tuple(modalities) if not isinstance(modalities, str) else (modalities,)
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        self.d_model = d_model
        self.n_layer = n_layer
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        if mixer in MIXER_PROJECTIONS and decouple is PROJECTIONS:  # the default: every projection of this mixer
            decouple = MIXER_PROJECTIONS[mixer]
        decouple = (decouple,) if isinstance(decouple, str) else tuple(decouple)
        self.decouple = tuple(p for p in PROJECTIONS if p in decouple)  # canonical order
        self.dt_min, self.dt_max, self.dt_init = dt_min, dt_max, dt_init
        self.dt_scale, self.dt_init_floor = dt_scale, dt_init_floor
        self.conv_bias, self.bias = conv_bias, bias
        self.rms_norm = rms_norm
        self.norm_epsilon = norm_epsilon
        self.residual_in_fp32 = residual_in_fp32
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.reset_at_document_boundaries = reset_at_document_boundaries
        self.use_fast_path = bool(use_fast_path)
        # mixer kind
        self.mixer = mixer
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        # channel mixing
        self.channel_mixer = channel_mixer
        self.einfft_blocks, self.einfft_shrink = einfft_blocks, einfft_shrink
        self.channel_groups, self.channel_d_state = channel_groups, channel_d_state
        self.layer_averaging = layer_averaging
        # hybrid attention
        self.attention_layers = _attention_layers(attention_layers, n_layer)
        self.attention_heads = _attention_heads(attention_heads, d_model, bool(self.attention_layers))
        self._validate(decouple)
        self._validate_mixer(decouple)
        self._validate_channel_mixing()
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self._validate_special_ids()

    def _validate(self, decouple: tuple[str, ...]) -> None:
        if len(self.modalities) == 0:
            raise ValueError("modalities: must name at least one modality")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities: names must be unique, got {self.modalities}")
        for m in self.modalities:
            if not m.isidentifier():
                raise ValueError(f"modalities: {m!r} is not a valid module name (letters, digits, _)")
        if len(self.vocab_sizes) != len(self.modalities):
            raise ValueError(
                f"vocab_sizes: expected one size per modality ({len(self.modalities)}), got {self.vocab_sizes}"
            )
        for name in ("d_model", "n_layer", "d_state", "d_conv", "expand", "dt_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for m, v in zip(self.modalities, self.vocab_sizes):
            if v <= 0:
                raise ValueError(f"vocab_sizes: size of modality {m!r} must be positive, got {v}")
        unknown = [p for p in decouple if p not in PROJECTIONS]
        if unknown:
            raise ValueError(f"decouple: unknown projection(s) {unknown}; valid names are {list(PROJECTIONS)}")
        if self.dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init: must be 'random' or 'constant', got {self.dt_init!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min/dt_max: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.norm_epsilon <= 0:
            raise ValueError(f"norm_epsilon: must be positive, got {self.norm_epsilon}")

    def _validate_mixer(self, decouple: tuple[str, ...]) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer: must be one of {list(MIXERS)}, got {self.mixer!r}")
        for name in ("headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.mixer != "mamba2":
            return
        absent = [p for p in decouple if p not in MIXER_PROJECTIONS["mamba2"]]
        if absent:
            raise ValueError(f"decouple: mixer mamba2 has no {absent} (its in_proj produces z, x, B, C and dt); "
                             f"valid names are {list(MIXER_PROJECTIONS['mamba2'])}")
        if self.d_inner % self.headdim:
            raise ValueError(f"headdim: d_inner = expand * d_model = {self.d_inner} must be a multiple of headdim "
                             f"{self.headdim}")
        if self.nheads % self.ngroups:
            raise ValueError(f"ngroups: the {self.nheads} heads (d_inner / headdim) must split evenly into ngroups "
                             f"{self.ngroups}")

    def _validate_channel_mixing(self) -> None:
        if self.channel_mixer not in CHANNEL_MIXERS:
            raise ValueError(f"channel_mixer: must be one of {list(CHANNEL_MIXERS)}, got {self.channel_mixer!r}")
        for name in ("einfft_blocks", "channel_groups", "channel_d_state"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name, mixer in (("einfft_blocks", "einfft"), ("channel_groups", "selective")):
            if self.channel_mixer == mixer and self.d_model % getattr(self, name):
                raise ValueError(f"{name}: must divide d_model={self.d_model} (channel_mixer: {mixer}), got "
                                 f"{getattr(self, name)}")
        shrink = self.einfft_shrink
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not shrink >= 0:
            raise ValueError(f"einfft_shrink: must be a number >= 0, got {shrink!r}")
        if not isinstance(self.layer_averaging, bool):
            raise ValueError(f"layer_averaging: must be true or false, got {self.layer_averaging!r}")

    def _validate_special_ids(self) -> None:
        """bos / eos / pad ids (``generate()`` stops at eos): each None, or ids in the unified vocabulary."""
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name, None)
            if value is None:
                continue
            ids = list(value) if isinstance(value, (list, tuple)) else [value]
            valid = [isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in ids]
            if not ids or not all(valid):
                raise ValueError(f"{name}: must be None or ids in [0, {self.vocab_size}), got {value!r}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        """Mamba-2's heads, ``d_inner / headdim``."""
        return self.d_inner // self.headdim

    @property
    def vocab_size(self) -> int:
        """Size of the unified vocabulary (sum over modalities)."""
        return sum(self.vocab_sizes)

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        """Accepts only the current size (a config file may state it); the layout is set by ``vocab_sizes``, and
        `MoMForCausalLM.resize_token_embeddings` grows the text vocabulary."""
        if value != self.vocab_size:
            raise ValueError(
                f"vocab_size: the unified vocabulary is the sum of vocab_sizes {self.vocab_sizes} = {self.vocab_size}; "
                f"got {value}. Set vocab_sizes, or call resize_token_embeddings on the model"
            )

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def vocab_offsets(self) -> tuple[int, ...]:
        """First unified id of each modality."""
        offsets, total = [], 0
        for v in self.vocab_sizes:
            offsets.append(total)
            total += v
        return tuple(offsets)

    def modality_index(self, name: str) -> int:
        """Index of a modality by name; ``ValueError`` listing the valid names otherwise."""
        if name not in self.modalities:
            raise ValueError(f"unknown modality {name!r}; valid modalities are {list(self.modalities)}")
        return self.modalities.index(name)

    def modality_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Map unified token ids to modality indices (same shape, int64).

        Ids outside ``[0, vocab_size)`` raise ``ValueError`` naming the first offending id.
        """
        token_ids = torch.as_tensor(token_ids)
        check_token_ids(token_ids, self.vocab_size)
        bounds = torch.tensor(self.vocab_offsets[1:], device=token_ids.device, dtype=token_ids.dtype)
        return torch.bucketize(token_ids, bounds, right=True)


def _attention_layers(value: Sequence[int], n_layer: int) -> tuple[int, ...]:
    """``attention_layers`` checked (unique ints in ``[0, n_layer)``), as a sorted tuple."""
    layers = (value,) if isinstance(value, int) else value
    if isinstance(layers, str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"attention_layers: must be a list of layer indices (ints), got {value!r}")
    layers = tuple(layers)
    bad = [i for i in layers if not (isinstance(n_layer, int) and 0 <= i < n_layer)]
    if bad:
        raise ValueError(f"attention_layers: {bad} out of range; layer indices must lie in [0, n_layer={n_layer})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"attention_layers: duplicate layer indices in {list(layers)}")
    return tuple(sorted(layers))


def _attention_heads(value: int | str, d_model: int, attention: bool) -> int:
    """``attention_heads`` resolved ("auto": head size 64, see `MoMConfig`) and checked against ``d_model``; head sizes
    must be even only where there is ``attention``."""
    if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model <= 0:
        return 1  # d_model itself is reported by _validate
    if value == "auto":
        value = max(1, d_model // 64)  # 64: the head size of GPT-2 and LLaMA
        while value > 1 and (d_model % value or (d_model // value) % 2):
            value -= 1
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"attention_heads: must be a positive integer or 'auto', got {value!r}")
    if d_model % value:
        raise ValueError(f"attention_heads: {value} heads do not divide d_model={d_model}")
    if attention and (d_model // value) % 2:
        raise ValueError(f"attention_heads: {value} heads split d_model={d_model} into heads of odd size "
                         f"{d_model // value}; rotary embeddings need an even head size")
    return value


def check_token_ids(token_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` if any id lies outside ``[0, vocab_size)`` (one host sync)."""
    if token_ids.numel() == 0:
        return
    bad = (token_ids < 0) | (token_ids >= vocab_size)
    if bool(bad.any()):
        value = int(token_ids[bad].flatten()[0])
        raise ValueError(f"token id {value} is out of range for the unified vocabulary of size {vocab_size}")
