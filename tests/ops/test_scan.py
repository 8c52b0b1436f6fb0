import pytest
import torch
import torch.nn.functional as F

from mom.ops import backend, reference


def loop_scan(u, delta, A, B, C, D, z, delta_bias, h0=None):
    """Oracle: the recurrence one position at a time (float64)."""
    delta = F.softplus(delta + delta_bias[:, None])
    b, d, l = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=u.dtype) if h0 is None else h0.clone()
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    y = torch.stack(ys, dim=-1) * F.silu(z)
    return y, h


def random_inputs(b=2, d=5, n=3, l=37):
    g = dict(dtype=torch.float64)
    return dict(
        u=torch.randn(b, d, l, **g),
        delta=torch.randn(b, d, l, **g) - 1.0,
        A=-torch.rand(d, n, **g) * 4 - 0.1,
        B=torch.randn(b, n, l, **g),
        C=torch.randn(b, n, l, **g),
        D=torch.randn(d, **g),
        z=torch.randn(b, d, l, **g),
        delta_bias=torch.randn(d, **g) * 0.5,
    )


@pytest.mark.parametrize("l", [1, 2, 5, 37, 64, 100, 130])
def test_chunked_scan_matches_loop(l):
    inp = random_inputs(l=l)
    h0 = torch.randn(2, 5, 3, dtype=torch.float64)
    y, last = reference.selective_scan(**inp, delta_softplus=True, return_last_state=True, initial_state=h0)
    y_ref, last_ref = loop_scan(**inp, h0=h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(last, last_ref.float() if last.dtype == torch.float32 else last_ref)


@pytest.mark.parametrize("l", [1, 7, 45])
def test_chunked_scan_gradients_match_loop(l):
    inp = {k: v.requires_grad_() for k, v in random_inputs(l=l).items()}
    h0 = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    y, last = reference.selective_scan(**inp, delta_softplus=True, return_last_state=True, initial_state=h0)
    loss = y.pow(2).sum() + last.sum()
    grads = torch.autograd.grad(loss, [*inp.values(), h0])
    inp_ref = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    h0_ref = h0.detach().clone().requires_grad_()
    y_ref, last_ref = loop_scan(**inp_ref, h0=h0_ref)
    grads_ref = torch.autograd.grad(y_ref.pow(2).sum() + last_ref.sum(), [*inp_ref.values(), h0_ref])
    for name, g, g_ref in zip([*inp, "h0"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, msg=name)


def test_linear_recurrence_gradcheck():
    a = torch.rand(1, 2, 11, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 2, 11, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.linear_recurrence, (a, x, h0))


def test_state_update_continues_the_scan():
    inp = random_inputs(l=12)
    y_full, last = reference.selective_scan(**inp, delta_softplus=True, return_last_state=True)
    # the same sequence: first 11 by scan, the 12th by one recurrent step
    head = {k: (v[..., :11] if v.dim() == 3 else v) for k, v in inp.items()}
    _, state = reference.selective_scan(**head, delta_softplus=True, return_last_state=True)
    y_last = reference.selective_state_update(
        state, inp["u"][..., 11], inp["delta"][..., 11], inp["A"], inp["B"][..., 11], inp["C"][..., 11],
        inp["D"], inp["z"][..., 11], inp["delta_bias"], dt_softplus=True,
    )
    torch.testing.assert_close(y_last, y_full[..., 11])
    torch.testing.assert_close(state, last)


def test_conv_update_matches_full_conv():
    x = torch.randn(2, 6, 9)
    w, bias = torch.randn(6, 4), torch.randn(6)
    full = backend.causal_conv1d(x, w, bias)
    state = torch.zeros(2, 6, 4)
    steps = torch.stack([backend.causal_conv1d_update(x[..., t], state, w, bias) for t in range(9)], dim=-1)
    torch.testing.assert_close(steps, full)


def test_reference_backend_on_cpu_and_forced(monkeypatch):
    assert backend.backend_name(torch.device("cpu")) == "reference"
    monkeypatch.setenv(backend.FORCE_REFERENCE_ENV, "1")
    assert backend.backend_name(torch.device("cuda")) == "reference"


def test_document_reset_equals_separate_sequences():
    inp = random_inputs(l=20)
    reset = torch.zeros(2, 20, dtype=torch.bool)
    reset[:, 7] = reset[:, 15] = True
    y = reference.selective_scan(**inp, delta_softplus=True, reset=reset)
    w, bias = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    conv = backend.causal_conv1d(inp["u"], w, bias, reset)
    for lo, hi in ((0, 7), (7, 15), (15, 20)):
        part = {k: (v[..., lo:hi] if v.dim() == 3 else v) for k, v in inp.items()}
        torch.testing.assert_close(y[..., lo:hi], reference.selective_scan(**part, delta_softplus=True))
        torch.testing.assert_close(conv[..., lo:hi], backend.causal_conv1d(inp["u"][..., lo:hi], w, bias))
