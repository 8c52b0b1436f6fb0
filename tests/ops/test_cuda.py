"""The CUDA backend (mamba-ssm / causal-conv1d kernels) against the pure-PyTorch reference, on a GPU."""

import pytest
import torch
from helpers import interleaved_ids, needs_generate_cache, tiny_config

import mom
from mom.ops import backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _needs_kernels():
    if backend.backend_name(torch.device("cuda")) == "reference":
        pytest.skip("mamba-ssm CUDA kernels not importable")


def _config(**overrides):
    return tiny_config(vocab_sizes=(200, 120, 80), d_model=64, n_layer=2, d_state=16, dt_rank=4, **overrides)


def _run(model, ids, reference: bool, monkeypatch, autocast: bool = False):
    monkeypatch.setenv(backend.FORCE_REFERENCE_ENV, "1" if reference else "0")
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


@pytest.mark.parametrize("decouple", [("in_proj", "x_proj", "dt_proj", "out_proj"), ("in_proj", "out_proj")])
def test_cuda_generation_matches_full_forward(decouple, monkeypatch):
    """Decode steps (each layer's Δ projection and state update in one kernel, `mom.ops.triton.state_update`, for
    a routed or a shared dt_proj; the conv step in routed in_proj's kernel) give the full forward's logits."""
    from mom.ops.triton import routed_rows, state_update

    monkeypatch.setenv(backend.FORCE_REFERENCE_ENV, "0")
    calls, convs = [], []
    monkeypatch.setattr(state_update, "routed_state_update",
                        lambda *a, _f=state_update.routed_state_update, **k: calls.append(1) or _f(*a, **k))
    monkeypatch.setattr(routed_rows, "routed_rows_linear", lambda *a, _f=routed_rows.routed_rows_linear, **k: (
        convs.append(k.get("conv") is not None) or _f(*a, **k)))
    model = mom.MoMForCausalLM(_config(decouple=decouple)).cuda().eval()
    ids = interleaved_ids(model.config, 2, [(0, 9), (1, 12), (2, 5)]).cuda()
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        steps = [out.logits] + [
            model(ids[:, t : t + 1], cache=out.cache, use_cache=True).logits
            for t in range(8, ids.shape[1])
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-3, rtol=1e-3)
    layer_steps = model.config.n_layer * (ids.shape[1] - 8)
    assert len(calls) == layer_steps and sum(convs) == layer_steps  # every layer of every step took the kernels
    generated = model.generate(ids[:, :8], max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 13)



