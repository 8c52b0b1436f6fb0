"""Routed GEMMs over modality runs (`mom.routed_mm`): the tile schedule, the reference, and the Triton kernels."""

import pytest
import torch

from mom.routed_mm import ALIGN, routed_mm, routed_wgrad, run_tiles

LAYOUTS = {  # (modality, run length) along the flattened tokens
    "uneven": [(0, 13), (1, 70), (2, 5), (0, 64), (1, 3), (2, 29), (0, 1)],
    "absent": [(0, 100), (1, 60), (0, 9)],
    "single": [(2, 130)],
    "aligned": [(0, 64), (1, 256), (2, 128)] * 3,
}


def _ids(layout: str, repeat: int = 1, device="cpu") -> torch.Tensor:
    row = torch.cat([torch.full((n,), m) for m, n in LAYOUTS[layout]])
    return row.repeat(repeat).to(device)


def _oracle(weight, x, ids, bias=None):
    """Token by token: out[:, t] = W[m_t] x[:, t] + b[m_t]."""
    cols = [weight[m] @ x[:, t] + (0 if bias is None else bias[m]) for t, m in enumerate(ids.tolist())]
    return torch.stack(cols, 1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("block", [8, 64])
def test_tiles_cover_every_token_once_within_one_run(layout, block):
    ids = _ids(layout, repeat=2)
    tiles = run_tiles(ids, 3, block)
    base, lo, hi, mod = tiles.table.long()
    assert torch.all(base % ALIGN == 0) and torch.all(base <= lo) and torch.all(lo < hi)
    assert torch.all(hi <= base + block)
    owner = torch.zeros_like(ids)
    for _, s, e, m in zip(base.tolist(), lo.tolist(), hi.tolist(), mod.tolist()):
        assert torch.all(ids[s:e] == m)
        owner[s:e] += 1
    assert torch.all(owner == 1)
    assert torch.all(mod[:-1] <= mod[1:])  # grouped by modality...
    counts = torch.bincount(mod, minlength=3)
    assert tiles.offsets.tolist() == [0, *torch.cumsum(counts, 0).tolist()]  # ...with each group's range
    assert tiles.index(1).tolist() == (ids == 1).nonzero().squeeze(1).tolist()


def test_block_must_be_aligned():
    with pytest.raises(ValueError, match="multiple of"):
        run_tiles(torch.zeros(10, dtype=torch.long), 1, block=12)


def test_shape_mismatch_is_named():
    tiles = run_tiles(_ids("uneven"), 3)
    with pytest.raises(ValueError, match="do not match"):
        routed_mm(torch.zeros(2, 4, 5), torch.zeros(5, tiles.modality.numel()), tiles)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_matches_token_by_token_oracle(layout):
    ids = _ids(layout)
    tiles, n = run_tiles(ids, 3), ids.numel()
    w, b = torch.randn(3, 6, 5, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    x = torch.randn(n, 5, dtype=torch.float64).t()  # a token-major input read through its transpose
    torch.testing.assert_close(routed_mm(w, x, tiles, b), _oracle(w, x, ids, b))
    out = torch.empty(n, 6, dtype=torch.float64)
    routed_mm(w, x, tiles, b, out=out.t())  # written through a transposed view
    torch.testing.assert_close(out.t(), _oracle(w, x, ids, b))
    d = torch.randn(6, n, dtype=torch.float64)
    dw = routed_wgrad(d, x, tiles, torch.float64)
    for m in range(3):
        mask = (ids == m).double()
        torch.testing.assert_close(dw[m], (d * mask) @ x.t())  # zeros for an absent modality


# ---- the Triton kernels on a GPU, against the reference ---------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _case(layout, repeat, dtype, O, K):
    ids = _ids(layout, repeat, "cuda")
    tiles, n = run_tiles(ids, 3), ids.numel()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(3, O, K, device="cuda", generator=g).to(dtype)
    b = torch.randn(3, O, device="cuda", generator=g).to(dtype)
    x_tok = torch.randn(n, K, device="cuda", generator=g).to(dtype)  # token-major (n, K)
    x_feat = torch.randn(K, n, device="cuda", generator=g).to(dtype)  # feature-major (K, n)
    return ids, tiles, n, w, b, x_tok, x_feat


def _reference(fn, *args, **kwargs):
    """The same call on CPU copies in fp64 (the reference path), back on the GPU."""
    cpu = [a.cpu().double() if isinstance(a, torch.Tensor) else a for a in args]
    return fn(*cpu, **kwargs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("O,K", [(96, 64), (200, 72)])
def test_triton_routed_mm_matches_reference(layout, dtype, O, K):
    ids, tiles, n, w, b, x_tok, x_feat = _case(layout, 5, dtype, O, K)
    cpu_tiles = run_tiles(ids.cpu(), 3)
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=0.15, rtol=2e-2)
    # forward (token-major input, feature-major output) with bias
    out = routed_mm(w, x_tok.t(), tiles, b)
    ref = _reference(routed_mm, w, x_tok.t(), cpu_tiles, b)
    torch.testing.assert_close(out.double().cpu(), ref, **tol)
    # input gradient shape: transposed weights, feature-major input, written into a token-major tensor
    out_tok = torch.empty(n, K, device="cuda", dtype=dtype)
    d = torch.randn(O, n, device="cuda").to(dtype)
    routed_mm(w.transpose(1, 2), d, tiles, out=out_tok.t())
    ref = _reference(routed_mm, w.transpose(1, 2), d, cpu_tiles)
    torch.testing.assert_close(out_tok.t().double().cpu(), ref, **tol)
    # weight gradient, both operand layouts, in fp32
    for x in (x_tok.t(), x_feat):
        dw = routed_wgrad(d, x, tiles, torch.float32)
        ref = _reference(routed_wgrad, d, x, cpu_tiles, torch.float64)
        scale = ref.abs().max().clamp(min=1)
        assert ((dw.double().cpu() - ref).abs().max() / scale) < (1e-5 if dtype == torch.float32 else 1e-2)
    if layout == "absent":
        assert torch.count_nonzero(routed_wgrad(d, x_feat, tiles, torch.float32)[2]) == 0
