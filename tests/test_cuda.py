"""The CUDA backend (mamba-ssm / causal-conv1d kernels) against the pure-PyTorch reference, on a GPU."""

import pytest
import torch
from conftest import interleaved_ids, tiny_config

import mom
from mom import kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _needs_kernels():
    if kernels.backend_name(torch.device("cuda")) == "reference":
        pytest.skip("mamba-ssm CUDA kernels not importable")


def _config():
    return tiny_config(vocab_sizes=(200, 120, 80), d_model=64, n_layer=2, d_state=16, dt_rank=4)


def _run(model, ids, reference: bool, monkeypatch, autocast: bool = False):
    monkeypatch.setenv(kernels.FORCE_REFERENCE_ENV, "1" if reference else "0")
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


RUN_LAYOUTS = {
    "uneven": [(0, 64), (1, 256), (2, 128), (0, 17), (1, 3)],
    "absent": [(0, 100), (1, 60)],
    "single": [(2, 130)],
}


@pytest.mark.parametrize("layout", list(RUN_LAYOUTS))
def test_cuda_backend_matches_reference_fp32(layout, monkeypatch):
    model = mom.MoMForCausalLM(_config()).cuda()
    ids = interleaved_ids(model.config, 2, RUN_LAYOUTS[layout]).cuda()
    logits, loss, grads = _run(model, ids, False, monkeypatch)
    logits_ref, loss_ref, grads_ref = _run(model, ids, True, monkeypatch)
    torch.testing.assert_close(logits, logits_ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=5e-4, rtol=5e-3, msg=name)


def test_cuda_backend_bf16_close_to_fp32_reference(monkeypatch):
    model = mom.MoMForCausalLM(_config()).cuda()
    ids = interleaved_ids(model.config, 2, RUN_LAYOUTS["uneven"]).cuda()
    logits, loss, grads = _run(model, ids, False, monkeypatch, autocast=True)
    logits_ref, loss_ref, grads_ref = _run(model, ids, True, monkeypatch)
    torch.testing.assert_close(loss, loss_ref, atol=2e-2, rtol=1e-2)
    assert (logits - logits_ref).abs().max() < 0.1
    for name in grads:  # bf16: compare by relative norm of the difference
        rel = (grads[name] - grads_ref[name]).norm() / grads_ref[name].norm().clamp(min=1e-12)
        assert rel < 5e-2, (name, rel.item())


def test_cuda_generation_matches_full_forward(monkeypatch):
    monkeypatch.setenv(kernels.FORCE_REFERENCE_ENV, "0")
    model = mom.MoMForCausalLM(_config()).cuda().eval()
    ids = interleaved_ids(model.config, 2, [(0, 9), (1, 12), (2, 5)]).cuda()
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        steps = [out.logits] + [
            model(ids[:, t : t + 1], cache_params=out.cache_params, use_cache=True).logits
            for t in range(8, ids.shape[1])
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-3, rtol=1e-3)
    generated = model.generate(ids[:, :8], max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 13)


@pytest.mark.parametrize("layout", list(RUN_LAYOUTS))
def test_grouped_gemm_routing_matches_module_calls(layout, monkeypatch):
    from mom.routing import DISABLE_GROUPED_ENV, RoutedLinear, Routing

    layer = RoutedLinear(("text", "image", "speech"), 64, 96, bias=True).cuda()
    modality_ids = interleaved_ids(_config(), 2, RUN_LAYOUTS[layout]).cuda()
    modality_ids = _config().modality_of(modality_ids)
    routing = Routing.build(modality_ids, 3)
    x = torch.randn(*modality_ids.shape, 64, device="cuda")
    results = []
    for disabled in ("0", "1"):
        monkeypatch.setenv(DISABLE_GROUPED_ENV, disabled)
        assert (layer._grouped_dtype(x.bfloat16()) is None) == (disabled == "1")
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xi, routing)
        y.float().square().sum().backward()
        results.append((y.float(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = results
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gx, gx_ref, atol=5e-2, rtol=2e-2)
    for g, g_ref in zip(gp, gp_ref):
        torch.testing.assert_close(g, g_ref, atol=0.5, rtol=2e-2)


def test_lora_wrapped_experts_defer_to_module_calls(monkeypatch):
    from peft import LoraConfig, get_peft_model

    from mom.routing import DISABLE_GROUPED_ENV

    config = tiny_config(vocab_sizes=(200, 120, 80), d_model=64, n_layer=2, d_state=16, dt_rank=16)
    model = mom.MoMForCausalLM(config).cuda()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["in_proj.image"], init_lora_weights=False))
    in_proj = model.backbone.layers[0].mixer.in_proj
    out_proj = model.backbone.layers[0].mixer.out_proj
    probe = torch.zeros(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    assert in_proj._grouped_dtype(probe) is None  # adapters present: module calls
    assert out_proj._grouped_dtype(probe) == torch.bfloat16  # untouched projection keeps the fast path
    ids = interleaved_ids(config, 2, RUN_LAYOUTS["uneven"]).cuda()
    outs = []
    for disabled in ("0", "1"):
        monkeypatch.setenv(DISABLE_GROUPED_ENV, disabled)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(peft_model(input_ids=ids).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=5e-2, rtol=5e-2)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), peft_model.disable_adapter():
        base = peft_model(input_ids=ids).logits
    assert (base - outs[0]).abs().max() > 1e-3  # the adapter is honoured
