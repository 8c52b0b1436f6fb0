"""`mom.ops.triton.routed_rows`: each row through its own expert. The PyTorch ops against a per-row loop on any
device; the Triton kernel against them on a GPU (tests/ops/test_cuda.py) and, where Triton is installed, in Triton's
CPU interpreter (a subprocess: the interpreter is chosen when the kernel is compiled)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mom.ops.triton.routed_rows import MAX_EXPERTS, kernel_applies, routed_rows_linear


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


@pytest.mark.parametrize("rows, blocks", [(1, "None"), (5, "None"), (70, "None"), (1, "Blocks(16, k=128)"),
                                          (70, "Blocks(16, k=16)")])
def test_the_kernel_in_tritons_interpreter_equals_the_pytorch_ops(rows, blocks):
    pytest.importorskip("triton")
    script = textwrap.dedent(f"""
        import torch
        from mom.ops.triton.routed_rows import Blocks, routed_rows_linear
        g = torch.Generator().manual_seed(0)
        for n_in, n_out, experts, bias in [(40, 70, 3, True), (100, 33, 2, False), (48, 96, 4, True)]:
            x = torch.randn({rows}, 2 * n_in, generator=g)[:, :n_in]  # rows with a stride: a view of wider rows
            ws = [torch.randn(n_out, n_in, generator=g) for _ in range(experts)]
            bs = [torch.randn(n_out, generator=g) for _ in range(experts)] if bias else None
            ids = torch.randint(0, experts, ({rows},), generator=g)
            torch.testing.assert_close(routed_rows_linear(x, ws, bs, ids, use_kernel=True, blocks={blocks}),
                                       routed_rows_linear(x, ws, bs, ids, use_kernel=False))
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
