"""`AttentionMixer`: causal self-attention with per-modality Q, K, V, O projections, the mixer of a hybrid model's
attention layers (``config.attention_layers``; MambaVision and Jamba put a few attention blocks in a Mamba stack).

Per token, as in the Mixture-of-Transformers parameterisation (Liang et al. 2024) that MoM extends::

    q, k, v = q_proj(h), k_proj(h), v_proj(h)   # (b, l, d_model) each, experts of the token's modality if decoupled
    q, k    = rope(q, pos), rope(k, pos)          # rotary position embeddings, per head
    y       = softmax(q k^T / sqrt(d_head) + causal mask) v   # ONE attention over the whole interleaved sequence
    out     = o_proj(y)                           # (b, l, d_model)

Which projections are experts follows ``config.decouple`` (`DECOUPLED_WITH`): q, k and v are routed when ``in_proj``
is (the input projection of the token), o when ``out_proj`` is; ``decouple=()`` makes every projection shared, a
dense attention layer. Norms and the attention itself are shared by all modalities, as the scan is in Mamba layers.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention on CUDA for a plain causal
forward in fp16 / bf16; a mask, from left padding, document resets or a cache, takes one of its kernels that accept
one: memory-efficient or cuDNN, the math path on CPU).
Positions are rotary (RoFormer, Su et al. 2021, in the GPT-NeoX / LLaMA half-split layout): the Mamba layers carry no
position of their own to the attention layers. A position counts the real tokens of its document before it, so a left-
padded row, or a packed document after a reset, sees the same positions as alone in its row.

Generation keeps every past key and value in the `MoMCache` (`MoMCache.attention_keys`...), with a (b, t) flag of the
keys a later token may see (not padding, not an earlier document); the step reads no host value (no sync).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mom.model.cache import MoMCache
from mom.model.config import MoMConfig
from mom.model.routing import RoutedLinear, Routing, project, project_rows

# Each attention projection and the Mamba projection whose entry in ``config.decouple`` makes it per modality.
DECOUPLED_WITH: dict[str, str] = {"q_proj": "in_proj", "k_proj": "in_proj", "v_proj": "in_proj", "o_proj": "out_proj"}
ATTENTION_PROJECTIONS: tuple[str, ...] = tuple(DECOUPLED_WITH)
ROPE_BASE = 10000.0  # the rotary base of RoFormer and LLaMA


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: x (b, l, h, dh) rotated by ``positions`` (b, l); pairs (i, i + dh/2) rotate by
    ``pos * ROPE_BASE^(-2i/dh)``. Computed in fp32, returned in x's dtype."""
    dh = x.shape[-1]
    inv_freq = ROPE_BASE ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)  # (dh/2,)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (b, l, dh/2)
    cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)  # (b, l, 1, dh/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def segment_positions(valid: torch.Tensor, doc_start: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (b, l), segments (b, l)): each token's count of real (``valid``) tokens before it in its document,
    and its document's index in the row (0 without ``doc_start``). Padding gets the position of the next real token."""
    v = valid.long()
    before = v.cumsum(-1) - v  # real tokens before each position, in the row
    if doc_start is None:
        return before, torch.zeros_like(before)
    starts = doc_start.clone()
    starts[:, 0] = True
    base = torch.where(starts, before, torch.zeros_like(before)).cummax(-1).values  # count at the document's start
    return before - base, starts.long().cumsum(-1) - 1


