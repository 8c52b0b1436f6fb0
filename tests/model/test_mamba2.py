"""The Mamba-2 (SSD) mixer (``mixer: mamba2``, `mom.model.mamba2`) inside the MoM model, on CPU: dense twin, decoding,
generate, save/load, LoRA, resets and padding, FLOPs, warm start, config errors; on a GPU, the kernel path."""

import pytest
import torch
from helpers import interleaved_ids, needs_generate_cache, tiny_config, tiny_mamba2_config, train_losses
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM

import mom
from mom.model import flops
from mom.model.cache import MoMCache
from mom.model.graph import DecodeGraphs
from mom.model.mamba2 import Mamba2Mixer
from mom.model.mixer import sorted_stream
from mom.model.routing import RoutedLinear
from mom.ops import backend, ssd
from mom.train.lora import LoraSettings, wrap

RUNS = [(0, 5), (1, 7), (2, 4), (0, 3), (1, 2)]  # every modality, interleaved; l = 21 (chunks of 8 and a tail)


def config_of(**overrides) -> mom.MoMConfig:
    return tiny_mamba2_config(**overrides)


def model_of(seed: int = 0, **overrides) -> mom.MoMForCausalLM:
    torch.manual_seed(seed)
    return mom.MoMForCausalLM(config_of(**overrides)).eval()


def ids_of(config, batch: int = 2, runs=RUNS, seed: int = 0) -> torch.Tensor:
    return interleaved_ids(config, batch, runs, generator=torch.Generator().manual_seed(seed))


def test_config_builds_mamba2_mixers_with_fp32_ssm_params():
    model = model_of()
    config = model.config
    assert config.decouple == ("in_proj", "out_proj")  # the default decouple: every projection of Mamba-2
    assert config.nheads == 4
    mixer = model.backbone.layers[0].mixer
    assert isinstance(mixer, Mamba2Mixer) and isinstance(mixer.in_proj, RoutedLinear)
    assert mixer.in_proj.text.weight.shape == (2 * 32 + 2 * 2 * 4 + 4, 16)  # [z, x, B, C, dt]
    assert mixer.conv1d.weight.shape == (32 + 2 * 2 * 4, 1, 4)
    A = mixer.A_log.detach().exp()
    assert 1 <= float(A.min()) and float(A.max()) <= 16  # mamba-ssm's A_init_range
    model.to(torch.bfloat16)
    model.keep_ssm_params_fp32()
    assert {mixer.A_log.dtype, mixer.D.dtype, mixer.dt_bias.dtype} == {torch.float32}
    assert mixer.in_proj.text.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mixer="mamba3"), r"mixer: must be one of \['mamba1', 'mamba2'\], got 'mamba3'"),
        (dict(decouple=["in_proj", "x_proj"]), r"decouple: mixer mamba2 has no \['x_proj'\]"),
        (dict(headdim=5), "headdim: d_inner = expand \\* d_model = 32 must be a multiple of headdim 5"),
        (dict(ngroups=3), r"ngroups: the 4 heads \(d_inner / headdim\) must split evenly into ngroups 3"),
        (dict(chunk_size=0), "chunk_size: must be a positive integer, got 0"),
        (dict(headdim="64"), "headdim: must be a positive integer, got '64'"),
    ],
)
def test_bad_config_values_give_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_of(**overrides)


def test_dense_twin_equals_mom_with_tied_experts():
    dense = model_of(decouple=())
    mom_model = model_of(seed=1)
    state = {}
    for name, tensor in dense.state_dict().items():
        for p in ("in_proj", "out_proj"):
            if f".{p}." in name:
                head, tail = name.split(f".{p}.")
                for m in mom_model.config.modalities:
                    state[f"{head}.{p}.{m}.{tail}"] = tensor
                break
        else:
            state[name] = tensor
    mom_model.load_state_dict(state)
    ids = ids_of(dense.config)
    with torch.no_grad():
        torch.testing.assert_close(mom_model(ids).logits, dense(ids).logits, atol=0, rtol=0)


