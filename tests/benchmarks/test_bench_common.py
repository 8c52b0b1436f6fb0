"""benchmarks/bench_common.py's batch layouts and launch switch (the timing itself needs a GPU)."""

import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from bench_common import launches, layout_modalities, shares  # noqa: E402

from mom.ops.triton import rebind  # noqa: E402


def test_layouts_have_the_stated_shares():
    skewed = layout_modalities("skewed", 4, 2048, device="cpu")
    assert shares(skewed, 3) == "text 87.5% image 10.2% speech 2.3%"
    assert not (skewed[0] == 2).any() and (skewed[1] == 2).any()  # speech absent from the even rows only
    assert shares(layout_modalities("single", 2, 100, device="cpu"), 3) == "text 100.0% image 0.0% speech 0.0%"
    balanced = layout_modalities("balanced", 2, 448, device="cpu")
    assert torch.equal(balanced[0], torch.tensor([0] * 64 + [1] * 256 + [2] * 128))
    with pytest.raises(ValueError, match="layout 'mixed'"):
        layout_modalities("mixed", 1, 8, device="cpu")


@pytest.mark.parametrize("before", [None, "1", "0"])
def test_launches_switches_the_library_functions_and_restores_the_setting(monkeypatch, before):
    """Inside ``launches(False)`` mom calls a library function as it ships (`rebind.launched` gives it back); inside
    ``launches(True)`` its rebound copy; the environment is as before afterwards, also after an error."""
    if before is None:
        monkeypatch.delenv(rebind.DIRECT_LAUNCH_ENV, raising=False)
    else:
        monkeypatch.setenv(rebind.DIRECT_LAUNCH_ENV, before)
    fn = shares  # a function of the package "bench_common": launched as a copy of it where Triton is installed
    with launches(False):
        assert os.environ[rebind.DIRECT_LAUNCH_ENV] == "0"
        assert rebind.launched(fn, package="bench_common") is fn
    with pytest.raises(RuntimeError):
        with launches(True):
            assert os.environ[rebind.DIRECT_LAUNCH_ENV] == "1"
            copy = rebind.launched(fn, package="bench_common")
            assert copy is rebind.launched(fn, package="bench_common")  # made once
            assert (copy is not fn) == (importlib.util.find_spec("triton") is not None)  # no Triton: nothing to rebind
            raise RuntimeError("inside")
    assert os.environ.get(rebind.DIRECT_LAUNCH_ENV) == before
