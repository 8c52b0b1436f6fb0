"""`mom.ops.triton.flatcast`: tensors flattened and cast into one buffer, one after another or each as the columns of
a matrix (`Place`); in PyTorch ops on CPU, and the kernel in Triton's CPU interpreter where Triton is installed (the
GPU test: tests/ops/test_cuda.py)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import side_by_side_places

from mom.ops.triton.flatcast import Place, flat_cast, runs


def test_runs_are_a_cat_and_a_cast():
    tensors = [torch.randn(3, 4), torch.randn(0), torch.randn(5)]
    assert runs((12, 0, 5)) == ((Place(0, 12, 0), Place(12, 1, 0), Place(12, 5, 0)), 17)
    assert torch.equal(flat_cast(tensors, torch.bfloat16), torch.cat([t.reshape(-1) for t in tensors]).bfloat16())


def test_places_write_tensors_as_the_columns_of_a_matrix():
    tensors, places, want = side_by_side_places()
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(flat_cast(tensors, dtype, places, want.numel()), want.to(dtype))
    with pytest.raises(ValueError, match="8 tensors need as many places and a size, got 7 places"):
        flat_cast(tensors, torch.float32, places[:-1], want.numel())
    with pytest.raises(ValueError, match=r"tensor 1 of 10 elements cannot go at Place\(start=7, cols=3, stride=12\)"):
        flat_cast(tensors, torch.float32, [places[0], Place(7, 3, 12), *places[2:]], want.numel())


def test_kernel_in_tritons_interpreter_equals_the_pytorch_ops():
    """The kernel (a subprocess: Triton's interpreter is chosen when a kernel is compiled), runs and places, fp32 to
    fp32 and fp16, blocks smaller than the tensors."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        import triton.language as tl
        from mom.ops.triton import flatcast
        from helpers import side_by_side_places

        def run(tensors, dtype, places, size, block=4):  # as flat_cast launches it, with a smaller block
            table = flatcast._table(tuple(t.data_ptr() for t in tensors), tuple(t.numel() for t in tensors),
                                    tuple(places), torch.device("cpu"))
            out = torch.zeros(size, dtype=dtype)
            grid = (-(-max(t.numel() for t in tensors) // block), len(tensors), 1)
            flatcast._kernel()[grid](table, out, SRC=tl.float32, BLOCK=block)
            return out

        tensors, places, want = side_by_side_places()
        for dtype in (torch.float32, torch.float16):  # (the interpreter rounds to bf16 otherwise than the GPU)
            assert torch.equal(run(tensors, dtype, places, want.numel()), want.to(dtype))
            plain = [torch.randn(3, 5), torch.randn(9)]
            want_plain = torch.cat([plain[0].reshape(-1), plain[1]]).to(dtype)
            assert torch.equal(run(plain, dtype, *flatcast.runs((15, 9))), want_plain)
        print("ok")
    """)
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [os.path.dirname(os.path.dirname(here)), os.path.dirname(here)]  # the repository (mom), tests (helpers)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(paths))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
