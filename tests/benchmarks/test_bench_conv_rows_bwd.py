"""benchmarks/bench_conv_rows_bwd.py's candidate kernel against autograd, in Triton's CPU interpreter where Triton is
installed (a subprocess: the interpreter is chosen when a kernel is compiled); its timing needs a GPU."""

import os
import subprocess
import sys
import textwrap

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")


def test_the_candidate_backward_equals_autograd_in_tritons_interpreter():
    """dx written into the sorted rows (and nowhere else), the weight and bias gradients: sequences spanning several
    chunks and parts, shorter than a part, shorter than the window; features not a multiple of the block; no bias."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from bench_conv_rows_bwd import conv_rows_bwd, reference

        g = torch.Generator().manual_seed(0)
        for b, l, f, bias in ((2, 150, 70, True), (3, 9, 8, False), (2, 3, 5, True)):
            n = b * l
            rows = torch.randn(n, 2 * f, generator=g)[:, :f]
            index = torch.argsort(torch.arange(n) % 3, stable=True).argsort()
            weight = torch.randn(f, 4, generator=g)
            bias_ = torch.randn(f, generator=g) if bias else None
            dout = torch.randn(f, n, generator=g)
            dxz = torch.full((n, 2 * f), 7.0)
            dw, db = conv_rows_bwd(rows, index, l, weight, bias_, dout, dxz[:, :f])
            want_dx, want_dw, want_db = reference(rows, index, l, weight, bias_, dout)
            torch.testing.assert_close(dxz[:, :f], want_dx, atol=1e-4, rtol=1e-4)
            assert torch.equal(dxz[:, f:], torch.full((n, f), 7.0))
            torch.testing.assert_close(dw, want_dw, atol=1e-3, rtol=1e-4)
            assert (db is None) == (bias_ is None)
            if bias_ is not None:
                torch.testing.assert_close(db, want_db, atol=1e-3, rtol=1e-4)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([BENCHMARKS, os.getcwd()]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