def test_prefill_on_the_experts_own_bf16_weights_equals_the_stacked_copy(monkeypatch):
    """A bf16 model's prefill whose routed in_proj and out_proj run per expert reads the experts' own weights
    (`fused._own_weights`: no stacked copy): the same last logits and cache states as on the stacked copy."""
    from mom.ops import fused, grouped
    from mom.ops.projections import Projection

    monkeypatch.setenv(backend.FORCE_REFERENCE_ENV, "0")
    monkeypatch.setattr(grouped, "PER_EXPERT_MACS", 0)  # every routed GEMM runs per expert
    model = mom.MoMForCausalLM(_config()).cuda().to(torch.bfloat16).eval()
    ids = interleaved_ids(model.config, 2, RUN_LAYOUTS["uneven"]).cuda()
    owned = []
    monkeypatch.setattr(fused, "_own_weights", lambda *a, _f=fused._own_weights: owned.append(_f(*a)) or owned[-1])
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    assert len(owned) == model.config.n_layer
    assert all(o[Projection.in_proj] and o[Projection.out_proj] for o in owned)
    monkeypatch.setattr(fused, "_own_weights", lambda *a: (False,) * len(Projection))
    with torch.no_grad():
        ref = model(ids, use_cache=True, logits_to_keep=1)
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-2, rtol=2e-2)
    for got, want in zip(out.cache.conv_states + out.cache.ssm_states, ref.cache.conv_states + ref.cache.ssm_states):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def _run_path(model, ids, fast: bool, autocast: bool):
    for layer in model.backbone.layers:
        layer.mixer.use_fast_path = fast
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("decouple", [("in_proj", "x_proj", "dt_proj", "out_proj"), (), ("x_proj", "out_proj")])
@pytest.mark.parametrize("layout", list(RUN_LAYOUTS))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_fast_path_matches_module_path(decouple, layout, autocast, monkeypatch):
    from mom.ops import fused
    from mom.ops.grouped import grouped_mm_supported

    monkeypatch.setenv(backend.FORCE_REFERENCE_ENV, "0")
    device = torch.device("cuda", torch.cuda.current_device())
    for dtype in (torch.float32, torch.bfloat16):  # its probe calls, before counting
        grouped_mm_supported(device, dtype, dtype)
    calls, grouped = [], []
    monkeypatch.setattr(fused, "fused_mixer",  # fused_mixer(hidden, weights, routes, ...): the input's dtype
                        lambda *a, _f=fused.fused_mixer, **k: calls.append(a[0].dtype) or _f(*a, **k))
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, _f=torch._grouped_mm, **k: grouped.append(1) or _f(*a, **k))
    config = _config(decouple=decouple)
    model = mom.MoMForCausalLM(config).cuda()
    ids = interleaved_ids(model.config, 2, RUN_LAYOUTS[layout]).cuda()
    logits, grads = _run_path(model, ids, True, autocast)
    assert len(calls) == config.n_layer  # the fast path ran in every layer
    # routed in_proj / out_proj run grouped GEMMs on the device's offsets in bf16 (at least one each forward; which
    # of the backward's also do depends on layouts: tests/model/test_default_call.py counts them on CPU), none in
    # fp32 (CUDA's torch._grouped_mm takes bf16 only: per-expert GEMMs)
    routed = {"in_proj", "out_proj"} & set(decouple)
    if autocast and routed:
        assert len(grouped) >= len(routed) * config.n_layer
    else:
        assert not grouped
    logits_ref, grads_ref = _run_path(model, ids, False, autocast)
    assert len(calls) == config.n_layer
    if autocast:  # bf16 GEMMs in a different order: compare by the relative norm of the difference
        assert (logits - logits_ref).abs().max() < 5e-2
        for name in grads:
            rel = (grads[name] - grads_ref[name]).norm() / grads_ref[name].norm().clamp(min=1e-12)
            assert rel < 2e-2, (name, rel.item())
    else:
        torch.testing.assert_close(logits, logits_ref, atol=2e-4, rtol=2e-4)
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], atol=5e-4, rtol=5e-3, msg=name)


@pytest.mark.parametrize("shape", [(16384, 4096), (1000, 37), (3, 5)])
def test_layout_gathers_match_index_select(shape):
    from mom.ops.triton.gather import gather_cols_t, gather_rows_t

    n, f = shape
    rows = torch.randn(n, 2 * f, device="cuda", dtype=torch.bfloat16)[:, :f]  # a row stride larger than f
    cols = torch.randn(f, 2 * n, device="cuda", dtype=torch.bfloat16)[:, :n]
    for index in (torch.randperm(n, device="cuda"), torch.argsort(torch.arange(n, device="cuda") % 3, stable=True)):
        out = gather_rows_t(rows, index)
        assert out.is_contiguous() and torch.equal(out, rows.index_select(0, index).t())
        out = gather_cols_t(cols, index)
        assert out.is_contiguous() and torch.equal(out, cols.index_select(1, index).t())
        gate = torch.randn(f, 2 * n, device="cuda", dtype=torch.bfloat16)[:, :n]
        gated = (cols.float() * torch.nn.functional.silu(gate.float())).to(cols.dtype)  # fp32, rounded once
        torch.testing.assert_close(gather_cols_t(cols, index, gate=gate), gated.index_select(1, index).t(),
                                   atol=1e-2, rtol=1e-2)  # Triton's exp vs PyTorch's: a bf16 ulp at most
        wide = torch.zeros(n, 2 * f, device="cuda", dtype=cols.dtype)  # into the right half of wider rows
        gather_cols_t(cols, index, out=wide[:, f:])
        assert torch.equal(wide[:, f:], cols.index_select(1, index).t()) and not wide[:, :f].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, l, f", [(2, 2048, 1536), (3, 70, 37), (2, 3, 8)])
