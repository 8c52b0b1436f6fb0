"""FLOP and parameter accounting of MoM / dense Mamba-1 language models, and model FLOPs utilisation (MFU).

Everything is analytic, per token and from a `MoMConfig` alone: a Mamba has no attention, so the FLOPs of a token do
not depend on the sequence length. Conventions (docs/flops.md gives the derivations):

* Attention counts the full ``seq_len x seq_len`` score matrix, causal masking not discounted: per token
  ``2 * d_model * seq_len`` for ``Q K^T`` and as much for ``A V``, as PaLM's MFU (its ``12 * L * H * Q * T`` per
  token for training) and ``torch.utils.flop_counter``'s count of SDPA do. A hybrid's attention layers
  (``config.attention_layers``) make FLOPs per token depend on the context length ``seq_len`` (a training row's
  length, ``data.seq_len`` of a recipe), which is then required.
* A matmul counts 2 FLOPs per multiply-add (``2 * in * out`` per token for a linear layer).
* An elementwise add, multiply, divide, exp, log or rsqrt counts 1 FLOP; SiLU ``z * sigmoid(z)`` counts 4
  (exp, add, reciprocal, multiply) and softplus ``log(1 + exp(x))`` counts 3.
* MoM routes each token through exactly ONE expert per decoupled projection, so its FLOPs per token equal those of
  the dense model of the same width; only the parameter count grows (``total`` vs ``active`` parameters).
* A complex FFT of length N counts ``5 N log2 N`` real FLOPs (EinFFT, ``fft`` rows): radix-2 Cooley-Tukey does
  N/2 log2 N butterflies of one complex multiply (6 real FLOPs) and two complex adds (2 each), the convention FFTW
  uses for its reported FLOP rates. ``torch.utils.flop_counter`` does not see FFTs.
* Training = forward + backward with backward = 2x forward (gradients w.r.t. inputs and w.r.t. weights), so 3x
  forward. These are *model* FLOPs (PaLM's MFU definition): recomputation is not counted. ``hardware=True`` adds
  what the GPU training path recomputes in the backward, row by row (`FlopRow.recomputed`, per mixer and path:
  `mamba_path`): a backward kernel that re-runs a forward step to rebuild an activation the forward did not store
  counts that step's forward FLOPs again (Mamba-1's conv, Δ and scan; Mamba-2's conv, chunk cumsum, C·B, chunk
  states, state passing and gate; the selective channel mixer's scans; FlashAttention's scores and probabilities);
  gradient checkpointing re-runs every block's forward (+1x on every per-layer row). Evaluating a local derivative
  from stored inputs (SiLU's sigmoid, a norm's x * rstd) is part of the backward's 2x, as in PyTorch's own
  backward formulas, and is not counted again. docs/flops.md lists every term and the kernel it comes from.

The command line is `mom.cli.flops` (``mom-flops``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from mom.model.attention import ATTENTION_PROJECTIONS, DECOUPLED_WITH
from mom.model.channel_mixers import channel_dt_rank, channel_mixer_decoupled
from mom.model.config import PROJECTIONS, MoMConfig
from mom.model.transfusion import TIME_FREQUENCIES, MoMTransfusionConfig

# ---- per-element operation counts (see the module docstring) ---------------------------------------------------
SILU_FLOPS = 4  # z * sigmoid(z) = z / (1 + exp(-z)): exp, add, reciprocal, multiply
SOFTPLUS_FLOPS = 3  # log(1 + exp(x)): exp, add, log
RMSNORM_FLOPS = 4  # per element: square, sum, scale by rsqrt(mean + eps), weight multiply (O(1) per token ignored)
LAYERNORM_FLOPS = 7  # per element: mean, subtract, square, sum, scale, weight multiply, bias add
CROSS_ENTROPY_FLOPS = 4  # per logit: max, subtract, exp, sum (log and target pick are O(1) per token)
ROPE_FLOPS = 3  # per rotated element of q and k: x1*cos - x2*sin is 2 multiplies + 1 add per output element
ATTN_SOFTMAX_FLOPS = 5  # per score: max, subtract, exp, sum, divide (the 1/sqrt(d_head) scale is on q: d per token)
FLASH_REBUILD_FLOPS = 3  # per score, FlashAttention's backward P = exp(scale * S - logsumexp): scale, subtract, exp
EVERY_BLOCK = ("layer.norm", "layer.residual")  # per-layer rows of every block, whatever its sequence mixer
FFT_FLOPS = 5  # per N log2 N of a complex FFT of length N (see the module docstring)
SOFTSHRINK_FLOPS = 2  # per element: compare with the threshold, subtract it

TRAIN_FACTOR = 3  # forward (1) + backward (2: one matmul for dL/dX, one for dL/dW, each the forward's size)
RECOMPUTE_FACTOR = 1  # gradient checkpointing: one extra forward of every per-layer row (hardware FLOPs)

KINDS = ("lookup", "matmul", "conv", "scan", "elementwise", "fft")


@dataclass(frozen=True)
class FlopRow:
    """One component of the model.

    Attributes:
        component: name, ``layer.*`` for components present once in every block.
        flops: forward FLOPs per token of ONE instance (one layer for ``layer.*`` rows).
        params: parameters stored by one instance (every modality's expert).
        active_params: parameters one token goes through (its modality's expert only).
        kind: ``matmul`` / ``conv`` (seen by ``torch.utils.flop_counter``), ``scan`` (inside the selective-scan
            kernel), ``elementwise``, ``lookup`` or ``fft`` (EinFFT's transforms).
        count: instances in the model (the blocks holding it for per-layer rows, else 1; a hybrid's Mamba rows count
            its Mamba blocks, its ``layer.attn.*`` rows its attention blocks).
        note: where the count comes from.
        recomputed: FLOPs per token of one instance that the GPU training path's backward recomputes (hardware
            FLOPs only; 0: nothing rebuilt); may exceed ``flops`` where two backward kernels each rebuild it.
        recompute_note: which kernel recomputes what.
    """

    component: str
    flops: int
    params: int
    active_params: int
    kind: str
    count: int
    note: str
    recomputed: int = 0
    recompute_note: str = ""

    @property
    def total_flops(self) -> int:
        return self.flops * self.count

    @property
    def total_params(self) -> int:
        return self.params * self.count

    @property
    def total_active_params(self) -> int:
        return self.active_params * self.count

    @property
    def total_recomputed(self) -> int:
        return self.recomputed * self.count


@dataclass(frozen=True)
class FlopTable:
    """Forward FLOPs per token and parameters of a model, by component."""

    config: MoMConfig
    rows: tuple[FlopRow, ...]
    seq_len: int | None = None  # the context length of the attention rows (None: no attention)

    def __getitem__(self, component: str) -> FlopRow:
        for row in self.rows:
            if row.component == component:
                return row
        raise KeyError(f"no component {component!r}; components are {[r.component for r in self.rows]}")

    @property
    def forward_flops(self) -> int:
        """Forward FLOPs per token (the same for every modality)."""
        return sum(r.total_flops for r in self.rows)

    def flops_of(self, *kinds: str) -> int:
        """Forward FLOPs per token of the rows of the given kinds."""
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown kind(s) {unknown}; valid kinds are {list(KINDS)}")
        return sum(r.total_flops for r in self.rows if r.kind in kinds)

    @property
    def total_params(self) -> int:
        return sum(r.total_params for r in self.rows)

    @property
    def recomputed_flops(self) -> int:
        """FLOPs per token the GPU training path's backward recomputes (`FlopRow.recomputed`), hardware FLOPs only."""
        return sum(r.total_recomputed for r in self.rows)

    @property
    def active_params(self) -> int:
        return sum(r.total_active_params for r in self.rows)

    def training_flops_per_token(self, hardware: bool = False, gradient_checkpointing: bool = False) -> float:
        """See the module-level `training_flops_per_token`."""
        if gradient_checkpointing and not hardware:
            raise ValueError("gradient_checkpointing: recomputation only counts in hardware FLOPs; pass hardware=True")
        flops = TRAIN_FACTOR * self.forward_flops
        if hardware:
            flops += self.recomputed_flops  # what the backward kernels rebuild (docs/flops.md, "Hardware FLOPs")
            if gradient_checkpointing:
                flops += RECOMPUTE_FACTOR * sum(r.total_flops for r in self.rows if r.component.startswith("layer."))
        return float(flops)

    def format(self) -> str:
        """A plain-text table: FLOPs per token by component, share of the forward, parameters."""
        c = self.config
        total = self.forward_flops
        header = (
            f"{'component':<24}{'kind':<12}{'n':>4}{'FLOPs/token':>16}{'share':>8}{'params total':>16}"
            f"{'params active':>16}  note"
        )
        lines = [
            f"d_model={c.d_model} n_layer={c.n_layer} d_inner={c.d_inner} d_state={c.d_state} d_conv={c.d_conv} "
            + (f"mixer=mamba2 headdim={c.headdim} ngroups={c.ngroups} chunk_size={c.chunk_size} " if c.mixer == "mamba2"
               else f"dt_rank={c.dt_rank} ")
            + f"vocab={c.vocab_size} modalities={','.join(c.modalities)} "
            f"decouple={','.join(c.decouple) or '() (dense)'}"
            + (f" channel_mixer={c.channel_mixer}" if c.channel_mixer else "")
            + (" layer_averaging" if c.layer_averaging else "")
            + (f" attention_layers={list(c.attention_layers)} attention_heads={c.attention_heads} "
               f"seq_len={self.seq_len}" if c.attention_layers else ""),
            header,
            "-" * len(header),
        ]
        for r in self.rows:
            share = r.total_flops / total if total else 0.0
            lines.append(
                f"{r.component:<24}{r.kind:<12}{r.count:>4}{r.total_flops:>16,}{share:>8.1%}"
                f"{r.total_params:>16,}{r.total_active_params:>16,}  {r.note}"
            )
        lines.append("-" * len(header))
        lines.append(f"{'forward total':<40}{total:>16,}{1:>8.1%}{self.total_params:>16,}{self.active_params:>16,}")
        by_kind = ", ".join(f"{k} {self.flops_of(k) / total:.1%}" for k in KINDS[1:] if self.flops_of(k))
        lines.append(f"forward by kind: {by_kind}")
        lines.append(
            f"parameters: total {human(self.total_params)}, active per token {human(self.active_params)} "
            f"(x{self.total_params / self.active_params:.2f}); active FLOPs/token = dense model of the same width"
        )
        train = self.training_flops_per_token()
        hw = self.training_flops_per_token(hardware=True)
        lines.append(
            f"training FLOPs/token: {human(train)} (model FLOPs, {TRAIN_FACTOR}x forward); "
            f"{human(hw)} hardware FLOPs with the backward's recompute ({mamba_path(c)} path)"
        )
        return "\n".join(lines)

    def format_recompute(self) -> str:
        """A plain-text table of the hardware recompute: per row, the FLOPs per token the backward rebuilds."""
        total = self.recomputed_flops
        lines = [f"hardware recompute in the backward ({mamba_path(self.config)} path; docs/flops.md):",
                 f"{'component':<24}{'n':>4}{'FLOPs/token':>16}{'x forward':>11}  what"]
        for r in self.rows:
            if r.recomputed:
                lines.append(f"{r.component:<24}{r.count:>4}{r.total_recomputed:>16,}"
                             f"{r.recomputed / r.flops:>11.2f}  {r.recompute_note}")
        lines.append(f"{'recompute total':<28}{total:>16,}{total / self.forward_flops:>11.1%} of the forward")
        return "\n".join(lines)


def flop_table(config: MoMConfig, seq_len: int | None = None) -> FlopTable:
    """Analytic forward FLOPs per token and parameters of every component of ``config``'s model. ``seq_len``: the
    context length, required by a hybrid with attention layers (its attention FLOPs per token grow with it), unused
    otherwise."""
    A = len(config.attention_layers)
    if not A:
        return _mixer_table(config)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: attention layers {list(config.attention_layers)} make FLOPs per token depend on "
                         f"the context length; give it as a positive int, got {seq_len!r}")
    every_block = set(EVERY_BLOCK) | {r.component for r in channel_mixer_rows(config, 0, 0, "")}
    mamba = config.n_layer - A  # the sequence mixer's rows count the Mamba blocks only
    rows = [replace(r, count=mamba) if r.component.startswith("layer.") and r.component not in every_block else r
            for r in _mixer_table(config).rows]
    at = next(i for i, r in enumerate(rows) if r.component == "norm_f")
    rows[at:at] = attention_rows(config, seq_len)
    return FlopTable(config, tuple(r for r in rows if r.count), seq_len)  # every block attention: no Mamba row


def attention_rows(config: MoMConfig, seq_len: int) -> list[FlopRow]:
    """The rows of the attention blocks (`mom.model.attention`) at context length ``seq_len``: q, k, v, o are
    ``d_model x d_model`` projections, experts when the Mamba projection they follow is decoupled."""
    d, A, M, h = config.d_model, len(config.attention_layers), config.num_modalities, config.attention_heads
    one = d * d + (d if config.bias else 0)  # parameters of one expert
    rows = []
    for name in ATTENTION_PROJECTIONS:
        experts = M if DECOUPLED_WITH[name] in config.decouple else 1
        rows.append(FlopRow(f"layer.attn.{name}", 2 * d * d, experts * one, one, "matmul", A,
                            f"2*d*d; {experts} expert(s)"))
    return rows + [
        FlopRow("layer.attn.rope", ROPE_FLOPS * 2 * d, 0, 0, "elementwise", A, f"{ROPE_FLOPS}*2*d: rotate q and k"),
        FlopRow("layer.attn.scores", 2 * d * seq_len, 0, 0, "matmul", A, "2*d*seq_len: Q K^T, full matrix",
                2 * d * seq_len, "SDPA's fused backward (flash, memory-efficient, cuDNN) rebuilds S = Q K^T"),
        FlopRow("layer.attn.softmax", ATTN_SOFTMAX_FLOPS * h * seq_len + d, 0, 0, "elementwise", A,
                f"{ATTN_SOFTMAX_FLOPS}*heads*seq_len + d (q scaled)", FLASH_REBUILD_FLOPS * h * seq_len,
                f"{FLASH_REBUILD_FLOPS}*heads*seq_len: P = exp(scale*S - logsumexp) from the stored logsumexp"),
        FlopRow("layer.attn.values", 2 * d * seq_len, 0, 0, "matmul", A, "2*d*seq_len: A V, full matrix"),
        FlopRow("layer.attn.biases", 4 * d if config.bias else 0, 0, 0, "elementwise", A, "q, k, v, o biases"),
    ]  # fmt: skip


def _mixer_table(config: MoMConfig) -> FlopTable:
    """The rows of a model whose every block has ``config.mixer``'s sequence mixer."""
    d, di, n, r, w = config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv
    V, L, M = config.vocab_size, config.n_layer, config.num_modalities
    experts = {p: (M if p in config.decouple else 1) for p in PROJECTIONS}
    norm_params = d if config.rms_norm else 2 * d
    per_element, kind = (RMSNORM_FLOPS, "RMSNorm") if config.rms_norm else (LAYERNORM_FLOPS, "LayerNorm")
    norm_flops, norm_note = per_element * d, f"{per_element}*d ({kind})"
    extras = [  # beside any sequence mixer: channel mixing, layer averaging, the Transfusion image side
        *channel_mixer_rows(config, norm_flops, norm_params, norm_note),
        *([FlopRow("layer_averaging", d * L * (L + 2), L * (L + 1), L * (L + 1), "elementwise", 1,
                   "d*n_layer*(n_layer+2): after block i, i+2 multiplies and i+1 adds per channel")]
          if config.layer_averaging else []),
        *(transfusion_rows(config) if isinstance(config, MoMTransfusionConfig) else []),
    ]
    if config.mixer == "mamba2":
        return FlopTable(config, _mamba2_table(config).rows + tuple(extras))

    def proj(name: str, in_f: int, out_f: int, bias: bool, note: str) -> FlopRow:
        one = in_f * out_f + (out_f if bias else 0)  # parameters of one expert
        return FlopRow(f"layer.{name}", 2 * in_f * out_f, experts[name] * one, one, "matmul", L,
                       f"{note}; {experts[name]} expert(s)")  # fmt: skip

    bias_flops = di + (2 * di if config.bias else 0) + (d if config.bias else 0) + (di if config.conv_bias else 0)
    # What the GPU training path's backward rebuilds (docs/flops.md, "Hardware FLOPs"): mom.ops.fused re-runs the
    # conv (+ SiLU) and Δ (dt_proj with its bias) before mamba-ssm's scan backward, which re-runs the forward scan
    # (softplus, discretisation, state update) from its chunk checkpoints and, for a shared out_proj, rebuilds the
    # gated output; causal-conv1d's backward rebuilds the conv's pre-activation for SiLU's gradient. The module path
    # (use_fast_path: false) stores the conv output, Δ and the gated output; the reference path rebuilds nothing.
    path = mamba_path(config)
    scan_rebuilt = path != "reference"  # mamba-ssm's selective_scan_cuda.bwd
    convs = {"fused": 2, "module": 1, "reference": 0}[path]  # conv re-runs: explicit + inside causal_conv1d_bwd
    fused = path == "fused"
    gate_rebuilt = fused and not ("out_proj" in config.decouple and M > 1)  # recompute_out_z for a shared out_proj
    conv_bias_adds = di if config.conv_bias else 0
    rows = [
        FlopRow("embedding", 0, V * d, V * d, "lookup", 1, "row gather: 0 FLOPs"),
        FlopRow("layer.norm", norm_flops, norm_params, norm_params, "elementwise", L, norm_note),
        proj("in_proj", d, 2 * di, config.bias, "2*d*2*d_inner"),
        FlopRow("layer.conv1d", 2 * di * w, di * w + (di if config.conv_bias else 0),
                di * w + (di if config.conv_bias else 0), "conv", L, "2*d_inner*d_conv, depthwise causal",
                convs * 2 * di * w,
                "causal_conv1d_bwd's pre-activation; fused: also re-run before the scan's backward"),
        FlopRow("layer.conv_silu", SILU_FLOPS * di, 0, 0, "elementwise", L, f"{SILU_FLOPS}*d_inner",
                SILU_FLOPS * di if fused else 0, "fused: the conv re-run applies its SiLU"),
        proj("x_proj", di, r + 2 * n, False, "2*d_inner*(dt_rank+2*d_state)"),
        replace(proj("dt_proj", r, di, True, "2*dt_rank*d_inner"), recomputed=2 * r * di if fused else 0,
                recompute_note="fused: Δ = dt_proj(Δ-rank features) re-run before the scan's backward"),
        FlopRow("layer.biases", bias_flops, 0, 0, "elementwise", L, "one add per biased output (dt, conv, ...)",
                (di if fused else 0) + convs * conv_bias_adds, "the conv bias at each conv re-run; fused: Δ bias"),
        FlopRow("layer.dt_softplus", SOFTPLUS_FLOPS * di, 0, 0, "scan", L, f"{SOFTPLUS_FLOPS}*d_inner",
                SOFTPLUS_FLOPS * di if scan_rebuilt else 0, "selective_scan bwd kernel: softplus(Δ)"),
        FlopRow("layer.scan.discretize", 3 * di * n + di, di * n, di * n, "scan", L,
                "d_inner*(3*d_state+1): dt*A, exp, (dt*x)*B; A_log params",
                3 * di * n + di if scan_rebuilt else 0, "selective_scan bwd kernel: exp(ΔA), ΔBx"),
        FlopRow("layer.scan.update", 2 * di * n, 0, 0, "scan", L, "2*d_inner*d_state: h = dA*h + dBx",
                2 * di * n if scan_rebuilt else 0, "selective_scan bwd kernel: the scan from its chunk checkpoints"),
        FlopRow("layer.scan.readout", 2 * di * n, 0, 0, "scan", L, "2*d_inner*d_state: y = C.h"),
        FlopRow("layer.scan.skip_D", 2 * di, di, di, "scan", L, "2*d_inner: y += D*x"),
        FlopRow("layer.scan.gate_z", (SILU_FLOPS + 1) * di, 0, 0, "scan", L, f"{SILU_FLOPS + 1}*d_inner: y*silu(z)",
                (SILU_FLOPS + 1) * di if gate_rebuilt else 0, "selective_scan bwd: out*silu(z) for out_proj's dW"),
        proj("out_proj", di, d, config.bias, "2*d_inner*d"),
        FlopRow("layer.residual", d, 0, 0, "elementwise", L, "d"),
        *extras,
        FlopRow("norm_f", norm_flops, norm_params, norm_params, "elementwise", 1, norm_note),
        FlopRow("lm_head", 2 * d * V, 0 if config.tie_word_embeddings else V * d,
                0 if config.tie_word_embeddings else V * d, "matmul", 1,
                "2*d*V" + (" (weight tied to embedding)" if config.tie_word_embeddings else "")),
        FlopRow("loss", CROSS_ENTROPY_FLOPS * V, 0, 0, "elementwise", 1, f"{CROSS_ENTROPY_FLOPS}*V log-softmax"),
    ]  # fmt: skip
    return FlopTable(config, tuple(rows))


def mamba_path(config: MoMConfig) -> str:
    """The implementation a GPU training forward of ``config``'s sequence mixer takes, which decides what its
    backward recomputes (`FlopRow.recomputed`): ``fused`` (the default, ``use_fast_path``: Mamba-1's `mom.ops.fused`,
    Mamba-2's mamba-ssm ``mamba_split_conv1d_scan_combined``), ``module`` (``use_fast_path: false``: causal-conv1d's
    and mamba-ssm's autograd Functions one by one) or ``reference`` (Mamba-1 with ``reset_at_document_boundaries``:
    the pure-PyTorch conv and scan, whose intermediates autograd stores). A LoRA-wrapped expert also takes the module
    path (the fused Functions read plain ``nn.Linear`` weights)."""
    if config.mixer == "mamba1" and config.reset_at_document_boundaries:
        return "reference"
    return "fused" if config.use_fast_path else "module"


def _outer_rows(config: MoMConfig) -> tuple[list[FlopRow], list[FlopRow]]:
    """The rows around the mixers (embedding and block norm; final norm, LM head and loss), any mixer kind."""
    d, V, L = config.d_model, config.vocab_size, config.n_layer
    norm_params = d if config.rms_norm else 2 * d
    per_element, kind = (RMSNORM_FLOPS, "RMSNorm") if config.rms_norm else (LAYERNORM_FLOPS, "LayerNorm")
    norm_flops, norm_note = per_element * d, f"{per_element}*d ({kind})"
    head_params = 0 if config.tie_word_embeddings else V * d
    before = [
        FlopRow("embedding", 0, V * d, V * d, "lookup", 1, "row gather: 0 FLOPs"),
        FlopRow("layer.norm", norm_flops, norm_params, norm_params, "elementwise", L, norm_note),
    ]
    after = [
        FlopRow("layer.residual", d, 0, 0, "elementwise", L, "d"),
        FlopRow("norm_f", norm_flops, norm_params, norm_params, "elementwise", 1, norm_note),
        FlopRow("lm_head", 2 * d * V, head_params, head_params, "matmul", 1,
                "2*d*V" + (" (weight tied to embedding)" if config.tie_word_embeddings else "")),
        FlopRow("loss", CROSS_ENTROPY_FLOPS * V, 0, 0, "elementwise", 1, f"{CROSS_ENTROPY_FLOPS}*V log-softmax"),
    ]
    return before, after


def _mamba2_table(config: MoMConfig) -> FlopTable:
    """The rows of a Mamba-2 (SSD) model (`mom.model.mamba2`). The scan is counted as its chunked algorithm runs it
    (mamba-ssm's kernels and `mom.ops.ssd.ssd_chunked`), per token for chunks of Q = ``chunk_size``: C.B within
    the chunk per group, those scores times Δx per head, each chunk's state, the state passed between chunks (once
    per chunk: /Q) and read out by C; the FLOPs per token depend on Q, not on the sequence length."""
    d, di, n, w, L, M = config.d_model, config.d_inner, config.d_state, config.d_conv, config.n_layer, \
        config.num_modalities
    h, g, Q = config.nheads, config.ngroups, config.chunk_size
    c = di + 2 * g * n  # conv channels: x, B, C
    experts = {p: (M if p in config.decouple else 1) for p in ("in_proj", "out_proj")}

    def proj(name: str, in_f: int, out_f: int, note: str) -> FlopRow:
        one = in_f * out_f + (out_f if config.bias else 0)  # parameters of one expert
        return FlopRow(f"layer.{name}", 2 * in_f * out_f, experts[name] * one, one, "matmul", L,
                       f"{note}; {experts[name]} expert(s)")

    conv_params = c * w + (c if config.conv_bias else 0)
    bias_flops = (c if config.conv_bias else 0) + ((di + c + h) + d if config.bias else 0)
    # What the GPU training path's backward rebuilds (docs/flops.md, "Hardware FLOPs"). Fused
    # (MambaSplitConv1dScanCombinedFn.backward): causal_conv1d_fwd re-runs the conv with its SiLU (x, B, C are not
    # stored); _mamba_chunk_scan_combined_bwd re-runs _chunk_cumsum_fwd (the dt row), _bmm_chunk_fwd (C.B),
    # _chunk_state_fwd and _state_passing_fwd (not _chunk_scan_fwd: inter-chunk readout and D skip); the gated norm's
    # _layer_norm_bwd rebuilds y*silu(z); causal_conv1d_bwd rebuilds the conv's pre-activation for SiLU's gradient.
    # Module path: causal_conv1d_fn (its backward's pre-activation; a document reset runs the PyTorch conv instead),
    # mamba_chunk_scan_combined (the same four SSD steps), the gated norm in PyTorch.
    fused = mamba_path(config) == "fused"
    convs = 2 if fused else (0 if config.reset_at_document_boundaries else 1)
    ssd = "_mamba_chunk_scan_combined_bwd re-runs "
    before, after = _outer_rows(config)
    rows = [
        *before,
        proj("in_proj", d, di + c + h, "2*d*(2*d_inner+2*ngroups*d_state+nheads): z, x, B, C, dt"),
        FlopRow("layer.conv1d", 2 * c * w, conv_params, conv_params, "conv", L,
                "2*(d_inner+2*ngroups*d_state)*d_conv, depthwise causal over x, B, C",
                convs * 2 * c * w,
                "causal_conv1d_bwd's pre-activation; fused: also causal_conv1d_fwd re-run for x, B, C"),
        FlopRow("layer.conv_silu", SILU_FLOPS * c, 0, 0, "elementwise", L, f"{SILU_FLOPS}*(d_inner+2*ngroups*d_state)",
                SILU_FLOPS * c if fused else 0, "fused: the conv re-run applies its SiLU"),
        FlopRow("layer.biases", bias_flops, 0, 0, "elementwise", L, "one add per biased output (conv, projections)",
                convs * (c if config.conv_bias else 0), "the conv bias at each conv re-run"),
        FlopRow("layer.ssd.dt", (SOFTPLUS_FLOPS + 3) * h, h, h, "scan", L,
                f"({SOFTPLUS_FLOPS}+3)*nheads: +dt_bias, softplus, *A, cumsum; dt_bias params",
                (SOFTPLUS_FLOPS + 3) * h, ssd + "_chunk_cumsum_fwd"),
        FlopRow("layer.ssd.intra_chunk", 2 * Q * g * n + 3 * Q * h + di + 2 * Q * di, h, h, "scan", L,
                "2*Q*ngroups*d_state (C.B) + 3*Q*nheads (decay: subtract, exp; times C.B) + d_inner (dt*x) "
                "+ 2*Q*d_inner; A_log params", 2 * Q * g * n, ssd + "_bmm_chunk_fwd (C.B)"),
        FlopRow("layer.ssd.chunk_state", 2 * di * n + 2 * h + di, 0, 0, "scan", L,
                "2*d_inner*d_state + 2*nheads + d_inner: B.(decay*dt*x), decay to the chunk's end",
                2 * di * n + 2 * h + di, ssd + "_chunk_state_fwd"),
        FlopRow("layer.ssd.state_passing", (2 * di * n + h) // Q, 0, 0, "scan", L,
                "(2*d_inner*d_state + nheads) per chunk, /Q", (2 * di * n + h) // Q, ssd + "_state_passing_fwd"),
        FlopRow("layer.ssd.inter_chunk", 2 * di * n + h + 2 * di, 0, 0, "scan", L,
                "2*d_inner*d_state (C.state) + nheads (exp) + 2*d_inner (decay, add)"),
        FlopRow("layer.ssd.skip_D", 2 * di, h, h, "scan", L, "2*d_inner: y += D*x; D params"),
        FlopRow("layer.gated_norm", (SILU_FLOPS + 1 + RMSNORM_FLOPS) * di, di, di, "elementwise", L,
                f"({SILU_FLOPS}+1+{RMSNORM_FLOPS})*d_inner: rmsnorm(y*silu(z))",
                (SILU_FLOPS + 1) * di if fused else 0, "fused: the gated norm's _layer_norm_bwd rebuilds y*silu(z)"),
        proj("out_proj", di, d, "2*d_inner*d"),
        *after,
    ]
    return FlopTable(config, tuple(rows))


def transfusion_rows(config: MoMTransfusionConfig) -> list[FlopRow]:
    """The image side of the Transfusion setting (`mom.model.transfusion`): patch projection, timestep MLP, noise
    head and diffusion loss. The model runs them at every position and keeps their output at image positions (no
    host sync for a variable-size gather), so they count per token, as for MoM and its dense twin alike."""
    d, D, F = config.d_model, config.patch_dim, TIME_FREQUENCIES
    where = "every position, kept at image positions"
    return [
        FlopRow("image_in", 2 * D * d, D * d + d, D * d + d, "matmul", 1, f"2*patch_dim*d; {where}"),
        FlopRow("time_embed", 2 * (F * d + d * d), F * d + d + d * d + d, F * d + d + d * d + d, "matmul", 1,
                f"2*({F}*d + d*d): sinusoids -> Linear -> SiLU -> Linear; {where}"),
        FlopRow("image_elementwise", (SILU_FLOPS + 4) * d + D, 0, 0, "elementwise", 1,
                f"({SILU_FLOPS}+4)*d + patch_dim: SiLU, biases, time add, head bias; {where}"),
        FlopRow("noise_head", 2 * d * D, d * D + D, d * D + D, "matmul", 1, f"2*d*patch_dim; {where}"),
        FlopRow("diffusion_loss", 3 * D, 0, 0, "elementwise", 1, f"3*patch_dim: subtract, square, sum; {where}"),
    ]


def channel_mixer_rows(config: MoMConfig, norm_flops: int, norm_params: int, norm_note: str) -> list[FlopRow]:
    """The rows of ``config.channel_mixer`` (none without one): its norm, its residual add and its own components."""
    if config.channel_mixer is None:
        return []
    d, L = config.d_model, config.n_layer
    experts = config.num_modalities if channel_mixer_decoupled(config) else 1
    rows = [FlopRow("layer.norm2", norm_flops, norm_params, norm_params, "elementwise", L, norm_note),
            FlopRow("layer.channel_residual", d, 0, 0, "elementwise", L, "d")]
    if config.channel_mixer == "einfft":
        s = d // config.einfft_blocks  # block size: the weights are einfft_blocks (s, s) complex blocks
        one = 2 * (2 * d * s + 2 * d)  # two layers of complex block weights (2*d*s reals) and complex biases (2*d)
        rows += [
            FlopRow("layer.einfft.fft", 2 * round(FFT_FLOPS * d * math.log2(d)), 0, 0, "fft", L,
                    f"2*{FFT_FLOPS}*d*log2(d): FFT and inverse FFT over the channels"),
            FlopRow("layer.einfft.emm", 2 * 4 * 2 * d * s, experts * one, one, "matmul", L,
                    f"2 layers * 4 real products * 2*d*(d/einfft_blocks); {experts} expert(s)"),
            FlopRow("layer.einfft.pointwise", 2 * 4 * d + 2 * d + SOFTSHRINK_FLOPS * 2 * d, 0, 0, "elementwise", L,
                    "2 layers * (2*d part sums + 2*d biases), 2*d ReLU, softshrink on 2*d parts"),
        ]
        return rows
    G, n, r = config.channel_groups, config.channel_d_state, channel_dt_rank(config)
    g = d // G

    def proj(name: str, in_f: int, out_f: int, bias: bool) -> FlopRow:
        one = in_f * out_f + (out_f if bias else 0)
        return FlopRow(f"layer.{name}", G * 2 * in_f * out_f, experts * one, one, "matmul", L,
                       f"channel_groups * 2*{in_f}*{out_f}; {experts} expert(s)")

    direction = 3 * g * n + g + 2 * g * n + 2 * g * n + SOFTPLUS_FLOPS * g  # discretize, update, readout, softplus
    rows += [
        proj("channel_in_proj", g, 2 * g, config.bias),
        FlopRow("layer.channel_silu", G * SILU_FLOPS * g, 0, 0, "elementwise", L, f"{SILU_FLOPS}*d"),
        proj("channel_x_proj", g, r + 2 * n, False),
        proj("channel_dt_proj", r, g, True),
        FlopRow("layer.channel_biases", G * (g + (3 * g if config.bias else 0)), 0, 0, "elementwise", L,
                "one add per biased output (dt, ...)"),
        FlopRow("layer.channel_scan", G * (2 * direction + g), g * n, g * n, "scan", L,
                "channel_groups * (2 directions * g*(7*n+1+3) + g to sum them); A_log params",
                G * 2 * (direction - 2 * g * n), "selective_scan bwd kernel, each direction: softplus, exp(ΔA), "
                "ΔBx, the scan (not C.h)"),
        FlopRow("layer.channel_skip_gate", G * (2 * g + (SILU_FLOPS + 1) * g), g, g, "scan", L,
                f"d*(2 + {SILU_FLOPS + 1}): y += D*x, y*silu(z)"),
        proj("channel_out_proj", g, g, config.bias),
    ]
    return rows


def forward_flops_per_token(config: MoMConfig, seq_len: int | None = None) -> int:
    """Forward FLOPs per token (identical for every modality, and to the dense model of the same width); ``seq_len``
    as in `flop_table`."""
    return flop_table(config, seq_len).forward_flops


def count_params(config: MoMConfig) -> tuple[int, int]:
    """(total, active) parameters: every expert vs the experts of one modality. A tied LM head counts once."""
    table = flop_table(config, seq_len=1)  # parameters do not depend on the context length
    return table.total_params, table.active_params


def training_flops_per_token(
    config: MoMConfig, hardware: bool = False, gradient_checkpointing: bool = False, seq_len: int | None = None
) -> float:
    """Training FLOPs per token: ``3x`` forward (backward = 2x forward: gradients w.r.t. inputs and weights).

    The default is *model* FLOPs, the numerator of MFU: recomputation is excluded, as in PaLM's definition, so the
    number does not depend on the implementation. ``hardware=True`` adds what the GPU training path's backward
    recomputes (`FlopTable.recomputed_flops`: each row's `FlopRow.recomputed`, per mixer and `mamba_path`), and with
    ``gradient_checkpointing`` every block's forward runs twice (per-layer rows one more time). ``seq_len``: the
    context length, for a hybrid's attention layers (`flop_table`).
    """
    return flop_table(config, seq_len).training_flops_per_token(hardware, gradient_checkpointing)


def training_flops(
    config: MoMConfig, tokens: int, hardware: bool = False, gradient_checkpointing: bool = False,
    seq_len: int | None = None,
) -> float:
    """Training FLOPs for ``tokens`` tokens (see `training_flops_per_token`)."""
    if tokens < 0:
        raise ValueError(f"tokens: must be non-negative, got {tokens}")
    return tokens * training_flops_per_token(config, hardware, gradient_checkpointing, seq_len)


# ---- peak throughput -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuPeak:
    """Dense (no 2:4 sparsity) peak throughput of one GPU, FLOP/s.

    ``bf16``: tensor cores, bf16/fp16 inputs with fp32 accumulation (what PyTorch uses); ``tf32``: tensor cores on
    fp32 inputs; ``fp32``: CUDA cores. ``match`` is a case-insensitive substring of ``torch.cuda.get_device_name``.
    """

    name: str
    match: str
    bf16: float
    tf32: float
    fp32: float
    source: str


_T = 1e12
# First match wins: more specific names first ("GH200" before "H200", "A100" before "A10", "L40S" before "L4").
# Datasheets print sparse numbers with an asterisk; the dense values used here are half of those.
GPU_PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak("GH200", "GH200", 989.4 * _T, 494.7 * _T, 67.0 * _T, "NVIDIA GH200 Grace Hopper Superchip datasheet"),
    GpuPeak("H100 PCIe", "H100 PCIe", 756.0 * _T, 378.0 * _T, 51.2 * _T, "NVIDIA H100 datasheet, PCIe column"),
    GpuPeak("H100 NVL", "H100 NVL", 835.5 * _T, 417.5 * _T, 60.0 * _T, "NVIDIA H100 datasheet, H100 NVL column"),
    GpuPeak("H100 SXM", "H100", 989.4 * _T, 494.7 * _T, 66.9 * _T, "NVIDIA H100 datasheet, SXM column"),
    GpuPeak("H200 NVL", "H200 NVL", 835.5 * _T, 417.5 * _T, 60.0 * _T, "NVIDIA H200 datasheet, H200 NVL column"),
    GpuPeak("H200 SXM", "H200", 989.4 * _T, 494.7 * _T, 67.0 * _T, "NVIDIA H200 datasheet, SXM column"),
    GpuPeak("B200", "B200", 2250.0 * _T, 1125.0 * _T, 75.0 * _T, "NVIDIA HGX B200 datasheet, per GPU (8-GPU / 8)"),
    GpuPeak("A100", "A100", 312.0 * _T, 156.0 * _T, 19.5 * _T, "NVIDIA A100 datasheet (SXM and PCIe peaks agree)"),
    GpuPeak("A10G", "A10G", 70.0 * _T, 35.0 * _T, 35.0 * _T, "AWS G5 A10G; no NVIDIA datasheet, figures AWS quotes"),
    GpuPeak("A10", "A10", 125.0 * _T, 62.5 * _T, 31.2 * _T, "NVIDIA A10 datasheet"),
    GpuPeak("L40S", "L40S", 362.05 * _T, 183.0 * _T, 91.6 * _T, "NVIDIA L40S datasheet"),
    GpuPeak("L40", "L40", 181.05 * _T, 90.5 * _T, 90.5 * _T, "NVIDIA L40 datasheet"),
    GpuPeak("L4", "L4", 121.0 * _T, 60.0 * _T, 30.3 * _T, "NVIDIA L4 datasheet"),
    GpuPeak("RTX 4090", "RTX 4090", 165.2 * _T, 82.6 * _T, 82.6 * _T, "NVIDIA Ada (AD102) whitepaper, fp32 accum."),
    GpuPeak("RTX 3090", "RTX 3090", 71.0 * _T, 35.6 * _T, 35.6 * _T, "NVIDIA Ampere (GA102) whitepaper, fp32 accum."),
    GpuPeak("MI300X", "MI300X", 1307.4 * _T, 653.7 * _T, 163.4 * _T, "AMD Instinct MI300X datasheet"),
)


def gpu_peak(device: torch.device | str) -> GpuPeak | None:
    """The `GpuPeak` entry of a device (or of a GPU name such as ``"NVIDIA H100 80GB HBM3"``); None if unknown."""
    name = _device_name(device)
    if name is None:
        return None
    lowered = name.lower()
    return next((g for g in GPU_PEAKS if g.match.lower() in lowered), None)


def _device_name(device: torch.device | str) -> str | None:
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            return device  # not a device spec: a GPU name
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device)


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, tf32: bool = False) -> float | None:
    """Dense peak FLOP/s of ``device`` for matmuls in ``dtype``; None on CPU or for an unknown GPU.

    ``device``: a ``torch.device``, a device string (``"cuda:0"``) or a GPU name (``"NVIDIA H100 PCIe"``).
    ``dtype``: bf16 / fp16 (tensor cores), or fp32: CUDA-core peak, or the TF32 tensor-core peak if ``tf32``.
    """
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype: expected torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    peak = gpu_peak(device)
    if peak is None:
        return None
    if dtype == torch.float32:
        return peak.tf32 if tf32 else peak.fp32
    return peak.bf16


def mfu(
    tokens_per_second: float,
    config: MoMConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    num_devices: int = 1,
    seq_len: int | None = None,
) -> float | None:
    """Model FLOPs utilisation: ``tokens/s * training model FLOPs/token / (num_devices * peak)``.

    ``tokens_per_second`` is the throughput of all ``num_devices`` devices together. None where the peak is unknown.
    ``seq_len``: the context length, for a hybrid's attention layers (`flop_table`).
    """
    if num_devices < 1:
        raise ValueError(f"num_devices: must be >= 1, got {num_devices}")
    peak = peak_flops(device, dtype)
    if peak is None:
        return None
    return tokens_per_second * training_flops_per_token(config, seq_len=seq_len) / (num_devices * peak)


# ---- formatting ------------------------------------------------------------------------------------------------
def human(x: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def human_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
