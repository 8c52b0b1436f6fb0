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


def test_host_us_is_the_host_time_before_the_first_layer_or_between_two(monkeypatch):
    """`host_us`: the time from a call's start to its first layer's forward, not to the call's end, or from one
    module's forward to another's; `host_line` says both (on CPU, with the synchronisations as no-ops)."""
    from profile_decode import host_line, host_us

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    first = torch.nn.Identity()

    def call():
        time.sleep(0.002)  # the prelude
        first(None)
        time.sleep(0.02)  # the layers

    assert 2000 <= host_us(call, first, calls=3) < 15000
    layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))

    def layered():
        time.sleep(0.002)  # the prelude
        layers[0](None)
        layers[1](None)
        time.sleep(0.005)  # the second layer
        layers[2](None)
        time.sleep(0.02)  # the rest

    assert 5000 <= host_us(layered, layers[2], layers[1], calls=3) < 18000
    line = host_line(layered, layers)
    assert line.startswith("host time to the first layer ") and ", in one layer (the second) " in line
    assert ", in one layer" not in host_line(layered, layers[:2])


def test_host_us_leaves_the_timed_modules_arguments_as_they_are(monkeypatch):
    """`host_us`'s hooks only mark the time: a layer called with several arguments gets them unchanged (a pre-hook
    that returns a value replaces them)."""
    from profile_decode import host_us

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    seen = []

    class TwoArguments(torch.nn.Module):
        def forward(self, a, b):
            seen.append((a, b))

    first, second = TwoArguments(), TwoArguments()

    def call():
        first("a", "b")
        second("c", "d")

    assert host_us(call, second, first, calls=1) >= 0
    assert seen == [("a", "b"), ("c", "d")] * 3  # two warm-up calls and one timed


def test_host_ops_are_the_top_level_ops_before_the_first_layer(monkeypatch, capsys):
    """`host_ops`: the ops a call runs before its first layer's forward (not those inside another op, nor those
    after), and the time between them; `report_host` names the longest stretch between ops."""
    from profile_decode import host_ops, report_host

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    first = torch.nn.Identity()
    x = torch.ones(64)

    def call():
        torch.add(x, 1)
        torch.nn.functional.softmax(x, 0)  # one top-level op (its own ops nested inside)
        time.sleep(0.003)  # Python between the ops
        torch.mul(x, 2)
        first(x)
        torch.sub(x, 1)  # after the first layer: not the prelude's

    prelude, ops = host_ops(call, first)
    assert [name for _, _, name in ops] == ["aten::add", "aten::softmax", "aten::mul"]
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ops, ops[1:]))  # in order, none inside another
    assert 3000 <= prelude - sum(d for _, d, _ in ops) < 50000
    report_host("test", prelude, ops, top=5)
    out = capsys.readouterr().out
    longest = out.split("longest stretches between ops:")[1].splitlines()[1]
    assert "3 top-level ops" in out and "after aten::softmax, before aten::mul" in longest


def test_host_ops_between_two_modules(monkeypatch, capsys):
    """With ``start``: only the ops from one module's forward to the other's (one layer's), not before or after;
    `report_prelude_and_layer` reports the prelude and that layer."""
    from profile_decode import host_ops, report_prelude_and_layer

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))
    x = torch.ones(64)

    def call():
        torch.add(x, 1)  # the prelude
        layers[0](x)
        torch.sub(x, 1)  # the first layer's
        layers[1](x)
        torch.mul(x, 2)  # the second layer's
        time.sleep(0.002)
        torch.div(x, 2)
        layers[2](x)
        torch.neg(x)  # the third layer's

    total, ops = host_ops(call, layers[2], start=layers[1])
    assert [name for _, _, name in ops] == ["aten::mul", "aten::div"]
    assert 2000 <= total < 50000 and ops[0][0] >= 0
    report_prelude_and_layer("test", call, layers, top=5)
    out = capsys.readouterr().out
    assert "test prelude (to the first layer): host time" in out and "1 top-level ops" in out
    assert "test one layer (the second): host time" in out and "2 top-level ops" in out
    assert "before (the third layer)" in out
