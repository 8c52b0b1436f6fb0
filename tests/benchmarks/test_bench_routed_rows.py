"""benchmarks/bench_routed_rows.py: refuses without a GPU; on one, one line per projection and row layout, each kernel
output checked against the PyTorch ops inside the benchmark."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_routed_rows import main  # noqa: E402


def test_refuses_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["--batch", "1"]) == 2
    assert "needs a CUDA device and Triton" in capsys.readouterr().err


@pytest.mark.gpu
def test_one_line_per_projection_and_layout(capsys):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    assert main(["--batch", "4"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("batch")]
    assert len(lines) == 8 and all(" ratio " in line for line in lines)
