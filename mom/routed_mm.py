"""Routed GEMMs over modality runs: each tile of consecutive tokens picks its expert from its modality.

A MoM projection multiplies token ``t`` by the weight of its modality. Modalities come in runs (a text span, an
image's patches, an utterance's frames), so the tokens are cut, in sequence order, into `RunTiles`: tiles of at
most ``block`` consecutive tokens of one modality. A GEMM program then handles one tile with one expert's weight,
reading and writing the activations where they are: no permutation, no gather, no copy of the activations.

* `routed_mm`: ``out[:, t] = W[m(t)] @ x[:, t] (+ b[m(t)])`` — a routed projection's forward and its input
  gradient (with the weights transposed). x and out are ``(features, tokens)`` matrices with any strides, so the
  same kernel reads token-major ``(n, d)`` tensors through their transpose.
* `routed_wgrad`: ``dW[m] = sum over the tokens t of modality m of d[:, t] x[:, t]^T``, accumulated in fp32 and
  written in the weights' dtype.

Tiles start on multiples of ``ALIGN`` tokens (16 bytes of bf16) so that loads along the token dimension stay
vectorised; a tile's ``[lo, hi)`` says which of its ``block`` columns are its own (the rest belong to the
neighbouring run: loaded, never written, zeroed before a reduction). On CPU, or without Triton, both functions run
a per-modality index_select reference, which is also the oracle of the GPU tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch

ALIGN = 8  # tile starts are multiples of 8 tokens: 16-byte aligned bf16 column segments
BLOCK = 64  # tokens per tile: the benchmark's shortest run (64 text tokens), one tile of 128-byte rows


@dataclass(frozen=True)
class RunTiles:
    """The tokens of a flattened batch cut into tiles of one modality each.

    Attributes:
        table: (4, T) int32 rows ``base, lo, hi, modality``: tile columns ``base .. base + block - 1``, of which
            ``[lo, hi)`` are its tokens (all of modality ``modality``); ``base`` is a multiple of `ALIGN`. Tiles are
            grouped by modality.
        offsets: (M + 1,) int32: the tiles of modality ``m`` are ``table[:, offsets[m]:offsets[m + 1]]``.
        modality: (n,) int64 modality of each token (what the reference path routes by).
        num_modalities: M.
        block: tokens per tile.
    """

    table: torch.Tensor
    offsets: torch.Tensor
    modality: torch.Tensor
    num_modalities: int
    block: int
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_tiles(self) -> int:
        return self.table.shape[1]

    def index(self, m: int) -> torch.Tensor:
        """(n_m,) positions of modality ``m``'s tokens, in order (cached; one host sync the first time)."""
        if m not in self._index:
            self._index[m] = (self.modality == m).nonzero().squeeze(1)
        return self._index[m]


def run_tiles(modality: torch.Tensor, num_modalities: int, block: int = BLOCK) -> RunTiles:
    """Cut the flat token sequence ``modality`` (n,) into `RunTiles` (two host syncs: the run and tile counts)."""
    if block % ALIGN:
        raise ValueError(f"block must be a multiple of {ALIGN}, got {block}")
    flat = modality.reshape(-1).long()
    n, device = flat.numel(), flat.device
    new_run = torch.ones(n, dtype=torch.bool, device=device)
    new_run[1:] = flat[1:] != flat[:-1]
    starts = new_run.nonzero().squeeze(1)  # (R,)
    ends = torch.cat([starts[1:], starts.new_full((1,), n)])
    first_base = starts - starts % ALIGN
    tiles_per_run = (ends - first_base + block - 1) // block
    run = torch.repeat_interleave(torch.arange(starts.numel(), device=device), tiles_per_run)  # (T,)
    first_tile = torch.cumsum(tiles_per_run, 0) - tiles_per_run
    base = first_base[run] + (torch.arange(run.numel(), device=device) - first_tile[run]) * block
    lo = torch.maximum(base, starts[run])
    hi = torch.minimum(base + block, ends[run])
    mod = flat[starts][run]
    order = torch.argsort(mod, stable=True)
    table = torch.stack([base, lo, hi, mod])[:, order].to(torch.int32).contiguous()
    counts = torch.bincount(mod, minlength=num_modalities)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    return RunTiles(table, offsets, flat, num_modalities, block)


