"""`mom.ops.triton.conv_rows`: the causal depthwise conv read through a permutation from token-major rows. The PyTorch
ops against a per-tap loop in fp64 on CPU; the Triton kernel against them in Triton's CPU interpreter where Triton is
installed (a subprocess: the interpreter is chosen when a kernel is compiled) and against causal-conv1d on a GPU
(tests/ops/test_cuda.py)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mom.ops.triton.conv_rows import conv_rows_t, write_window


def _case(b: int, l: int, f: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = b * l
    rows = torch.randn(n, 2 * f, generator=g, dtype=torch.float64)[:, :f]  # x's half of wider rows
    index = torch.randperm(n, generator=g)  # sequence-order token -> its row
    return rows, index, torch.randn(f, w, generator=g, dtype=torch.float64), torch.randn(f, generator=g,
                                                                                         dtype=torch.float64)


def _loop(rows, index, l, weight, bias):
    """silu(conv) per position and tap: (f, n)."""
    f, w = weight.shape
    x = rows[index].view(-1, l, f)  # (b, l, f) sequence order
    y = torch.zeros_like(x)
    for k in range(w):  # tap k reads position p - (w - 1 - k)
        shift = w - 1 - k
        y[:, shift:] += x[:, : l - shift] * weight[:, k] if shift < l else 0
    y = y + (bias if bias is not None else 0)
    return F.silu(y).reshape(-1, f).t()


@pytest.mark.parametrize("l", [1, 3, 4, 37])
@pytest.mark.parametrize("bias", [False, True])
def test_each_position_reads_its_window_through_the_index(l, bias):
    rows, index, weight, b_ = _case(3, l, 5, 4)
    got = conv_rows_t(rows, index, l, weight, b_ if bias else None)
    assert got.shape == (5, 3 * l) and got.is_contiguous()
    torch.testing.assert_close(got, _loop(rows, index, l, weight, b_ if bias else None))


def test_keep_zeroes_padding_and_the_window_holds_the_last_inputs():
    rows, index, weight, bias = _case(2, 6, 5, 4)
    keep = torch.ones(12, dtype=torch.float64)
    keep[[0, 1, 7]] = 0
    window = torch.full((2, 5, 4), 9.0, dtype=torch.float64)
    got = conv_rows_t(rows, index, 6, weight, bias, keep=keep, window=window)
    torch.testing.assert_close(got, _loop(rows, index, 6, weight, bias) * keep)
    x = rows[index].view(2, 6, 5).transpose(1, 2)  # (b, f, l)
    torch.testing.assert_close(window, x[..., -4:])
    short = torch.full((2, 5, 4), 9.0, dtype=torch.float64)  # a prompt shorter than the window: zeros before it
    conv_rows_t(rows[:4], index[:4] % 4, 2, weight, bias, window=short)
    x = rows[:4][index[:4] % 4].view(2, 2, 5).transpose(1, 2)
    torch.testing.assert_close(short, torch.cat([torch.zeros(2, 5, 2, dtype=torch.float64), x], dim=-1))


def test_write_window_pads_a_short_sequence_with_zeros():
    window = torch.ones(1, 2, 4)
    write_window(window, torch.arange(6.0).view(1, 2, 3))
    assert window.tolist() == [[[0, 0, 1, 2], [0, 3, 4, 5]]]


def test_bad_shapes_are_named():
    rows, index, weight, bias = _case(2, 6, 5, 4)
    with pytest.raises(ValueError, match="whole sequences of length 5"):
        conv_rows_t(rows, index, 5, weight, bias)
    with pytest.raises(ValueError, match="weight"):
        conv_rows_t(rows, index, 6, weight[:4], bias)
    with pytest.raises(ValueError, match="window"):
        conv_rows_t(rows, index, 6, weight, bias, window=torch.zeros(2, 5, 3, dtype=torch.float64))


def test_the_kernel_in_tritons_interpreter_equals_the_pytorch_ops():
    """Sequences longer and shorter than a tile and than the window, or whole tiles; features a multiple of the tile
    or not; strided rows, bias or none, keep, the window; fp32 and bf16; 32- and 64-bit offsets."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from mom.ops.triton import conv_rows
        from mom.ops.triton.conv_rows import TILE_F, TILE_L, conv_rows_t

        g = torch.Generator().manual_seed(0)
        for dtype, (b, l, f), bias, keep, i32 in ((torch.float32, (2, 150, 140), True, True, True),
                                                  (torch.float32, (3, 2, 9), False, False, False),
                                                  (torch.bfloat16, (2, 65, TILE_F), True, False, True),
                                                  (torch.float32, (2, 2 * TILE_L, 2 * TILE_F), True, True, True),
                                                  (torch.float32, (1, TILE_L, TILE_F), False, True, False)):
            n = b * l
            rows = torch.randn(n + 3, 2 * f, generator=g).to(dtype)[:, f:]
            index = torch.randperm(n + 3, generator=g)[:n]
            weight = torch.randn(f, 4, generator=g).to(dtype)
            bias_ = torch.randn(f, generator=g).to(dtype) if bias else None
            keep_ = (torch.rand(n, generator=g) > 0.2).to(dtype) if keep else None
            want_window, window = torch.zeros(b, f, 4, dtype=dtype), torch.ones(b, f, 4, dtype=dtype)
            want = conv_rows_t(rows.float(), index, l, weight.float(), None if bias_ is None else bias_.float(),
                               None if keep_ is None else keep_.float(), want_window)
            got = conv_rows._launch(rows, index, l, weight, bias_, keep_, window, i32=i32)
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # one rounding of the fp32 result
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
            assert torch.equal(window.float(), want_window)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
