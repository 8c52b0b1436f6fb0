"""`mom.ops.triton.gathered_mm`: its PyTorch ops against a per-row loop (the oracle), on CPU; the Triton kernels
against those ops in Triton's CPU interpreter (a subprocess: the interpreter is chosen when a kernel is compiled);
on a GPU in tests/ops/test_cuda.py."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mom.ops.triton.gathered_mm import gathered_mm


def _case(counts, K=12, O=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, E = sum(counts), len(counts)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))  # each sorted row's expert
    return (g, n, ends, expert, torch.randn(n, K, generator=g, dtype=torch.float64),
            torch.randn(E, K, O, generator=g, dtype=torch.float64), torch.randn(E, O, generator=g, dtype=torch.float64),
            torch.randperm(n, generator=g))


@pytest.mark.parametrize("counts", [(5, 0, 9), (14,), (0, 3, 4, 7)])
@pytest.mark.parametrize("gather, scatter", [(False, False), (True, False), (False, True), (True, True)])
def test_gathered_mm_equals_a_loop_over_rows(counts, gather, scatter):
    _, n, ends, expert, a, w, b, perm = _case(counts)
    out = gathered_mm(a, w, ends, b, a_index=perm if gather else None, out_index=perm if scatter else None)
    want = torch.empty(n, w.shape[2], dtype=torch.float64)
    for j in range(n):
        src = perm[j] if gather else j
        want[perm[j] if scatter else j] = a[src] @ w[expert[j]] + b[expert[j]]
    torch.testing.assert_close(out, want)


def test_gathered_mm_names_bad_inputs():
    _, n, ends, _, a, w, b, perm = _case((5, 0, 9))
    with pytest.raises(ValueError, match="experts of 12 inputs"):
        gathered_mm(a[:, :5], w, ends)
    with pytest.raises(ValueError, match="ends"):
        gathered_mm(a, w, ends[:2])
    with pytest.raises(ValueError, match="bias"):
        gathered_mm(a, w, ends, b[:, :3])
    with pytest.raises(ValueError, match="out_index of 4 rows"):
        gathered_mm(a, w, ends, out_index=perm[:4])


def test_the_kernels_in_tritons_interpreter_equal_the_pytorch_ops():
    """fp32 (bf16 tl.dot does not run in the interpreter), tiles smaller than the blocks and straddling their ends,
    an expert without rows, strided operands, uneven contraction lengths."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from mom.ops.triton.gathered_mm import Tiles, gathered_mm
        g = torch.Generator().manual_seed(0)
        tiles = Tiles(m=16, n=16, k=16, group=2, warps=1, stages=1)
        for counts, K, O in [((17, 0, 33), 40, 24), ((40,), 16, 20), ((3, 30, 1, 9), 21, 33)]:
            n, E = sum(counts), len(counts)
            ends = torch.tensor(counts).cumsum(0).to(torch.int32)
            a = torch.randn(n, 2 * K, generator=g)[:, :K]  # rows with a stride
            w = torch.randn(E, O, K, generator=g).transpose(1, 2)  # nn.Linear weights read transposed
            b = torch.randn(E, O, generator=g)
            perm = torch.randperm(n, generator=g)
            for ai, oi, bias in [(None, None, b), (perm, None, None), (None, perm, b), (perm, perm.flip(0), b)]:
                want = gathered_mm(a, w, ends, bias, ai, oi, use_kernel=False)
                got = gathered_mm(a, w, ends, bias, ai, oi, tiles=tiles, use_kernel=True)
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
