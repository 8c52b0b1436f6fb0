"""benchmarks/profile_decode.py: refuses without a GPU; on one, a kernel table per side."""

import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from profile_decode import main  # noqa: E402


def test_refuses_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_a_table_per_side(capsys):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    assert main(["--d-model", "64", "--n-layer", "2", "--steps", "2", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "=== MoM (uniform rows): per step ===" in out and out.count("total: ") >= 1


def test_prelude_is_the_host_time_before_the_first_layer(monkeypatch):
    """`prelude_us`: the time from a call's start to its first layer's forward, not to the call's end (on CPU, with
    the synchronisations as no-ops)."""
    from profile_decode import prelude_us

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    first = torch.nn.Identity()

    def call():
        time.sleep(0.002)  # the prelude
        first(None)
        time.sleep(0.02)  # the layers

    assert 2000 <= prelude_us(call, first, calls=3) < 15000
