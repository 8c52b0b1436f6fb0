"""benchmarks/bench_common.py's batch layouts (the timing itself needs a GPU)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_common import layout_modalities, shares  # noqa: E402


def test_layouts_have_the_stated_shares():
    skewed = layout_modalities("skewed", 4, 2048, device="cpu")
    assert shares(skewed, 3) == "text 87.5% image 10.2% speech 2.3%"
    assert not (skewed[0] == 2).any() and (skewed[1] == 2).any()  # speech absent from the even rows only
    assert shares(layout_modalities("single", 2, 100, device="cpu"), 3) == "text 100.0% image 0.0% speech 0.0%"
    balanced = layout_modalities("balanced", 2, 448, device="cpu")
    assert torch.equal(balanced[0], torch.tensor([0] * 64 + [1] * 256 + [2] * 128))
    with pytest.raises(ValueError, match="layout 'mixed'"):
        layout_modalities("mixed", 1, 8, device="cpu")
