"""The one reading of a device option (``--device``, ``train.device``, a tokenizer recipe's ``training.device``):
"auto" is the GPU where CUDA is available, else the CPU; "cpu", "cuda" and "cuda:N" as torch reads them, refused
with a one-line ``ValueError`` where the machine lacks them."""

from __future__ import annotations

import torch


def pick_device(name: str | torch.device, option: str = "--device") -> torch.device:
    """``name`` -> the device; ``option`` names the setting in the error (e.g. ``train.device``)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{option} {name}: not a device (auto, cpu, cuda or cuda:N)") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {name}: no CUDA device is available here (use auto or cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