def test_experts_route_by_modality():
    """Changing only the image experts changes exactly the outputs from the first image token on."""
    model = model_of()
    ids = ids_of(model.config)
    with torch.no_grad():
        before = model(ids).logits
        for layer in model.backbone.layers:
            layer.mixer.out_proj.image.weight.mul_(2)
        after = model(ids).logits
    first_image = 5
    torch.testing.assert_close(after[:, :first_image], before[:, :first_image])
    assert not torch.allclose(after[:, first_image:], before[:, first_image:])


def _split_conv1d_scan_oracle(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, seq_idx=None,
                              activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                              outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True):
    """mamba-ssm's ``mamba_split_conv1d_scan_combined`` (its signature and ``mamba_split_conv1d_scan_ref``'s maths,
    plus ``seq_idx``) written here over the sequential SSD loop: checks what the mixer's fused path passes."""
    assert activation == "silu" and outproj_weight is None and outproj_bias is None and not norm_before_gate
    h = D.shape[0]
    dim = h * headdim
    n = (zxbcdt.shape[-1] - 2 * dim - h) // ngroups // 2
    z, xBC, dt = zxbcdt.split([dim, dim + 2 * ngroups * n, h], dim=-1)
    reset = None if seq_idx is None else torch.nn.functional.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))
    xBC = backend.causal_conv1d(xBC.transpose(1, 2).contiguous(), conv1d_weight, conv1d_bias, reset).transpose(1, 2)
    x, B, C = xBC.split([dim, ngroups * n, ngroups * n], dim=-1)
    y, _ = ssd.ssd_sequential(x.unflatten(-1, (h, headdim)), dt, A, B.unflatten(-1, (ngroups, n)),
                              C.unflatten(-1, (ngroups, n)), D, dt_bias, True, reset)
    gated = y.flatten(-2) * torch.nn.functional.silu(z)
    groups = gated.unflatten(-1, (ngroups, -1))
    normed = groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + rmsnorm_eps)
    return normed.flatten(-2) * rmsnorm_weight


@pytest.mark.parametrize("reset", [False, True], ids=["flow", "reset"])
def test_fused_path_passes_the_kernel_what_the_module_path_computes(reset, monkeypatch):
    """The CUDA fast path's call of mamba-ssm's fused function, on CPU with an oracle of that function."""
    model = model_of(reset_at_document_boundaries=reset)
    ids = ids_of(model.config)
    seq_idx = (torch.arange(ids.shape[1]) // 6).expand_as(ids)
    with torch.no_grad():
        module_path = model(ids, seq_idx=seq_idx, use_cache=False).logits
        fake = backend.Mamba2Kernels(chunk_scan=None, split_conv1d_scan=_split_conv1d_scan_oracle)
        monkeypatch.setattr(backend, "mamba2_kernels", lambda t: fake)
        assert model.backbone.layers[0].mixer.fused_applies(ids)
        fused = model(ids, seq_idx=seq_idx, use_cache=False).logits
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)


def test_cpu_mixers_take_the_module_path_and_keep_sequence_order():
    """Without mamba-ssm's kernels (CPU) no fast path, so no sorted stream (tests/model/test_mamba2_fast.py forces
    them)."""
    model = model_of()
    assert not any(m.fast_path_applies(torch.empty(1)) for m in (layer.mixer for layer in model.backbone.layers))
    assert not sorted_stream([layer.mixer for layer in model.backbone.layers], torch.empty(1))


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "decode-graph"])
def test_steps_equal_the_full_forward(graphs):
    model = model_of(bias=True)
    if graphs:  # the decode-graph bookkeeping with an eager "capture", as tests/model/test_decode.py
        model.decode_graphs = DecodeGraphs(capture=lambda fn, pool: fn, device_type="cpu")
    ids = torch.stack([row.roll(3 * i) for i, row in enumerate(ids_of(model.config, batch=3))])  # mixed rows
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :6], use_cache=True).cache
        steps = [model.decode_logits(ids[:, t : t + 1], cache) for t in range(6, 12)]
        several = model(ids[:, :6], use_cache=True).cache
        continued = model(ids[:, 6:10], cache=several, use_cache=True).logits  # several tokens after a prefix
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 6:12], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(continued, full[:, 6:10], atol=1e-5, rtol=1e-5)
    assert (model.decode_graphs.captures == 1) == graphs