# ---- Triton kernels -------------------------------------------------------------------------------------------------
@cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    def small_first(configs, named_args, **_):
        """Problems under 2^20 weight elements (tests, tiny models) take the first config: not worth tuning."""
        return configs[:1] if named_args["O"] * named_args["K"] < 2**20 else configs

    mm_configs = [  # SWAP: tokens as the dot's rows (a 64 x BM tile: wgmma's 64-row instruction, BM wide)
        triton.Config({"BM": bm, "BK": 64, "SWAP": swap}, num_warps=w, num_stages=st)
        for swap, bm, w, st in ((True, 128, 4, 4), (False, 128, 4, 4), (False, 128, 8, 3), (False, 256, 8, 3),
                                (True, 256, 4, 3), (True, 256, 8, 3), (True, 128, 8, 4))
    ]

    @triton.autotune(mm_configs, key=["O", "K", "s_wo", "s_xn", "s_cn"],
                     prune_configs_by={"early_config_prune": small_first})
    @triton.jit
    def mm_kernel(w, x, c, bias, table, n_tiles, O, K, N,
                  s_wm, s_wo, s_wk, s_xk, s_xn, s_co, s_cn, s_bm,
                  HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, ALIGNED: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr):
        pid = tl.program_id(0)
        num_o = tl.cdiv(O, BM)
        tile, pid_o = pid // num_o, pid % num_o  # the output-row blocks of one tile run side by side (x reuse)
        base = tl.multiple_of(tl.load(table + tile), ALIGNED)
        lo = tl.load(table + n_tiles + tile)
        hi = tl.load(table + 2 * n_tiles + tile)
        m = tl.load(table + 3 * n_tiles + tile).to(tl.int64)
        rows = pid_o * BM + tl.arange(0, BM)
        cols = base + tl.arange(0, BT)
        ks = tl.arange(0, BK)
        row_ok, col_ok = rows < O, cols < N
        own = (cols >= lo) & (cols < hi)
        w_rows, x_cols = w + m * s_wm + rows.to(tl.int64) * s_wo, x + cols.to(tl.int64) * s_xn
        c_rows, c_cols = rows.to(tl.int64) * s_co, cols.to(tl.int64) * s_cn
        if SWAP:  # out^T (BT, BM) = x^T (BT, BK) @ W^T (BK, BM)
            a_ptr = x_cols[:, None] + ks[None, :].to(tl.int64) * s_xk
            b_ptr = w_rows[None, :] + ks[:, None] * s_wk
            acc = tl.zeros((BT, BM), dtype=tl.float32)
            for k in range(0, K, BK):
                k_ok = ks < K - k
                a = tl.load(a_ptr, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptr, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptr += BK * s_xk
                b_ptr += BK * s_wk
            if HAS_BIAS:
                acc += tl.load(bias + m * s_bm + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(c + c_rows[None, :] + c_cols[:, None], acc.to(c.dtype.element_ty),
                     mask=own[:, None] & row_ok[None, :])
        else:  # out (BM, BT) = W (BM, BK) @ x (BK, BT)
            a_ptr = w_rows[:, None] + ks[None, :] * s_wk
            b_ptr = x_cols[None, :] + ks[:, None].to(tl.int64) * s_xk
            acc = tl.zeros((BM, BT), dtype=tl.float32)
            for k in range(0, K, BK):
                k_ok = ks < K - k
                a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptr += BK * s_wk
                b_ptr += BK * s_xk
            if HAS_BIAS:
                acc += tl.load(bias + m * s_bm + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(c + c_rows[:, None] + c_cols[None, :], acc.to(c.dtype.element_ty),
                     mask=row_ok[:, None] & own[None, :])

    wgrad_configs = [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in ((128, 128, 8, 3), (128, 128, 4, 4), (128, 256, 8, 3), (256, 128, 8, 3),
                              (128, 64, 4, 4))
    ]

    @triton.autotune(wgrad_configs, key=["O", "K", "s_dn", "s_xn"],
                     prune_configs_by={"early_config_prune": small_first})
    @triton.jit
    def wgrad_kernel(d, x, out, table, offsets, n_tiles, O, K, N,
                     s_do, s_dn, s_xk, s_xn, s_om, s_oo, s_ok,
                     PRECISION: tl.constexpr, BT: tl.constexpr, ALIGNED: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
        pid, m = tl.program_id(0), tl.program_id(1)
        num_k = tl.cdiv(K, BN)
        pid_o, pid_k = pid // num_k, pid % num_k
        rows = pid_o * BM + tl.arange(0, BM)
        feats = pid_k * BN + tl.arange(0, BN)
        row_ok, feat_ok = rows < O, feats < K
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t in range(tl.load(offsets + m), tl.load(offsets + m + 1)):
            base = tl.multiple_of(tl.load(table + t), ALIGNED)
            lo = tl.load(table + n_tiles + t)
            hi = tl.load(table + 2 * n_tiles + t)
            cols = base + tl.arange(0, BT)
            col_ok = cols < N
            dv = tl.load(d + rows[:, None].to(tl.int64) * s_do + cols[None, :].to(tl.int64) * s_dn,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            dv = tl.where(((cols >= lo) & (cols < hi))[None, :], dv, 0.0)  # the neighbouring run's columns
            xv = tl.load(x + cols[:, None].to(tl.int64) * s_xn + feats[None, :].to(tl.int64) * s_xk,
                         mask=col_ok[:, None] & feat_ok[None, :], other=0.0)
            acc = tl.dot(dv, xv, acc, input_precision=PRECISION)
        o_ptr = out + m * s_om + rows[:, None].to(tl.int64) * s_oo + feats[None, :] * s_ok
        tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=row_ok[:, None] & feat_ok[None, :])

    return mm_kernel, wgrad_kernel


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs: full precision unless PyTorch itself allows TF32 (as cuBLAS would)."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _triton(*tensors: torch.Tensor):
    return _kernels() if all(t.is_cuda for t in tensors) else None


def routed_mm(weight: torch.Tensor, x: torch.Tensor, tiles: RunTiles, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[:, t] = weight[m(t)] @ x[:, t] (+ bias[m(t)])``.

    weight: (M, O, K), x: (K, n), bias: (M, O), out: (O, n); any strides (pass ``y.t()`` to write a token-major
    ``(n, O)`` tensor ``y``). Returns ``out`` (a new (O, n) tensor if not given).
    """
    M, O, K = weight.shape
    n = x.shape[1]
    if M != tiles.num_modalities or x.shape[0] != K or tiles.modality.numel() != n:
        raise ValueError(f"routed_mm: weight {tuple(weight.shape)}, x {tuple(x.shape)} and "
                         f"{tiles.num_modalities} modalities over {tiles.modality.numel()} tokens do not match")
    if out is None:
        out = x.new_empty(O, n)
    kernels = _triton(weight, x, out)
    if kernels is None:
        for m in range(M):
            idx = tiles.index(m)
            if idx.numel():
                y = weight[m] @ x.index_select(1, idx)
                out.index_copy_(1, idx, y if bias is None else y + bias[m][:, None])
        return out
    if tiles.num_tiles and O:
        grid = lambda meta: (tiles.num_tiles * -(-O // meta["BM"]),)  # noqa: E731
        kernels[0][grid](
            weight, x, out, bias if bias is not None else weight, tiles.table, tiles.num_tiles, O, K, n,
            *weight.stride(), *x.stride(), *out.stride(), bias.stride(0) if bias is not None else 0,
            HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), BT=tiles.block, ALIGNED=ALIGN,
        )
    return out


def routed_wgrad(d: torch.Tensor, x: torch.Tensor, tiles: RunTiles, dtype: torch.dtype) -> torch.Tensor:
    """``dW[m] = d[:, T_m] @ x[:, T_m]^T`` over the tokens ``T_m`` of modality m: (M, O, K) in ``dtype``.

    d: (O, n), x: (K, n), any strides. Accumulates in fp32; an absent modality gets zeros.
    """
    O, n = d.shape
    K = x.shape[0]
    M = tiles.num_modalities
    kernels = _triton(d, x)
    if kernels is None:
        acc = torch.promote_types(d.dtype, torch.float32)
        grads = [d.index_select(1, tiles.index(m)).to(acc) @ x.index_select(1, tiles.index(m)).to(acc).t()
                 for m in range(M)]
        return torch.stack(grads).to(dtype)
    out = torch.empty(M, O, K, dtype=dtype, device=d.device)
    grid = lambda meta: (-(-O // meta["BM"]) * -(-K // meta["BN"]), M)  # noqa: E731
    kernels[1][grid](
        d, x, out, tiles.table, tiles.offsets, tiles.num_tiles, O, K, n,
        *d.stride(), *x.stride(), *out.stride(),
        PRECISION=_precision(d.dtype), BT=tiles.block, ALIGNED=ALIGN,
    )
    return out