def test_conv_from_rows_matches_causal_conv1d_on_gathered_columns(dtype, b, l, f):
    """`conv_rows_t` (the Triton kernel) against causal-conv1d on x gathered into sequence order: the output, with and
    without bias and keep, and the conv window it writes."""
    from causal_conv1d import causal_conv1d_fn

    from mom.ops.triton.conv_rows import conv_rows_t, write_window

    n = b * l
    rows = torch.randn(n, 2 * f, device="cuda", dtype=dtype)[:, :f]  # x's half of in_proj's rows
    index = torch.argsort(torch.arange(n, device="cuda") % 3, stable=True).argsort()  # sorted rows' inverse
    weight, bias = torch.randn(f, 4, device="cuda", dtype=dtype), torch.randn(f, device="cuda", dtype=dtype)
    keep = (torch.rand(n, device="cuda") > 0.1).to(dtype)
    x = rows.index_select(0, index).t().contiguous().view(f, b, l).permute(1, 0, 2)  # (b, f, l) sequence order
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # one rounding of an fp32 result, summed in another order
    for bias_, keep_ in ((bias, None), (None, keep)):
        window, want_window = torch.ones(b, f, 4, device="cuda", dtype=dtype), torch.empty(b, f, 4, device="cuda",
                                                                                            dtype=dtype)
        got = conv_rows_t(rows, index, l, weight, bias_, keep_, window)
        want = causal_conv1d_fn(x, weight, bias_, activation="silu")
        if keep_ is not None:
            want = want * keep_.view(b, 1, l)
        torch.testing.assert_close(got.view(f, b, l).permute(1, 0, 2), want, atol=tol, rtol=tol)
        write_window(want_window, x)
        assert torch.equal(window, want_window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m_x, m_dt", [(3, 3), (1, 3), (3, 1)])
@pytest.mark.parametrize("b, l", [(16, 2048), (3, 70)])
def test_split_x_proj_kernel_matches_the_pytorch_ops(dtype, m_x, m_dt, b, l):
    """`split_x_proj`'s Triton kernel against its PyTorch ops (the one-hot multiply and the gather) on a routing's
    runs: dt_proj's expanded rows (the constant rows after them untouched) and B, C, bit for bit."""
    from mom.ops.triton import expert_cols
    from mom.ops.triton.expert_cols import route_cols, split_x_proj

    rank, n_state, n = 48, 16, b * l
    ids = (torch.arange(n, device="cuda") // 64) % 3  # runs of 64 tokens
    select = torch.nn.functional.one_hot(ids, 3).t().to(dtype)
    x_all = torch.randn(m_x * (rank + 2 * n_state), n, device="cuda", dtype=dtype)
    dt, want_dt = (torch.full((m_dt * rank + m_dt + 8, n), 7.0, device="cuda", dtype=dtype) for _ in range(2))
    bc, want_bc = (torch.empty(b, 2 * n_state, l, device="cuda", dtype=dtype) for _ in range(2))
    assert expert_cols._kernel() is not None
    split_x_proj(x_all, m_x, ids, select, rank, dt[: m_dt * rank], bc)
    x = x_all.view(m_x, -1, b, l)
    route_cols(x[:, :rank], select, ids, want_dt[: m_dt * rank].view(m_dt, rank, b, l))
    route_cols(x[:, rank:], select, ids, want_bc.permute(1, 0, 2)[None])
    assert torch.equal(dt, want_dt) and torch.equal(bc, want_bc)


@pytest.mark.parametrize("counts", [(2560, 9728, 4096), (5, 0, 3), (0, 0, 8)])
def test_grouped_matches_per_expert_gemms_on_cuda(counts):
    """torch._grouped_mm (one launch) equals one cuBLAS GEMM per expert, for the operand layouts of the fast path
    (token-major rows, weights as stored or transposed) with uneven and empty blocks, the blocks known on the host or
    only on the device; transposed rows (which CUDA's version takes only in blocks of multiples of 8) go through the
    per-expert GEMMs."""
    from mom.ops.grouped import grouped_gemm, grouped_mm_applies

    n = sum(counts)
    ends = torch.tensor(counts).cumsum(0)
    blocks = tuple((int(e) - c, int(e)) for e, c in zip(ends, counts))
    offsets = ends.to(torch.int32).cuda()
    w = torch.randn(3, 64, 48, device="cuda", dtype=torch.bfloat16)
    for rows in (torch.randn(n, 64, device="cuda", dtype=torch.bfloat16),
                 torch.randn(64, n + 8, device="cuda", dtype=torch.bfloat16)[:, :n].t()):
        for weights in (w, torch.randn(3, 48, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2)):
            grouped = grouped_mm_applies(rows, weights)
            assert grouped == (rows.stride(1) == 1)
            want = torch.cat([rows[lo:hi] @ weights[m] for m, (lo, hi) in enumerate(blocks)])
            for known in (blocks, None) if grouped else (blocks,):
                got = grouped_gemm(rows, weights, None, known, offsets)
                torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_host_counts_on_cuda_match_and_bad_ids_raise_a_value_error():
    """With modality_counts the checks are read after the forward is enqueued: outputs and gradients equal the
    default path's, and a bad token id is clamped for the embedding (no device-side assert) and named."""
    model = mom.MoMForCausalLM(_config()).cuda()
    ids = interleaved_ids(model.config, 2, RUN_LAYOUTS["uneven"]).cuda()
    modality = model.config.modality_of(ids.cpu())
    counts = tuple(torch.bincount(modality.flatten(), minlength=3).tolist())
    outs = []
    for given in (None, counts):
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, modality_counts=given)  # fp32: bf16 would round the atomics' differences
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    for name, grad in outs[0][1].items():  # the scan's backward accumulates with atomics: not bit-reproducible
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
    bad = ids.clone()
    bad[1, 5] = model.config.vocab_size + 3
    with pytest.raises(ValueError, match=f"token id {model.config.vocab_size + 3} is out of range"):
        model(bad, labels=ids, modality_counts=counts)
    torch.cuda.synchronize()  # the device is still usable: no assert fired


def test_flat_cast_matches_cat_and_cast():
    from mom.ops.triton.flatcast import flat_cast

    tensors = [torch.randn(s, device="cuda") for s in [(3, 5000), (7,), (0,), (4096,), (2, 3, 4)]]
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(flat_cast(tensors, dtype), torch.cat([t.reshape(-1) for t in tensors]).to(dtype))
    tensors[0] = tensors[0].t()  # not contiguous: the cat + cast fallback, same result
    assert torch.equal(flat_cast(tensors, torch.bfloat16), torch.cat([t.reshape(-1) for t in tensors]).bfloat16())
    # each tensor as the columns of a matrix (dt_proj's experts and biases side by side), with the PyTorch ops' result
    from helpers import side_by_side_places

    tensors, places, want = side_by_side_places()
    for dtype in (torch.bfloat16, torch.float32):
        got = flat_cast([t.cuda() for t in tensors], dtype, places, want.numel())
        assert torch.equal(got.cpu(), want.to(dtype))


def test_triton_kernels_launched_directly_after_the_first_call():
    """`mom.ops.triton.launcher`: the second launch with the same specialisation goes through the compiled kernel's own
    launcher (this Triton's takes the call) and computes what the JIT launch computes."""
    from mom.ops.triton import launcher
    from mom.ops.triton.flatcast import flat_cast
    from mom.ops.triton.gather import gather_cols_t

    launcher._compiled.clear()
    index = torch.randperm(1000, device="cuda")
    for _ in range(3):  # a JIT launch, then direct ones, each on new data
        cols = torch.randn(37, 1000, device="cuda", dtype=torch.bfloat16)
        gate = torch.randn(37, 1000, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(gather_cols_t(cols, index), cols.index_select(1, index).t())
        gated = (cols.float() * torch.nn.functional.silu(gate.float())).bfloat16().index_select(1, index).t()
        torch.testing.assert_close(gather_cols_t(cols, index, gate=gate), gated, atol=1e-2, rtol=1e-2)
        tensors = [torch.randn(s, device="cuda") for s in [(3, 5000), (7,), (4096,)]]
        assert torch.equal(flat_cast(tensors, torch.bfloat16), torch.cat([t.reshape(-1) for t in tensors]).bfloat16())
    assert launcher._direct and len(launcher._compiled) == 3  # gather, gated gather, flat cast: one key each


def test_rebound_mamba2_scan_equals_mamba_ssms_and_launches_directly(monkeypatch):
    """`mom.ops.triton.rebind`: `mom.ops.ssd.split_conv1d_scan` (a copy of mamba-ssm's fused conv + SSD scan + gated
    norm, document resets on) computes what mamba-ssm's own function computes, forward and backward, and launches its
    Triton kernels through `mom.ops.triton.launcher` once they are tuned; ``MOM_DIRECT_LAUNCH=0`` calls mamba-ssm's
    function (both sides run the same kernels; the backward's atomic adds make the sums' order vary from run to run,
    hence a tolerance)."""
    from mom.ops import ssd
    from mom.ops.triton import rebind

    kernels = backend.mamba2_kernels(torch.empty(1, device="cuda"))
    if kernels is None or kernels.split_conv1d_scan is None:
        pytest.skip("needs mamba-ssm's SSD kernels and causal-conv1d")
    torch.manual_seed(0)
    b, l, h, p, n, g, chunk = 2, 300, 4, 16, 16, 1, 64  # batch, length, heads, headdim, d_state, groups
    d_inner, conv_dim = h * p, h * p + 2 * g * n
    zxbcdt = torch.randn(b, l, d_inner + conv_dim + h, device="cuda", requires_grad=True)
    params = [torch.randn(conv_dim, 4, device="cuda") * 0.3, torch.randn(conv_dim, device="cuda") * 0.1,
              torch.randn(h, device="cuda") * 0.5 - 2, -torch.rand(h, device="cuda") - 0.5,
              torch.randn(h, device="cuda"), 1 + 0.1 * torch.randn(d_inner, device="cuda")]
    for t in params:
        t.requires_grad_(True)
    reset = torch.zeros(b, l, dtype=torch.bool, device="cuda")
    reset[:, 170] = True  # two documents per row
    dy = torch.randn(b, l, d_inner, device="cuda")

    def run(library: bool):
        conv_w, conv_b, dt_bias, A, D, norm_w = params
        if library:
            y = kernels.split_conv1d_scan(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk, seq_idx=ssd.seq_idx_of(reset),
                                          activation="silu", rmsnorm_weight=norm_w, rmsnorm_eps=1e-5,
                                          outproj_weight=None, outproj_bias=None, headdim=p, ngroups=g,
                                          norm_before_gate=False)
        else:
            y = ssd.split_conv1d_scan(zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk, p, g, norm_w, 1e-5, reset)
        return [y.detach(), *torch.autograd.grad(y, [zxbcdt, *params], dy)]

    want = run(library=True)
    launches = []
    direct = rebind.launch_values
    monkeypatch.setattr(rebind, "launch_values", lambda *args: launches.append(args[0]) or direct(*args))
    for _ in range(3):  # tuned by the library's call above: direct launches from the first
        for got_t, want_t in zip(run(library=False), want):
            torch.testing.assert_close(got_t, want_t, rtol=1e-4, atol=1e-4 * want_t.abs().max().item())
    assert len(launches) >= 3 * 15  # mamba-ssm's fwd + bwd launch about twenty Triton kernels, all through mom
    monkeypatch.setenv(rebind.DIRECT_LAUNCH_ENV, "0")  # the switch back to mamba-ssm's own launches
    before = len(launches)
    for got_t, want_t in zip(run(library=False), want):
        torch.testing.assert_close(got_t, want_t, rtol=1e-4, atol=1e-4 * want_t.abs().max().item())
    assert len(launches) == before


def test_rebound_add_norm_equals_mamba_ssms_and_launches_directly(monkeypatch):
    """The blocks' add + RMSNorm (`mom.model.modeling.add_norm`) calls mamba-ssm's ``layer_norm_fn`` rebound: the same
    values and gradients as mamba-ssm's own, its Triton kernels launched through `mom.ops.triton.launcher`."""
    from mom.model.modeling import RMSNorm, add_norm
    from mom.ops.triton import rebind

    library_norm = backend.layer_norm_fn(torch.empty(1, device="cuda"))
    if library_norm is None:
        pytest.skip("mamba-ssm's Triton layer norm not importable")
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5).cuda()
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(96, device="cuda"))
    out = torch.randn(3, 50, 96, device="cuda", requires_grad=True)
    residual = torch.randn(3, 50, 96, device="cuda", requires_grad=True)
    dy, dres = torch.randn(3, 50, 96, device="cuda"), torch.randn(3, 50, 96, device="cuda")

    def run(fn):
        y, res = fn()
        return [y.detach(), res.detach(), *torch.autograd.grad((y, res), (out, residual, norm.weight), (dy, dres))]

    want = run(lambda: library_norm(out, norm.weight, None, residual=residual, eps=norm.eps, prenorm=True,
                                    residual_in_fp32=True, is_rms_norm=True))
    launches = []
    direct = rebind.launch_values
    monkeypatch.setattr(rebind, "launch_values", lambda *args: launches.append(args[0]) or direct(*args))
    for _ in range(3):
        for got_t, want_t in zip(run(lambda: add_norm(norm, out, residual, residual_in_fp32=True)), want):
            torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-5 * want_t.abs().max().item())
    assert len(launches) == 3 * 2  # the forward's kernel and the backward's, each call