def test_cache_state_shapes_follow_the_mixer():
    config = config_of()
    cache = MoMCache(config, batch_size=3)
    assert cache.conv_states[0].shape == (3, 32 + 2 * 2 * 4, 4)
    assert cache.ssm_states[0].shape == (3, 4, 8, 4) and cache.ssm_states[0].dtype == torch.float32
    cache.batch_repeat_interleave(2)
    assert cache.ssm_states[1].shape == (6, 4, 8, 4)


@needs_generate_cache
def test_generate_with_cache_equals_full_reforward():
    model = model_of()
    prompt = ids_of(model.config)[:, :7]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=5, do_sample=False)
        seq = prompt
        for _ in range(5):  # greedy by hand, every step a full forward
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        beams = model.generate(prompt, max_new_tokens=3, do_sample=False, num_beams=2)  # reorders the cache
        beams_uncached = model.generate(prompt, max_new_tokens=3, do_sample=False, num_beams=2, use_cache=False)
    assert torch.equal(cached, seq)
    assert torch.equal(beams, beams_uncached)


@needs_generate_cache
def test_assisted_decoding_rolls_the_cache_back():
    model, assistant = model_of(), model_of(seed=3)
    prompt = ids_of(model.config)[:1, :7]
    with torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=5, do_sample=False)
        assisted = model.generate(prompt, max_new_tokens=5, do_sample=False, assistant_model=assistant)
    assert torch.equal(plain, assisted)


def test_save_and_load_through_auto_model(tmp_path):
    model = model_of()
    ids = ids_of(model.config)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mixer == "mamba2" and isinstance(loaded.backbone.layers[1].mixer, Mamba2Mixer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    mixer = half.backbone.layers[0].mixer
    assert {mixer.A_log.dtype, mixer.D.dtype, mixer.dt_bias.dtype} == {torch.float32}
    assert mixer.in_proj.image.weight.dtype == torch.bfloat16


def test_lora_preset_reaches_the_projections_and_changes_outputs():
    model = model_of()
    ids = ids_of(model.config)
    with torch.no_grad():
        before = model(ids).logits
    settings = LoraSettings.from_dict({"r": 2, "alpha": 4, "projections": ["in_proj", "out_proj"],
                                       "modalities": ["image"]})
    peft_model = wrap(model, settings)
    wrapped = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
               for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")}
    assert wrapped == {f"backbone.layers.{i}.mixer.{p}.image" for i in range(2) for p in ("in_proj", "out_proj")}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        after = peft_model(input_ids=ids).logits
    torch.testing.assert_close(after[:, :5], before[:, :5])  # text before the first image token: unchanged
    assert not torch.allclose(after[:, 5:], before[:, 5:])
    with pytest.raises(ValueError, match=r"mixer mamba2 has no \['x_proj'\]"):
        wrap(model_of(), LoraSettings.from_dict({"projections": ["x_proj"]}))


def test_document_resets_equal_separate_documents():
    model = model_of(reset_at_document_boundaries=True)
    parts = [ids_of(model.config, runs=r, seed=i) for i, r in enumerate([[(0, 6), (1, 5)], [(2, 3)], [(1, 9)]])]
    packed = torch.cat(parts, dim=1)
    seq_idx = torch.cat([torch.full_like(p, i, dtype=torch.int32) for i, p in enumerate(parts)], dim=1)
    with torch.no_grad():
        reset = model(packed, seq_idx=seq_idx).logits
        alone = torch.cat([model(p).logits for p in parts], dim=1)
    torch.testing.assert_close(reset, alone, atol=1e-5, rtol=1e-5)


def test_left_padding_leaves_the_real_tokens_unchanged():
    model = model_of()
    ids = ids_of(model.config, batch=1)
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], model(ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_loss_goes_down():
    model = model_of().train()
    ids = ids_of(model.config, batch=4)
    losses = train_losses(model, ids, lr=2e-2)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.85 * losses[0], losses
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("overrides", [{}, dict(decouple=(), bias=True, tie_word_embeddings=False)])
def test_flops_match_the_model(overrides, monkeypatch):
    monkeypatch.setenv(backend.FORCE_REFERENCE_ENV, "1")
    model = model_of(**overrides)
    config = model.config
    table = flops.flop_table(config)
    assert table.total_params == sum(p.numel() for p in model.parameters())
    ids = ids_of(config)
    tokens = ids.numel()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, labels=ids)
    counts = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts.get("mm", 0) + counts.get("addmm", 0) == tokens * table.flops_of("matmul")
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    for i in range(config.n_layer):
        for p in ("in_proj", "out_proj"):
            assert per_module[f"MoMForCausalLM.backbone.layers.{i}.mixer.{p}"] == tokens * table[f"layer.{p}"].flops
    assert "mixer=mamba2" in table.format()


