"""Shared builders for the tests: a tiny MoM config and interleaved token ids (imported as ``helpers``)."""

import pytest
import torch

import mom
from mom.model.modeling import GENERATE_CARRIES_CACHE

# generate() carries MoM's recurrent cache only in transformers >= 5.24 (older ones pass caches under other names
# and the model re-runs the whole sequence each step): tests of the decode path through generate() need it.
needs_generate_cache = pytest.mark.skipif(
    not GENERATE_CARRIES_CACHE, reason="this transformers does not pass MoM's cache through generate() (needs >= 5.24)"
)


def tiny_config(**overrides) -> mom.MoMConfig:
    """A 2-layer MoM over text/image/speech small enough for exact CPU checks."""
    kwargs = dict(vocab_sizes=(40, 24, 16), d_model=16, n_layer=2, d_state=4, d_conv=4, expand=2, dt_rank=3)
    kwargs.update(overrides)
    return mom.MoMConfig(**kwargs)


def interleaved_ids(config: mom.MoMConfig, batch: int, runs: list[tuple[int, int]], generator=None) -> torch.Tensor:
    """Token ids laid out in runs of (modality, length), the same layout for every row."""
    parts = []
    for m, n in runs:
        lo = config.vocab_offsets[m]
        parts.append(torch.randint(lo, lo + config.vocab_sizes[m], (batch, n), generator=generator))
    return torch.cat(parts, dim=1)