def _graph_model(**overrides):
    torch.manual_seed(0)
    return mom.MoMForCausalLM(_config(**overrides)).cuda().eval()


def _mixed_prompt(model, batch: int = 4):
    """Rows in different modalities at the same positions, so that decode steps mix modalities across rows."""
    ids = interleaved_ids(model.config, batch, [(0, 9), (1, 7), (2, 8), (0, 5)],
                          generator=torch.Generator().manual_seed(3))
    return torch.stack([row.roll(6 * i) for i, row in enumerate(ids)]).cuda()


@needs_generate_cache
@pytest.mark.parametrize("overrides", [{}, {"bias": True}, {"decouple": ()}], ids=["routed", "bias", "dense"])
def test_cuda_graph_decode_gives_the_eager_tokens(overrides):
    """fp32, greedy: generate() replaying the CUDA graph writes the tokens of the eager step, and the graph is
    captured once per batch size and reused by the next generate()."""
    model = _graph_model(**overrides)
    prompt = _mixed_prompt(model)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    eager = model.generate(prompt, cuda_graph=False, **kwargs)
    assert torch.equal(model.generate(prompt, **kwargs), eager)
    assert model.decode_graphs.captures == 1
    assert torch.equal(model.generate(prompt, **kwargs), eager)
    assert model.decode_graphs.captures == 1
    with torch.no_grad():  # the logits, not only their argmax
        _assert_graph_steps_match_eager(model, prompt, tol=1e-4)


