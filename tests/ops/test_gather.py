"""`mom.ops.triton.gather.gated_gather_backward` (the gated gather's backward, from sorted rows to sequence-order
columns): its PyTorch ops against autograd in fp64, and the Triton kernel against them in Triton's CPU interpreter
(a subprocess: the interpreter is chosen when a kernel is compiled). The gathers themselves: tests/ops/test_fused.py."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mom.ops.triton.gather import gated_gather_backward


def test_gated_gather_backward_equals_autograd_of_the_gated_gather():
    """d_out (f, n) and dz (m, f) equal autograd's through ``y = out[:, index].t() * silu(z)``; the columns of
    d_out that index does not reach are left as they were; strided rows (z's half of in_proj's rows) are read and
    written in place."""
    g = torch.Generator().manual_seed(0)
    f, n, m = 6, 11, 9
    out = torch.randn(f, n, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.randperm(n, generator=g)[:m]
    wide = torch.randn(m, 2 * f, dtype=torch.float64, generator=g)
    z = wide[:, f:].detach().requires_grad_()
    dy = torch.randn(m, f, dtype=torch.float64, generator=g)
    (out[:, index].t() * F.silu(z)).backward(dy)
    d_out = torch.full((f, n), 7.0, dtype=torch.float64)
    grads = torch.zeros(m, 2 * f, dtype=torch.float64)
    gated_gather_backward(dy, wide[:, f:], out.detach(), index, d_out, grads[:, f:])
    torch.testing.assert_close(d_out[:, index], out.grad[:, index])
    missed = torch.ones(n, dtype=torch.bool)
    missed[index] = False
    assert (d_out[:, missed] == 7.0).all()
    torch.testing.assert_close(grads[:, f:], z.grad)
    assert not grads[:, :f].any()


def test_gated_gather_backward_names_bad_shapes():
    dy, out, index = torch.randn(4, 3), torch.randn(3, 8), torch.arange(4)
    with pytest.raises(ValueError, match=r"z_rows has shape \(4, 2\), expected \(4, 3\)"):
        gated_gather_backward(dy, torch.randn(4, 2), out, index, torch.empty(3, 8), torch.empty(4, 3))
    with pytest.raises(ValueError, match=r"d_out_cols has shape \(3, 7\), expected \(3, 8\)"):
        gated_gather_backward(dy, torch.randn(4, 3), out, index, torch.empty(3, 7), torch.empty(4, 3))
    with pytest.raises(ValueError, match=r"out_cols \(2, 8\) must have 3 features"):
        gated_gather_backward(dy, torch.randn(4, 3), out[:2], index, torch.empty(2, 8), torch.empty(4, 3))


def test_gated_gather_backward_kernel_in_tritons_interpreter_equals_the_pytorch_ops():
    """The kernel, run by Triton's interpreter, against the PyTorch ops (fp32 and bf16; strided rows; partial tiles)."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from mom.ops.triton import gather

        g = torch.Generator().manual_seed(0)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            f, n, m = 70, 150, 130
            out = torch.randn(f, n, generator=g).to(dtype)
            index = torch.randperm(n, generator=g)[:m]
            dy = torch.randn(m, f, generator=g).to(dtype)
            z = torch.randn(m, 2 * f, generator=g).to(dtype)[:, f:]
            want_d, want_dz = torch.zeros(f, n, dtype=dtype), torch.zeros(m, f, dtype=dtype)
            gather.gated_gather_backward(dy, z, out, index, want_d, want_dz)  # on CPU: the PyTorch ops
            d, dz = torch.zeros(f, n, dtype=dtype), torch.zeros(m, 2 * f, dtype=dtype)[:, f:]
            grid = (-(-m // gather.TILE), -(-f // gather.TILE), 1)
            gather._backward_kernel()[grid](dy, z, out, index, d, dz, m, f, dy.stride(0), z.stride(0), dz.stride(0),
                                            out.stride(0), d.stride(0), BN=gather.TILE, BF=gather.TILE)
            torch.testing.assert_close(d, want_d, atol=tol, rtol=tol)
            torch.testing.assert_close(dz, want_dz, atol=tol, rtol=tol)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