@pytest.mark.parametrize("tie", [True, False])
def test_from_dense_mamba2_logits_equal(tie):
    torch.manual_seed(0)
    dense_config = Mamba2Config(vocab_size=80, hidden_size=16, num_hidden_layers=2, state_size=4, expand=2,
                                head_dim=8, num_heads=4, n_groups=2, conv_kernel=4, chunk_size=8,
                                tie_word_embeddings=tie, layer_norm_epsilon=1e-5)
    dense = Mamba2ForCausalLM(dense_config).eval()
    config = config_of(tie_word_embeddings=tie)
    model = mom.MoMForCausalLM.from_dense_mamba2(dense, config).eval()
    ids = ids_of(config)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="config.headdim=4 does not match the dense model's head_dim=8"):
        mom.MoMForCausalLM.from_dense_mamba2(dense, config_of(headdim=4, tie_word_embeddings=tie))
    with pytest.raises(ValueError, match="from_dense_mamba2: config.mixer must be mamba2"):
        mom.MoMForCausalLM.from_dense_mamba2(dense, tiny_config(d_model=16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reset", [False, True], ids=["flow", "reset"])
def test_cuda_kernel_path_equals_the_reference(reset, monkeypatch):
    """The fused conv + scan + gated norm (and the chunk-scan kernel with a cache) against the PyTorch path."""
    if backend.mamba2_kernels(torch.empty(1, device="cuda")) is None:
        pytest.skip("mamba-ssm SSD kernels not importable")
    model = model_of(d_model=64, headdim=16, d_state=16, chunk_size=64, reset_at_document_boundaries=reset).cuda()
    ids = ids_of(model.config, runs=[(0, 100), (1, 150), (2, 50)]).cuda()
    seq_idx = (torch.arange(ids.shape[1], device="cuda") // 70).expand_as(ids).to(torch.int32)

    def run(reference: bool):
        monkeypatch.setenv(backend.FORCE_REFERENCE_ENV, "1" if reference else "0")
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, seq_idx=seq_idx, use_cache=False)  # no cache: the fused kernel's path
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    logits, grads = run(reference=False)
    logits_ref, grads_ref = run(reference=True)
    torch.testing.assert_close(logits, logits_ref, atol=2e-3, rtol=2e-3)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=2e-3, rtol=2e-2, msg=name)
    monkeypatch.setenv(backend.FORCE_REFERENCE_ENV, "0")
    with torch.no_grad():  # the cached prefill (chunk-scan kernel) and the decode steps (Triton state update)
        full = model(ids).logits
        cache = model(ids[:, :200], use_cache=True).cache
        steps = [model.decode_logits(ids[:, t : t + 1], cache) for t in range(200, 210)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 200:210], atol=2e-3, rtol=2e-3)
