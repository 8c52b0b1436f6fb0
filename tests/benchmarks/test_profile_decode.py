"""benchmarks/profile_decode.py: refuses without a GPU; on one, a kernel table per side."""

import os
import sys

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
