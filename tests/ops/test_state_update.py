"""`mom.ops.triton.state_update`: a decode step's Δ projection and state update. The PyTorch ops against dt_proj
through each row's own expert (a per-row loop) followed by the reference state update; the Triton kernel against them
on a GPU (tests/ops/test_cuda.py) and, where Triton is installed, in Triton's CPU interpreter (a subprocess)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mom.ops import reference
from mom.ops.triton.state_update import MAX_EXPERTS, kernel_applies, routed_state_update


def _case(b: int, di: int, n: int, r: int, experts: int, z: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_dbl = torch.randn(b, r + 2 * n, generator=g)
    dt, B, C = x_dbl.split([r, n, n], dim=-1)  # strided views, as a step's x_proj output
    return dict(
        state=torch.randn(b, di, n, generator=g), x=torch.randn(b, di, generator=g), dt_in=dt,
        weights=[torch.randn(di, r, generator=g) / r**0.5 for _ in range(experts)],
        biases=[torch.randn(di, generator=g) for _ in range(experts)],
        expert_ids=torch.randint(0, experts, (b,), generator=g), A_log=torch.rand(di, n, generator=g) * 3,
        B=B, C=C, D=torch.randn(di, generator=g), z=torch.randn(b, 2 * di, generator=g)[:, di:] if z else None,
    )


@pytest.mark.parametrize("experts, z", [(3, True), (1, True), (2, False)])
def test_equals_dt_proj_per_row_then_the_reference_state_update(experts, z):
    case = _case(5, 12, 4, 3, experts, z)
    ref_state = case["state"].clone()
    got = routed_state_update(**case)
    dt = torch.stack([case["dt_in"][i] @ case["weights"][e].T + case["biases"][e]
                      for i, e in enumerate(case["expert_ids"].tolist() if experts > 1 else [0] * 5)])
    want = reference.selective_state_update(ref_state, case["x"], dt, -torch.exp(case["A_log"]), case["B"], case["C"],
                                            case["D"], case["z"], dt_softplus=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(case["state"], ref_state)
    assert not torch.equal(ref_state, _case(5, 12, 4, 3, experts, z)["state"])  # the state did move


def test_softplus_is_linear_above_20_as_torchs():
    case = _case(2, 8, 4, 3, 1, True)
    case["biases"] = [torch.full((8,), 30.0)]
    case["weights"] = [torch.zeros(8, 3)]
    case["A_log"] = torch.zeros(8, 4)  # A = -1: the state decays by exp(-Δ) = exp(-30)
    state0 = case["state"].clone()
    routed_state_update(**case)
    expected = state0 * torch.exp(torch.tensor(-30.0)) + 30.0 * (case["x"][..., None] * case["B"][:, None, :])
    torch.testing.assert_close(case["state"], expected)
    assert F.softplus(torch.tensor(30.0)) == 30.0


def test_the_kernel_does_not_apply_off_cuda_or_to_too_many_experts():
    case = _case(2, 8, 4, 3, 3, True)
    args = (case["state"], case["x"], case["dt_in"], case["weights"], case["A_log"], case["D"], case["B"], case["C"],
            case["z"])
    assert not kernel_applies(*args)  # CPU tensors: the PyTorch ops
    too_many = [torch.randn(8, 3) for _ in range(MAX_EXPERTS + 1)]
    assert not kernel_applies(*args[:3], too_many, *args[4:])


@pytest.mark.parametrize("rows", [1, 7])
def test_the_kernel_in_tritons_interpreter_equals_the_pytorch_ops(rows):
    pytest.importorskip("triton")
    script = textwrap.dedent(f"""
        import torch
        from mom.ops.triton.state_update import routed_state_update
        g = torch.Generator().manual_seed(0)
        for di, n, r, experts, z in [(40, 16, 5, 3, True), (70, 7, 48, 1, True), (33, 16, 3, 4, False)]:
            x_dbl = torch.randn({rows}, r + 2 * n, generator=g)
            dt, B, C = x_dbl.split([r, n, n], dim=-1)
            ws = [torch.randn(di, r, generator=g) / r**0.5 for _ in range(experts)]
            bs = [torch.randn(di, generator=g) for _ in range(experts)]
            ids = torch.randint(0, experts, ({rows},), generator=g)
            A_log, D = torch.rand(di, n, generator=g) * 3, torch.randn(di, generator=g)
            x = torch.randn({rows}, di, generator=g)
            zz = torch.randn({rows}, 2 * di, generator=g)[:, di:] if z else None
            state = torch.randn({rows}, di, n, generator=g)
            ref_state = state.clone()
            got = routed_state_update(state, x, dt, ws, bs, ids, A_log, B, C, D, zz, use_kernel=True)
            want = routed_state_update(ref_state, x, dt, ws, bs, ids, A_log, B, C, D, zz, use_kernel=False)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(state, ref_state)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
