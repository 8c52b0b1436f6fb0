"""`mom.ops.routed_linear` against `RoutedLinear`'s module calls, on CPU: every row order, biases, absent modalities,
the grouped GEMMs on device offsets (``torch._grouped_mm`` on CPU fp32) and the per-expert ones (counts known, fp64)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mom.model.routing import RoutedLinear, Routing
from mom.ops import fused, grouped
from mom.ops import routed_linear as routed_linear_module
from mom.ops.routed_linear import routed_linear
from mom.ops.triton import gathered_mm

MODALITIES = ("text", "image", "speech")
LAYOUTS = {
    "uneven runs": torch.tensor([[0] * 5 + [1] * 8 + [2] * 4, [2] * 3 + [0] * 9 + [1] * 5]),
    "speech absent": torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 1, 1]] * 2),
    "one modality": torch.full((2, 17), 1),
}


def make_proj(bias: bool, dtype: torch.dtype, in_f: int = 8, out_f: int = 16) -> RoutedLinear:
    torch.manual_seed(0)
    return RoutedLinear(MODALITIES, in_f, out_f, bias).to(dtype)


def routes_of(routing: Routing, dtype: torch.dtype, counts_known: bool) -> fused.Routes:
    if counts_known:
        routing.set_counts(tuple(routing.device_counts.tolist()))
    return routing.routes(dtype)


def permuted(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[index].view(x.shape)


def run(proj, modality_ids, fast: bool, x_sorted=False, out_sorted=False, counts_known=False, dtype=torch.float32):
    """-> output in sequence order, input gradient in sequence order, parameter gradients."""
    routing = Routing.build(modality_ids, len(MODALITIES))
    x = torch.randn(*modality_ids.shape, proj.in_features, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(*modality_ids.shape, proj.out_features, dtype=dtype, generator=torch.Generator().manual_seed(2))
    x.requires_grad_(True)
    if fast:
        experts = list(proj.values())
        biases = [e.bias for e in experts] if experts[0].bias is not None else None
        x_in = permuted(x, routing.perm) if x_sorted else x
        out = routed_linear(x_in, [e.weight for e in experts], biases, routes_of(routing, dtype, counts_known),
                            x_sorted=x_sorted, out_sorted=out_sorted)
        out = permuted(out, routing.inv_perm) if out_sorted else out
    else:
        out = proj(x, routing)
    out.backward(grad)
    grads = {name: p.grad.clone() for name, p in proj.named_parameters()}
    proj.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bias, counts_known, dtype", [(False, False, torch.float32), (True, False, torch.float32),
                                                       (True, True, torch.float32), (False, True, torch.float64)])
def test_routed_linear_equals_the_module_calls(layout, bias, counts_known, dtype):
    """In every row order. fp32 without counts: torch._grouped_mm on the device offsets (forward, input and weight
    gradients); with counts or in fp64 (which torch._grouped_mm does not take): one GEMM per expert over the host's
    blocks."""
    proj = make_proj(bias, dtype)
    modality_ids = LAYOUTS[layout]
    out_ref, dx_ref, g_ref = run(proj, modality_ids, fast=False, dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    for x_sorted, out_sorted in [(False, False), (True, False), (False, True), (True, True)]:
        out, dx, g = run(proj, modality_ids, True, x_sorted, out_sorted, counts_known, dtype)
        torch.testing.assert_close(out, out_ref, **tol)
        torch.testing.assert_close(dx, dx_ref, **tol)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], msg=lambda m, name=name: f"{name}: {m}", **tol)
    for m in range(len(MODALITIES)):  # an absent modality's expert gets zero gradients
        if not (modality_ids == m).any():
            assert not g[f"{MODALITIES[m]}.weight"].any()


def test_grouped_path_reads_no_counts_from_the_host():
    """Without known counts, fp32 on CPU (which torch._grouped_mm takes), forward and backward never read them."""
    proj = make_proj(True, torch.float32)
    routing = Routing.build(LAYOUTS["uneven runs"], len(MODALITIES))
    routes = routing.routes(torch.float32)
    unreadable = grouped.HostCounts(reader=lambda: pytest.fail("the counts were read from the device"))
    routes = fused.Routes(routes.perm, routes.inv_perm, routes.offsets, unreadable, routes.expert_ids, routes.onehot)
    x = torch.randn(2, 17, 8, requires_grad=True)
    experts = list(proj.values())
    out = routed_linear(x, [e.weight for e in experts], [e.bias for e in experts], routes)
    out.sum().backward()
    assert unreadable.known is None and x.grad is not None and proj.image.weight.grad is not None


def test_routed_linear_names_bad_inputs():
    proj = make_proj(False, torch.float32)
    routes = Routing.build(LAYOUTS["uneven runs"], len(MODALITIES)).routes(torch.float32)
    weights = [e.weight for e in proj.values()]
    x = torch.randn(2, 17, 8)
    with pytest.raises(ValueError, match="2 experts but routes for 3"):
        routed_linear(x, weights[:2], None, routes)
    with pytest.raises(ValueError, match="differ in shape"):
        routed_linear(x, [weights[0], weights[1], weights[2][:, :4]], None, routes)
    with pytest.raises(ValueError, match="biases of shapes"):
        routed_linear(x, weights, [torch.zeros(16)] * 2, routes)
    with pytest.raises(ValueError, match=r"input \(2, 16, 8\) for experts of 8 inputs and routes for 34 rows"):
        routed_linear(x[:, :16], weights, None, routes)


class _ReferenceGatheredMM:
    """`mom.ops.triton.gathered_mm` as `routed_linear` sees it on a GPU (``kernel_applies``), its ops on CPU."""

    def __init__(self, use_kernel: bool) -> None:
        self.use_kernel = use_kernel
        self.calls = 0

    def kernel_applies(self, a, w) -> bool:
        return True

    def gathered_mm(self, *args, **kwargs):
        self.calls += 1
        return gathered_mm.gathered_mm(*args, **kwargs, use_kernel=self.use_kernel)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_gathers_equal_the_module_calls(layout, bias, monkeypatch):
    """Where the kernel applies (bf16 on CUDA), output rows and input-gradient rows going to sequence order are
    written there by the GEMM (`gathered_mm`), and a forward without gradients reads its input rows from sequence
    order in the GEMM: the same results in every row order (the kernel's PyTorch ops here; the kernel itself in
    tests/ops/test_gathered_mm.py and on a GPU in tests/ops/test_cuda.py)."""
    kernels = _ReferenceGatheredMM(use_kernel=False)
    monkeypatch.setattr(routed_linear_module, "gmm", kernels)
    proj = make_proj(bias, torch.float64)
    modality_ids = LAYOUTS[layout]
    out_ref, dx_ref, g_ref = run(proj, modality_ids, fast=False, dtype=torch.float64)
    for x_sorted, out_sorted in [(False, False), (True, False), (False, True)]:
        out, dx, g = run(proj, modality_ids, True, x_sorted, out_sorted, False, torch.float64)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(dx, dx_ref)
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], msg=lambda m, name=name: f"{name}: {m}")
    # (x, out) in sequence order: the output and the input gradient scattered; x sorted: the output; out sorted:
    # the input gradient (its forward gathers x for the weight gradients)
    assert kernels.calls == 2 + 1 + 1
    routing = Routing.build(modality_ids, len(MODALITIES))
    x = torch.randn(*modality_ids.shape, proj.in_features, dtype=torch.float64)
    experts = list(proj.values())
    with torch.no_grad():  # no backward: the GEMM gathers x's rows itself
        out = routed_linear(x, [e.weight for e in experts], [e.bias for e in experts] if bias else None,
                            routing.routes(torch.float64), out_sorted=True)
        torch.testing.assert_close(permuted(out, routing.inv_perm), proj(x, routing))
    assert kernels.calls == 5


def test_the_fused_gathers_with_the_kernel_in_tritons_interpreter():
    """The same with `gathered_mm`'s Triton kernel run by Triton's CPU interpreter (fp32: bf16 tl.dot does not run
    there), in a subprocess (the interpreter is chosen when the kernel is compiled)."""
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from mom.model.routing import RoutedLinear, Routing
        from mom.ops import routed_linear as rl
        from mom.ops.triton import gathered_mm

        class Kernel:
            calls = 0
            kernel_applies = staticmethod(lambda a, w: True)
            def gathered_mm(self, *args, **kwargs):
                Kernel.calls += 1
                return gathered_mm.gathered_mm(*args, **kwargs, tiles=gathered_mm.Tiles(16, 16, 16, 2, 1, 1),
                                               use_kernel=True)

        rl.gmm = Kernel()
        torch.manual_seed(0)
        proj = RoutedLinear(("text", "image", "speech"), 24, 40, True)
        ids = torch.tensor([[0] * 5 + [1] * 20 + [2] * 4, [2] * 3 + [0] * 19 + [1] * 7])
        routing = Routing.build(ids, 3)
        experts = list(proj.values())
        x = torch.randn(2, 29, 24, requires_grad=True)
        out = rl.routed_linear(x, [e.weight for e in experts], [e.bias for e in experts], routing.routes(torch.float32))
        out.sum().backward()
        want_x = x.detach().clone().requires_grad_(True)
        want = proj(want_x, routing)
        want.sum().backward()
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x.grad, want_x.grad, atol=1e-4, rtol=1e-4)
        assert Kernel.calls == 2, Kernel.calls
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
