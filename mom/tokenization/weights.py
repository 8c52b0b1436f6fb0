"""Loading a tokenizer model's safetensors weights with checks: a missing, unreadable or mismatched file is named in
the error, before anything is loaded (the image VQ and the image VAE share it)."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn


def load_checked_weights(model: nn.Module, weights: Path, config_file: str) -> None:
    """Load ``weights`` into ``model`` (built from ``config_file``) if every tensor's name and shape match it;
    otherwise ``FileNotFoundError`` / ``ValueError`` naming the file and the first differences."""
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights}: cannot read weights ({err})") from err
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights}: does not match {config_file} (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")  # fmt: skip
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{weights}: tensor {k} has shape {tuple(v.shape)}, {config_file} implies "
                             f"{tuple(expected[k].shape)}")  # fmt: skip
    model.load_state_dict(state)
