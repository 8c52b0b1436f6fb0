"""`mom.utils.devices.pick_device`: "auto", the devices torch names, and one-line errors for the ones not there."""

import pytest
import torch

from mom.utils.devices import pick_device


def test_auto_and_the_cpu():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_devices_against_what_the_machine_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\)$"):
        pick_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^train.device cuda: no CUDA device is available here \(use auto or cpu\)$"):
        pick_device("cuda", "train.device")


@pytest.mark.parametrize("name, needle", [("tpu", "not a device"), ("gpu", "not a device"),
                                          ("meta", "expected auto, cpu, cuda or cuda:N")])
def test_what_is_not_a_device_here(name, needle):
    with pytest.raises(ValueError, match=f"^--device {name}: {needle}"):
        pick_device(name)