def test_cuda_graph_decode_follows_weight_changes():
    model = _graph_model()
    prompt = _mixed_prompt(model)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(prompt, **kwargs)
    other = _graph_model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.25)
    model.load_state_dict(other.state_dict(), assign=True)  # new tensors: the graph must be captured again
    assert torch.equal(model.generate(prompt, **kwargs), other.generate(prompt, cuda_graph=False, **kwargs))
    with torch.no_grad():
        for p in model.parameters():  # in place: the same graph sees them
            p.mul_(0.9)
    captures = model.decode_graphs.captures
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, cuda_graph=False, **kwargs))
    assert model.decode_graphs.captures == captures


@needs_generate_cache
def test_cuda_graph_decode_with_lora_merged_or_not():
    peft = pytest.importorskip("peft")
    model = _graph_model()
    prompt = _mixed_prompt(model)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    targets = ["in_proj.image", "dt_proj.text", "out_proj.speech"]  # wrapped: no fused conv step / state update
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()
    eager = wrapped.generate(input_ids=prompt, cuda_graph=False, **kwargs)
    assert torch.equal(wrapped.generate(input_ids=prompt, **kwargs), eager)  # wrapped experts: the eager step
    assert model.decode_graphs.captures == 0
    merged = wrapped.merge_and_unload()
    assert torch.equal(merged.generate(prompt, **kwargs), eager)  # plain experts again: the graph
    assert merged.decode_graphs.captures == 1