class AttentionMixer(nn.Module):
    """Causal multi-head self-attention with the interface of `mom.model.mixer.MoMMixer` (module docstring)."""

    def __init__(self, config: MoMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.attention_heads
        self.d_head = config.d_model // config.attention_heads
        d = config.d_model
        for name, mamba_name in DECOUPLED_WITH.items():
            if mamba_name in config.decouple:
                proj = RoutedLinear(config.modalities, d, d, config.bias)
            else:
                proj = nn.Linear(d, d, bias=config.bias)
            setattr(self, name, proj)

    def fast_path_applies(self, hidden: torch.Tensor | None = None) -> bool:
        """Never: the fused Function is Mamba's; attention always runs this module path (its own fused kernel is
        SDPA's)."""
        return False

    def forward(
        self,
        hidden: torch.Tensor,
        routing: Routing,
        cache: MoMCache | None = None,
        mask: torch.Tensor | None = None,
        doc_start: torch.Tensor | None = None,
        sorted_tokens: bool = False,
    ) -> torch.Tensor:
        """hidden: (b, l, d_model) -> (b, l, d_model), as `MoMMixer.forward`: ``mask`` (b, l) 1 for real tokens, 0
        for left padding (no token attends to padding); ``doc_start`` (b, l) bool where packed documents start (no
        token attends across one, positions restart); ``cache``: keys and values are stored in it, and after a
        cached prefix new tokens attend to the cached ones (``mask`` and ``doc_start`` are then unused, as for
        Mamba). ``sorted_tokens`` is never set for a model with attention layers (`mom.model.mixer.sorted_stream`)."""
        if sorted_tokens:
            raise ValueError("AttentionMixer reads its rows in sequence order; a sorted residual stream is Mamba-only")
        b, l, _ = hidden.shape
        past = cache.seqlen_offset if cache is not None else 0
        q, k, v = (project(getattr(self, n), hidden, routing).view(b, l, self.n_heads, self.d_head)
                   for n in ("q_proj", "k_proj", "v_proj"))
        if past:
            positions = cache.attention_valid[self.layer_idx].sum(-1, keepdim=True) + torch.arange(l, device=q.device)
            segments, valid = None, None
        else:
            valid = torch.ones(b, l, dtype=torch.bool, device=q.device) if mask is None else mask.bool()
            positions, segments = segment_positions(valid, doc_start)
        q, k = rope(q, positions), rope(k, positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, h, l, dh)
        if cache is not None:
            if past:
                k, v, seen = cache.append_attention(self.layer_idx, k, v)  # (b, h, past + l, dh), (b, past + l)
            else:  # a later token sees the last document's real tokens only
                cache.store_attention(self.layer_idx, k, v, valid & (segments == segments[:, -1:]))
            k, v = k.to(q.dtype), v.to(q.dtype)
        if past:
            causal = torch.ones(l, past + l, dtype=torch.bool, device=q.device).tril(past)  # (l, past + l)
            attn_mask = (causal & seen[:, None, :]).unsqueeze(1)  # (b, 1, l, past + l)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif mask is None and doc_start is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            allowed = torch.ones(l, l, dtype=torch.bool, device=q.device).tril()  # (l, l)
            allowed = allowed & valid[:, None, :] & (segments[:, :, None] == segments[:, None, :])  # (b, l, l)
            # a padded query sees itself (no row without a key: softmax stays finite; its output is never read)
            allowed = allowed | torch.eye(l, dtype=torch.bool, device=q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))
        y = y.transpose(1, 2).reshape(b, l, self.n_heads * self.d_head)  # (b, l, d_model)
        return project(self.o_proj, y, routing)

    def step(self, hidden: torch.Tensor, routing: Routing, cache: MoMCache) -> torch.Tensor:
        """One token per row after a cached prefix: hidden (b, 1, d_model) -> (b, 1, d_model); its key and value are
        appended to ``cache``. Experts picked per row as in `MoMMixer.step` (`project_rows`); no host sync."""
        b = hidden.shape[0]
        h = hidden[:, 0]  # (b, d)
        q, k, v = (project_rows(getattr(self, n), h, routing).view(b, 1, self.n_heads, self.d_head)
                   for n in ("q_proj", "k_proj", "v_proj"))
        positions = cache.attention_valid[self.layer_idx].sum(-1, keepdim=True)  # (b, 1): real tokens seen
        q, k = rope(q, positions).transpose(1, 2), rope(k, positions).transpose(1, 2)  # (b, h, 1, dh)
        k, v, seen = cache.append_attention(self.layer_idx, k, v.transpose(1, 2))
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=seen[:, None, None, :])
        return project_rows(self.o_proj, y.reshape(b, self.n_heads * self.d_head), routing).unsqueeze(1)
