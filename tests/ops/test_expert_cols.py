"""`mom.ops.triton.expert_cols`: each token's columns to or from its expert's block. The PyTorch ops against a
per-token loop on CPU; the Triton kernel against them in Triton's CPU interpreter where Triton is installed (a
subprocess: the interpreter is chosen when a kernel is compiled) and on a GPU (tests/ops/test_cuda.py)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mom.ops.triton.expert_cols import route_cols, split_x_proj


def _case(m_x: int, m_dt: int, b: int, l: int, rank: int, n_state: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, rows = b * l, rank + 2 * n_state
    ids = torch.randint(0, 3, (n,), generator=g)
    x_all = torch.randn(m_x * rows, n, generator=g, dtype=torch.float64)
    select = torch.nn.functional.one_hot(ids, 3).t().to(torch.float64)
    return x_all, ids, select


def _loop(x_all, m_x, ids, rank, m_dt, b, l):
    """Per token: its own expert's rows (block ids[t], or the one block), the Δ-rank ones into block ids[t] of
    (m_dt * rank, n) (or the one block), B and C into (b, 2N, l)."""
    n = ids.shape[0]
    rows = x_all.shape[0] // m_x
    dt = torch.zeros(m_dt * rank, n, dtype=x_all.dtype)
    bc = torch.zeros(b, rows - rank, l, dtype=x_all.dtype)
    for t in range(n):
        e = int(ids[t])
        own = x_all[(e if m_x > 1 else 0) * rows : (e if m_x > 1 else 0) * rows + rows, t]
        block = e if m_dt > 1 else 0
        dt[block * rank : block * rank + rank, t] = own[:rank]
        bc[t // l, :, t % l] = own[rank:]
    return dt, bc


@pytest.mark.parametrize("m_x,m_dt", [(1, 1), (1, 3), (3, 1), (3, 3)])
def test_split_x_proj_gives_each_token_its_own_experts_rows(m_x, m_dt):
    b, l, rank, n_state = 2, 5, 3, 2
    x_all, ids, select = _case(m_x, m_dt, b, l, rank, n_state)
    dt = torch.full((m_dt * rank + 4, b * l), 7.0, dtype=torch.float64)  # rows after the routed ones: not written
    bc = torch.full((b, 2 * n_state, l), 7.0, dtype=torch.float64)
    split_x_proj(x_all, m_x, ids, select, rank, dt[: m_dt * rank], bc)
    want_dt, want_bc = _loop(x_all, m_x, ids, rank, m_dt, b, l)
    assert torch.equal(dt[: m_dt * rank], want_dt) and torch.equal(bc, want_bc)
    assert (dt[m_dt * rank :] == 7.0).all()


def test_route_cols_spreads_into_blocks_and_gathers_back():
    """M blocks from a shared source (broadcast, zeros off each token's block), and each token's column back."""
    b, l, f = 2, 3, 4
    _, ids, select = _case(1, 1, b, l, 1, 1)
    src = torch.randn(1, f, b, l, dtype=torch.float64)
    spread = torch.empty(3, f, b, l, dtype=torch.float64)
    route_cols(src, select, ids, spread)
    for t in range(b * l):
        for m in range(3):
            col = spread[m, :, t // l, t % l]
            assert torch.equal(col, src[0, :, t // l, t % l] if m == ids[t] else torch.zeros(f, dtype=col.dtype))
    back = torch.empty(1, f, b, l, dtype=torch.float64)
    route_cols(spread, select, ids, back)
    assert torch.equal(back, src)


def test_bad_shapes_are_named():
    x_all, ids, select = _case(3, 3, 2, 5, 3, 2)
    with pytest.raises(ValueError, match="split_x_proj"):
        split_x_proj(x_all, 3, ids, select, 3, torch.empty(9, 10, dtype=torch.float64),
                     torch.empty(2, 5, 5, dtype=torch.float64))  # B and C of 2N = 5 rows where x_all has 4


def test_the_kernel_in_tritons_interpreter_equals_the_pytorch_ops():
    """Shared and routed x_proj and dt_proj; tokens a multiple of the tile or not; fp32 and bf16; dt's rows in a
    wider matrix (its constant rows after them untouched)."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from mom.ops.triton import expert_cols
        from mom.ops.triton.expert_cols import TILE_T, split_x_proj

        g = torch.Generator().manual_seed(0)
        for dtype, m_x, m_dt, (b, l), rank, n_state in ((torch.float32, 3, 3, (2, 75), 5, 4),
                                                        (torch.bfloat16, 3, 3, (1, TILE_T), 48, 16),
                                                        (torch.float32, 1, 3, (3, 7), 4, 2),
                                                        (torch.float32, 3, 1, (2, 9), 3, 8),
                                                        (torch.float32, 1, 1, (1, 5), 2, 1)):
            n, rows = b * l, rank + 2 * n_state
            ids = torch.randint(0, 3, (n,), generator=g)
            select = torch.nn.functional.one_hot(ids, 3).t().to(dtype)
            x_all = torch.randn(m_x * rows, n, generator=g).to(dtype)
            want_dt, got_dt = (torch.full((m_dt * rank + 3, n), 7.0, dtype=dtype) for _ in range(2))
            want_bc, got_bc = (torch.full((b, 2 * n_state, l), 7.0, dtype=dtype) for _ in range(2))
            split_x_proj(x_all, m_x, ids, select, rank, want_dt[: m_dt * rank], want_bc)  # CPU: the PyTorch ops
            expert_cols._launch(x_all, m_x, ids, rank, got_dt[: m_dt * rank], got_bc)
            assert torch.equal(got_dt, want_dt) and torch.equal(got_bc, want_bc), (dtype, m_x, m_dt, b, l)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