def test_cuda_graph_decode_in_bf16_close_to_eager():
    model = _graph_model().to(torch.bfloat16)
    model.keep_ssm_params_fp32()
    prompt = _mixed_prompt(model, batch=3)
    with torch.inference_mode():
        _assert_graph_steps_match_eager(model, prompt, tol=2e-2)


def _assert_graph_steps_match_eager(model, prompt: torch.Tensor, tol: float, steps: int = 4) -> None:
    """Greedy decode steps after ``prompt``: the graph's logits equal the eager step's (two caches, same tokens)."""
    cache = model(prompt, use_cache=True).cache
    ref_cache = model(prompt, use_cache=True).cache
    tok = prompt[:, -1:]
    for _ in range(steps):
        graph_logits = model(tok, cache=cache, use_cache=True, cuda_graph=True).logits
        eager_logits = model(tok, cache=ref_cache, use_cache=True).logits
        torch.testing.assert_close(graph_logits, eager_logits, atol=tol, rtol=tol)
        tok = eager_logits.argmax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 64, 100])
@pytest.mark.parametrize("experts", [1, 3])
def test_state_update_kernel_equals_the_pytorch_ops(dtype, rows, experts):
    from mom.ops.triton.state_update import kernel_applies, routed_state_update

    g = torch.Generator(device="cuda").manual_seed(0)
    di, n, r = 1536, 16, 48
    x = torch.randn(rows, di, device="cuda", generator=g).to(dtype)
    xz = torch.randn(rows, 2 * di, device="cuda", generator=g).to(dtype)  # z: a strided half, as in the step
    x_dbl = torch.randn(rows, r + 2 * n, device="cuda", generator=g).to(dtype)
    dt, B, C = x_dbl.split([r, n, n], dim=-1)
    ws = [torch.randn(di, r, device="cuda", generator=g).to(dtype) / r**0.5 for _ in range(experts)]
    bs = [torch.randn(di, device="cuda", generator=g).to(dtype) for _ in range(experts)]
    ids = torch.randint(0, experts, (rows,), device="cuda", generator=g)
    A_log = torch.rand(di, n, device="cuda", generator=g) * 3
    D = torch.randn(di, device="cuda", generator=g)
    state = torch.randn(rows, di, n, device="cuda", generator=g)
    assert kernel_applies(state, x, dt, ws, A_log, D, B, C, xz[:, di:])
    ref_state = state.clone()
    got = routed_state_update(state, x, dt, ws, bs, ids, A_log, B, C, D, xz[:, di:], use_kernel=True)
    want = routed_state_update(ref_state, x, dt, ws, bs, ids, A_log, B, C, D, xz[:, di:], use_kernel=False)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(state, ref_state, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64])
