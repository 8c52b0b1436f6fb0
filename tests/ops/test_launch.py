"""`mom.ops.triton.launcher`: the JIT once per specialisation key, then the compiled kernel's own launcher (CPU, a fake
kernel that records its calls; tests/test_cuda.py launches the real kernels both ways)."""

import pytest
import torch

from mom.ops.triton import launcher as L


class FakeCompiled:
    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def __getitem__(self, grid):
        def runner(*args):
            if self.fail:
                raise TypeError("function takes exactly 12 arguments")
            self.log.append(("direct", grid, args))
        return runner


class FakeJit:
    def __init__(self, fail_direct=False):
        self.log, self.fail_direct = [], fail_direct

    def __getitem__(self, grid):
        def run(*args, **constexprs):
            self.log.append(("jit", grid, args, constexprs))
            return FakeCompiled(self.log, self.fail_direct)
        return run


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(L, "_compiled", {})
    monkeypatch.setattr(L, "_direct", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_jit_once_per_key_then_direct():
    kernel, x = FakeJit(), torch.zeros(8)
    L.launch(kernel, (2, 1, 1), (x, 5), BLOCK=64)
    L.launch(kernel, (3, 1, 1), (x, 5), BLOCK=64)  # same key: the compiled kernel, constexprs appended in order
    assert [c[0] for c in kernel.log] == ["jit", "direct"]
    assert kernel.log[0][2:] == ((x, 5, 64), {}) and kernel.log[1][1:] == ((3, 1, 1), (x, 5, 64))
    L.launch(kernel, (3, 1, 1), (x, 16), BLOCK=64)  # another integer value: Triton may specialise on it
    L.launch(kernel, (3, 1, 1), (x, 5), BLOCK=128)  # another constexpr
    L.launch(kernel, (3, 1, 1), (x[1:], 5), BLOCK=64)  # a pointer no longer 16-byte aligned
    L.launch(kernel, (3, 1, 1), (x.double(), 5), BLOCK=64)  # another dtype
    assert [c[0] for c in kernel.log[2:]] == ["jit"] * 4


def test_a_launcher_that_rejects_the_call_falls_back_to_the_jit_for_good():
    kernel, x = FakeJit(fail_direct=True), torch.zeros(8)
    for _ in range(3):
        L.launch(kernel, (1, 1, 1), (x, 5), BLOCK=64)
    assert [c[0] for c in kernel.log] == ["jit", "jit", "jit"] and L._direct is False


def test_every_parameter_in_order_with_none_and_floats():
    kernel, x = FakeJit(), torch.zeros(8)
    L.launch_values(kernel, (1, 1, 1), (x, None, 0.5, 7, True), {"num_warps": 4})
    L.launch_values(kernel, (1, 1, 1), (x, None, 0.25, 7, True), {"num_warps": 4})  # a float is not specialised
    L.launch_values(kernel, (1, 1, 1), (x, x, 0.25, 7, True), {"num_warps": 4})  # None against a tensor: another key
    L.launch_values(kernel, (1, 1, 1), (x, None, 0.25, 7, True), {"num_warps": 8})  # another option
    assert [c[0] for c in kernel.log] == ["jit", "direct", "jit", "jit"]
    assert kernel.log[0][2:] == ((x, None, 0.5, 7, True), {"num_warps": 4})
    assert kernel.log[1][2] == (x, None, 0.25, 7, True)


def test_keys_are_bounded(monkeypatch):
    monkeypatch.setattr(L, "_MAX_KEYS", 3)
    kernel, x = FakeJit(), torch.zeros(8)
    for n in range(7):
        L.launch(kernel, (1, 1, 1), (x, n), BLOCK=64)
    assert len(L._compiled) <= 3
