"""`mom.ops.triton.routed_rows`: each row through its own expert. The PyTorch ops against a per-row loop on any
device; the Triton kernel against them on a GPU (tests/ops/test_cuda.py) and, where Triton is installed, in Triton's
CPU interpreter (a subprocess: the interpreter is chosen when the kernel is compiled)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mom.ops import backend
from mom.ops.triton.routed_rows import MAX_EXPERTS, Blocks, ConvStep, kernel_applies, routed_rows_linear


def _case(b: int, n_in: int, n_out: int, experts: int, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n_in, generator=g)
    weights = [torch.randn(n_out, n_in, generator=g) for _ in range(experts)]
    biases = [torch.randn(n_out, generator=g) for _ in range(experts)] if bias else None
    return x, weights, biases, torch.randint(0, experts, (b,), generator=g)


@pytest.mark.parametrize("bias", [False, True])
def test_each_row_goes_through_its_own_expert(bias):
    x, weights, biases, ids = _case(7, 12, 5, 3, bias)
    got = routed_rows_linear(x, weights, biases, ids)
    for i in range(x.shape[0]):
        e = int(ids[i])
        expected = x[i] @ weights[e].T + (biases[e] if bias else 0)
        torch.testing.assert_close(got[i], expected)


def test_the_kernel_does_not_apply_off_cuda_or_to_weights_it_cannot_read():
    x, weights, _, _ = _case(2, 8, 4, 3, False)
    assert not kernel_applies(x, weights)  # CPU tensors: the PyTorch ops
    assert not kernel_applies(x, [torch.randn(4, 8) for _ in range(MAX_EXPERTS + 1)])


@pytest.mark.parametrize("conv_bias", [False, True])
def test_a_conv_step_on_the_first_outputs_equals_the_conv_update_after_the_projection(conv_bias):
    x, weights, biases, ids = _case(4, 12, 16, 3, True)
    g = torch.Generator().manual_seed(1)
    state, weight = torch.randn(4, 8, 4, generator=g), torch.randn(8, 4, generator=g)
    bias = torch.randn(8, generator=g) if conv_bias else None
    ref_state = state.clone()
    got = routed_rows_linear(x, weights, biases, ids, conv=ConvStep(state, weight, bias))
    y = routed_rows_linear(x, weights, biases, ids)
    want_x = backend.causal_conv1d_update(y[:, :8].clone(), ref_state, weight, bias)
    torch.testing.assert_close(got, torch.cat([want_x, y[:, 8:]], dim=1))
    torch.testing.assert_close(state, ref_state)
    torch.testing.assert_close(state[..., -1], y[:, :8])  # the window took the projection's x half


def test_a_conv_step_applies_only_to_whole_output_tiles_of_a_power_of_two_window():
    x, weights, _, _ = _case(2, 12, 64, 3, False)
    assert ConvStep(torch.zeros(2, 32, 4), torch.zeros(32, 4), None).applies(x, 64, Blocks(16))
    assert not ConvStep(torch.zeros(2, 24, 4), torch.zeros(24, 4), None).applies(x, 64, Blocks(16))  # 24 % 16
    assert not ConvStep(torch.zeros(2, 32, 3), torch.zeros(32, 3), None).applies(x, 64, Blocks(16))  # w = 3
    assert not ConvStep(torch.zeros(3, 32, 4), torch.zeros(32, 4), None).applies(x, 64, Blocks(16))  # 3 rows


@pytest.mark.parametrize("rows, blocks", [(1, "None"), (5, "None"), (70, "None"), (1, "Blocks(16, k=128)"),
                                          (70, "Blocks(16, k=16)")])
def test_the_kernel_in_tritons_interpreter_equals_the_pytorch_ops(rows, blocks):
    pytest.importorskip("triton")
    script = textwrap.dedent(f"""
        import torch
        from mom.ops.triton.routed_rows import Blocks, ConvStep, routed_rows_linear
        g = torch.Generator().manual_seed(0)
        for n_in, n_out, experts, bias in [(40, 70, 3, True), (100, 33, 2, False), (48, 96, 4, True)]:
            x = torch.randn({rows}, 2 * n_in, generator=g)[:, :n_in]  # rows with a stride: a view of wider rows
            ws = [torch.randn(n_out, n_in, generator=g) for _ in range(experts)]
            bs = [torch.randn(n_out, generator=g) for _ in range(experts)] if bias else None
            ids = torch.randint(0, experts, ({rows},), generator=g)
            torch.testing.assert_close(routed_rows_linear(x, ws, bs, ids, use_kernel=True, blocks={blocks}),
                                       routed_rows_linear(x, ws, bs, ids, use_kernel=False))
            # the conv step on the first outputs, in whole tiles of 16 (bf16 does not run in the interpreter)
            c, tiling = 32, Blocks(16)
            if n_out >= c:
                states = [torch.randn({rows}, c, 4, generator=g) for _ in range(2)]
                states[1].copy_(states[0])
                cw, cb = torch.randn(c, 4, generator=g), torch.randn(c, generator=g) if bias else None
                got = routed_rows_linear(x, ws, bs, ids, use_kernel=True, blocks=tiling,
                                         conv=ConvStep(states[0], cw, cb))
                want = routed_rows_linear(x, ws, bs, ids, use_kernel=False, conv=ConvStep(states[1], cw, cb))
                torch.testing.assert_close(got, want)
                torch.testing.assert_close(states[0], states[1])
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