def test_routed_rows_kernel_with_a_conv_step_equals_the_pytorch_ops(dtype, rows):
    from mom.ops.triton.routed_rows import ConvStep, default_blocks, routed_rows_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    n_in, di, experts = 768, 1536, 3
    x = torch.randn(rows, n_in, device="cuda", generator=g).to(dtype)
    ws = [torch.randn(2 * di, n_in, device="cuda", generator=g).to(dtype) / n_in**0.5 for _ in range(experts)]
    ids = torch.randint(0, experts, (rows,), device="cuda", generator=g)
    states = [torch.randn(rows, di, 4, device="cuda", generator=g).to(dtype)]
    states.append(states[0].clone())
    cw, cb = torch.randn(di, 4, device="cuda", generator=g).to(dtype), torch.randn(di, device="cuda").to(dtype)
    blocks = default_blocks(n_in, 2 * di)
    assert ConvStep(states[0], cw, cb).applies(x, 2 * di, blocks)
    got = routed_rows_linear(x, ws, None, ids, use_kernel=True, conv=ConvStep(states[0], cw, cb))
    want = routed_rows_linear(x, ws, None, ids, use_kernel=False, conv=ConvStep(states[1], cw, cb))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(states[0], states[1], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 64, 100])
@pytest.mark.parametrize("blocks", [None, (32, 64)])
def test_routed_rows_kernel_equals_the_pytorch_ops(dtype, rows, blocks):
    from mom.ops.triton.routed_rows import Blocks, kernel_applies, routed_rows_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    for n_in, n_out, experts, bias in [(768, 3072, 3, False), (1536, 80, 3, False), (48, 1536, 3, True),
                                       (1536, 768, 2, True)]:
        x = torch.randn(rows, 2 * n_in, device="cuda", generator=g).to(dtype)[:, :n_in]
        ws = [torch.randn(n_out, n_in, device="cuda", generator=g).to(dtype) / n_in**0.5 for _ in range(experts)]
        bs = [torch.randn(n_out, device="cuda", generator=g).to(dtype) for _ in range(experts)] if bias else None
        ids = torch.randint(0, experts, (rows,), device="cuda", generator=g)
        assert kernel_applies(x, ws)
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        tiling = None if blocks is None else Blocks(*blocks)  # the default tilings, and one other for every shape
        torch.testing.assert_close(routed_rows_linear(x, ws, bs, ids, use_kernel=True, blocks=tiling),
                                   routed_rows_linear(x, ws, bs, ids, use_kernel=False), **tol)


@pytest.mark.parametrize("counts", [(700, 0, 1300), (2048,), (5, 1000, 37, 600)])
@pytest.mark.parametrize("K, O", [(256, 384), (200, 72)])
def test_gathered_mm_kernels_equal_the_pytorch_ops(counts, K, O):
    """`gathered_mm` in bf16: the Triton kernel (the default tiling and another) against its PyTorch ops (fp32
    GEMMs), gathering, scattering and both; blocks that straddle tiles, an expert without rows, uneven K and O."""
    from mom.ops.triton.gathered_mm import DEFAULT_TILES, Tiles, gathered_mm

    g = torch.Generator(device="cuda").manual_seed(0)
    n, E = sum(counts), len(counts)
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    a = torch.randn(n, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(E, O, K, device="cuda", generator=g) / K**0.5).bfloat16().transpose(1, 2)
    b = torch.randn(E, O, device="cuda", generator=g).bfloat16()
    perm = torch.randperm(n, device="cuda", generator=g)
    for ai, oi, bias in [(None, None, b), (perm, None, None), (None, perm, b), (perm, perm.flip(0), b)]:
        want = gathered_mm(a, w, ends, bias, ai, oi, use_kernel=False)
        for tiles in (DEFAULT_TILES, Tiles(64, 128, 32, 4, 4, 3)):
            got = gathered_mm(a, w, ends, bias, ai, oi, tiles=tiles)
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_routed_linear_with_fused_gathers_equals_the_unfused_path(monkeypatch):
    """bf16 on the GPU: `routed_linear` with its row gathers in the GEMMs (`gathered_mm`) against the same call with
    index_select + torch._grouped_mm, in the orders that cross: output, input and weight gradients, and a forward
    without gradients (which gathers its input rows in the kernel)."""
    from mom.model.routing import Routing
    from mom.ops import routed_linear as rl

    runs = [(0, 64), (1, 256), (2, 128), (0, 17), (1, 3)]
    ids = torch.cat([torch.full((3, n), m) for m, n in runs], dim=1).cuda()  # modality ids
    routing = Routing.build(ids, 3)
    g = torch.Generator(device="cuda").manual_seed(0)
    weights = [torch.randn(96, 64, device="cuda", generator=g, requires_grad=True) for _ in range(3)]
    biases = [torch.randn(96, device="cuda", generator=g, requires_grad=True) for _ in range(3)]
    x = torch.randn(*ids.shape, 64, device="cuda", generator=g)
    grad = torch.randn(*ids.shape, 96, device="cuda", generator=g)

    def run(fuse: bool, x_sorted: bool, out_sorted: bool):
        monkeypatch.setattr(rl.gmm, "kernel_applies", (lambda a, w: True) if fuse else (lambda a, w: False))
        xi = x.detach().clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = rl.routed_linear(xi, weights, biases, routing.routes(torch.bfloat16), x_sorted, out_sorted)
        out.backward(grad)
        result = [out.float(), xi.grad, *(p.grad.clone() for p in weights + biases)]
        for p in weights + biases:
            p.grad = None
        return result

    for x_sorted, out_sorted in [(False, False), (True, False), (False, True)]:
        for got, want in zip(run(True, x_sorted, out_sorted), run(False, x_sorted, out_sorted)):
            torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)
    outs = []
    for fuse in (True, False):
        monkeypatch.setattr(rl.gmm, "kernel_applies", (lambda a, w: True) if fuse else (lambda a, w: False))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(rl.routed_linear(x, weights, biases, routing.routes(torch.bfloat16), out_sorted=True).float())
    torch.testing.assert_close(*outs, atol=5e-2, rtol=2e-2)


def test_gathered_mm_tiling_is_tuned_once_per_key():
    """`gathered_mm.tuned` times every candidate tiling on a key's first call and reuses its pick afterwards."""
    from mom.ops.triton import gathered_mm as gmm

    calls = []

    def run(tiles):
        calls.append(tiles)
        torch.ones(64, device="cuda").sum()

    key = ("test", len(gmm.CANDIDATES))
    pick = gmm.tuned(key, run)
    assert pick in gmm.CANDIDATES and len(calls) == 4 * len(gmm.CANDIDATES)
    assert gmm.tuned(key, run) is pick and len(calls) == 4 * len(gmm.CANDIDATES)
