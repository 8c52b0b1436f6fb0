"""Channel mixing (`mom.model.channel_mixers`): EinFFT against a hand DFT, the selective channel mixer against a loop,
dense twins, decoding, layer averaging, save/load, LoRA, FLOPs, config errors and a few training steps."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import interleaved_ids, needs_generate_cache, tiny_config
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

import mom
from mom.model import flops
from mom.model.channel_mixers import CHANNEL_PROJECTIONS, EinFFT, SelectiveChannelMixer
from mom.model.routing import RoutedLinear, Routing
from mom.train.lora import LoraSettings, resolve_targets, wrap

RUNS = [(0, 4), (1, 5), (2, 3), (0, 2)]  # every modality, interleaved; l = 14
VARIANTS = {
    "einfft": dict(channel_mixer="einfft", einfft_blocks=4),
    "selective": dict(channel_mixer="selective", channel_groups=4, channel_d_state=3),
    "mambamixer": dict(channel_mixer="selective", channel_groups=4, channel_d_state=3, layer_averaging=True),
    "averaging": dict(layer_averaging=True),
}


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("MOM_FORCE_REFERENCE", "1")


def model_of(seed: int = 0, **overrides) -> mom.MoMForCausalLM:
    torch.manual_seed(seed)
    return mom.MoMForCausalLM(tiny_config(**overrides)).eval()


def ids_of(config, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return interleaved_ids(config, batch, RUNS, generator=torch.Generator().manual_seed(seed))


def perturb(model: torch.nn.Module, std: float = 0.3, seed: int = 1) -> None:
    """Move every channel-mixing and averaging weight off its init, so that the checks see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "channel_mixer" in name or "layer_weights" in name:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * std)


# ---- the sublayers against hand computations ---------------------------------------------------------------------
def einfft_by_hand(module: EinFFT, x: torch.Tensor, expert: int) -> torch.Tensor:
    """x (n, d) through an explicit DFT matrix and a loop over the weight blocks, in complex128."""
    d, s = x.shape[-1], module.block_size
    j = torch.arange(d, dtype=torch.float64)
    dft = torch.exp(-2j * math.pi * torch.outer(j, j) / d) / math.sqrt(d)  # unitary (norm="ortho")
    spec = x.double().to(torch.complex128) @ dft.T

    def layer(spec, weight, bias):
        w = torch.complex(weight[expert, 0].double(), weight[expert, 1].double())  # (k, s, s)
        b = torch.complex(bias[expert, 0].double(), bias[expert, 1].double())  # (k, s)
        out = torch.empty_like(spec)
        for k in range(module.blocks):
            out[:, k * s : (k + 1) * s] = spec[:, k * s : (k + 1) * s] @ w[k] + b[k]
        return out

    h = layer(spec, module.weight1, module.bias1)
    h = torch.complex(F.relu(h.real), F.relu(h.imag))
    y = layer(h, module.weight2, module.bias2)
    y = torch.complex(F.softshrink(y.real, module.shrink), F.softshrink(y.imag, module.shrink))
    return (y @ dft.conj()).real  # inverse of a unitary, symmetric DFT matrix


@pytest.mark.parametrize("decouple", [True, False], ids=["mom", "dense"])
def test_einfft_equals_a_hand_dft_with_block_weights(decouple):
    config = tiny_config(channel_mixer="einfft", einfft_blocks=4, einfft_shrink=0.05,
                         **({} if decouple else {"decouple": ()}))
    module = EinFFT(config)
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)  # large enough that the ReLUs and the shrinkage cut
    ids = ids_of(config)
    routing = Routing(config.modality_of(ids), config.num_modalities)
    hidden = torch.randn(*ids.shape, config.d_model)
    out = module(hidden, routing)
    expected = torch.stack([einfft_by_hand(module, hidden[b], 0) for b in range(ids.shape[0])])
    if decouple:
        assert module.weight1.shape[0] == config.num_modalities
        for m in range(config.num_modalities):
            expected[routing.modality_ids == m] = einfft_by_hand(module, hidden[routing.modality_ids == m], m)
    else:
        assert module.weight1.shape[0] == 1
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    module.shrink = 0.0  # the shrinkage acts at this scale
    assert not torch.allclose(module(hidden, routing), out)


def selective_by_loop(module: SelectiveChannelMixer, h: torch.Tensor, modality: int, names) -> torch.Tensor:
    """One token h (d,) through the selective channel mixer, written as explicit loops over the channel groups."""
    G, g, n, r = module.groups, module.width, module.d_state, module.dt_rank

    def lin(name):
        proj = getattr(module, name)
        return proj[names[modality]] if isinstance(proj, RoutedLinear) else proj

    u = h.view(G, g)
    xz = torch.stack([lin("channel_in_proj")(u[c]) for c in range(G)])
    x, z = F.silu(xz[:, :g]), xz[:, g:]
    dbc = torch.stack([lin("channel_x_proj")(x[c]) for c in range(G)])
    dt = F.softplus(torch.stack([lin("channel_dt_proj")(dbc[c, :r]) for c in range(G)]))
    B, C = dbc[:, r : r + n], dbc[:, r + n :]
    A = -torch.exp(module.A_log)
    y = module.D * x
    for order in (range(G), reversed(range(G))):
        state = torch.zeros(g, n)
        for c in order:
            state = torch.exp(dt[c, :, None] * A) * state + (dt[c] * x[c])[:, None] * B[c][None, :]
            y[c] = y[c] + state @ C[c]
    y = y * F.silu(z)
    return torch.stack([lin("channel_out_proj")(y[c]) for c in range(G)]).view(-1)


@pytest.mark.parametrize("decouple", [True, False], ids=["mom", "dense"])
def test_selective_channel_mixer_equals_a_sequential_loop(decouple):
    config = tiny_config(channel_mixer="selective", channel_groups=4, channel_d_state=3,
                         **({} if decouple else {"decouple": ()}))
    model = model_of(**VARIANTS["selective"], **({} if decouple else {"decouple": ()}))
    module = model.backbone.layers[0].channel_mixer
    assert isinstance(module.channel_in_proj, RoutedLinear) == decouple
    ids = ids_of(config)
    modality = config.modality_of(ids)
    hidden = torch.randn(*ids.shape, config.d_model)
    with torch.no_grad():
        out = module(hidden, Routing(modality, config.num_modalities))
        expected = torch.stack([torch.stack([selective_by_loop(module, hidden[b, t], int(modality[b, t]),
                                                               config.modalities)
                                             for t in range(ids.shape[1])]) for b in range(ids.shape[0])])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


# ---- the model ---------------------------------------------------------------------------------------------------
def test_no_channel_mixer_keeps_the_block_and_its_checkpoint_keys():
    """A model without channel mixing has exactly the parameters checkpoints written before it held."""
    model = model_of()
    names = {re.sub(r"^backbone\.layers\.\d+\.", "", k) for k in model.state_dict() if ".layers." in k}
    experts = {f"mixer.{p}.{m}.{w}" for p in ("in_proj", "x_proj", "dt_proj", "out_proj")
               for m in ("text", "image", "speech") for w in ("weight", "bias") if w == "weight" or p == "dt_proj"}
    assert names == {"norm.weight", "mixer.A_log", "mixer.D", "mixer.conv1d.weight", "mixer.conv1d.bias"} | experts
    assert set(model.state_dict()) - {k for k in model.state_dict() if ".layers." in k} == {
        "backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"}
    assert not any(hasattr(layer, "channel_mixer") or hasattr(layer, "norm2") for layer in model.backbone.layers)
    assert model.backbone.layer_weights is None


def tie_into(mom_model: torch.nn.Module, dense_model: torch.nn.Module) -> None:
    """Load a dense model's weights into every modality's expert of a MoM."""
    dense = dense_model.state_dict()
    state = {}
    for name, p in mom_model.state_dict().items():
        source = dense[re.sub(r"\.(text|image|speech)\.", ".", name)]
        state[name] = source.expand_as(p).clone()  # EinFFT: (1, ...) -> (modalities, ...)
    mom_model.load_state_dict(state)


@pytest.mark.parametrize("variant", ["einfft", "mambamixer"])
def test_dense_twin_equals_mom_with_tied_experts(variant):
    dense = model_of(decouple=(), **VARIANTS[variant])
    perturb(dense)
    moe = model_of(seed=1, **VARIANTS[variant])
    assert sum(p.numel() for p in moe.parameters()) > sum(p.numel() for p in dense.parameters())
    tie_into(moe, dense)
    ids = ids_of(moe.config)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_by_step_decode_equals_the_full_forward(variant):
    model = model_of(**VARIANTS[variant])
    perturb(model)
    ids = ids_of(model.config)
    prefix = 5
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :prefix], use_cache=True).cache
        torch.testing.assert_close(model(ids[:, :prefix]).logits, full[:, :prefix], atol=1e-5, rtol=1e-5)
        for t in range(prefix, ids.shape[1]):
            if t % 2:  # the forward's cached path and the sync-free decode step (generate's) take turns
                step = model(ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, 0]
            else:
                step = model.decode_logits(ids[:, t : t + 1], cache)
            torch.testing.assert_close(step, full[:, t], atol=1e-4, rtol=1e-4)


@needs_generate_cache
@pytest.mark.parametrize("variant", ["einfft", "mambamixer"])
def test_generate_with_cache_equals_full_reforward(variant):
    model = model_of(**VARIANTS[variant])
    perturb(model)
    prompt = ids_of(model.config)[:, :6]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        full = model(out.sequences).logits
    for i, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, full[:, prompt.shape[1] - 1 + i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channel", [{}, VARIANTS["einfft"]], ids=["plain", "einfft"])
def test_layer_averaging_starts_as_the_plain_stack_and_learns(channel):
    plain = model_of(**channel)
    averaged = model_of(layer_averaging=True, **channel)
    missing = averaged.load_state_dict(plain.state_dict(), strict=False)
    assert missing.missing_keys == ["backbone.layer_weights"] and not missing.unexpected_keys
    ids = ids_of(plain.config)
    with torch.no_grad():
        a, p = averaged(ids, output_hidden_states=True), plain(ids, output_hidden_states=True)
    torch.testing.assert_close(a.logits, p.logits)
    assert len(a.hidden_states) == len(p.hidden_states) == plain.config.n_layer + 1
    for x, y in zip(a.hidden_states, p.hidden_states):
        torch.testing.assert_close(x, y)
    averaged.train()
    averaged(ids, labels=ids).loss.backward()
    weights = averaged.backbone.layer_weights
    L = plain.config.n_layer
    used = torch.arange(L + 1)[None, :] <= torch.arange(L)[:, None] + 1  # row i reads columns 0..i+1
    assert (weights.grad[used] != 0).all() and (weights.grad[~used] == 0).all()
    assert weights._no_weight_decay


def test_layer_averaging_weights_change_the_output():
    model = model_of(layer_averaging=True)
    ids = ids_of(model.config)
    with torch.no_grad():
        before = model(ids).logits
        model.backbone.layer_weights[1, 0] = 0.5  # the last block's input also sees the embedding
        assert not torch.allclose(model(ids).logits, before)


@pytest.mark.parametrize("variant", ["einfft", "mambamixer"])
def test_save_and_load_through_auto_model(variant, tmp_path):
    model = model_of(**VARIANTS[variant])
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.channel_mixer == model.config.channel_mixer
    assert loaded.config.layer_averaging == model.config.layer_averaging
    ids = ids_of(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    layer = half.backbone.layers[0]
    if variant == "mambamixer":  # the channel scan's A_log and D stay fp32, as the sequence mixer's
        assert layer.channel_mixer.A_log.dtype == layer.channel_mixer.D.dtype == torch.float32
    assert layer.mixer.A_log.dtype == torch.float32 and layer.norm2.weight.dtype == torch.bfloat16


# ---- LoRA --------------------------------------------------------------------------------------------------------
def test_warm_start_from_a_dense_mamba_takes_layer_averaging_but_no_channel_mixer():
    config = tiny_config()
    dense = MambaForCausalLM(MambaConfig(vocab_size=config.vocab_size, hidden_size=16, num_hidden_layers=2,
                                         state_size=4, conv_kernel=4, expand=2, time_step_rank=3)).eval()
    with pytest.raises(ValueError, match="channel_mixer='einfft' would add a new, untrained sublayer"):
        mom.MoMForCausalLM.from_dense_mamba(dense, tiny_config(**VARIANTS["einfft"]))
    model = mom.MoMForCausalLM.from_dense_mamba(dense, tiny_config(layer_averaging=True)).eval()
    ids = ids_of(config)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_presets_reach_the_selective_channel_mixer():
    model = model_of(**VARIANTS["selective"])
    settings = LoraSettings(projections=["channel_in_proj", "channel_out_proj"], modalities=["image"])
    assert resolve_targets(model, settings) == ["channel_in_proj.image", "channel_out_proj.image"]
    ids = ids_of(model.config)
    with torch.no_grad():
        before = model(ids).logits
    peft_model = wrap(model, settings)
    wrapped = {n for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert len(wrapped) == 2 * model.config.n_layer
    assert all(re.search(r"channel_mixer\.channel_(in|out)_proj\.image\.lora_A$", n) for n in wrapped)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # peft starts B at 0: the adapter changes nothing until trained
        assert not torch.allclose(peft_model(ids).logits, before)

    dense = model_of(decouple=(), **VARIANTS["selective"])
    assert resolve_targets(dense, LoraSettings(projections=list(CHANNEL_PROJECTIONS))) == list(CHANNEL_PROJECTIONS)
    with pytest.raises(ValueError, match="shared by all modalities"):
        resolve_targets(dense, LoraSettings(projections=["channel_x_proj"], modalities=["text"]))


def test_lora_on_einfft_trains_it_in_full_through_modules_to_save():
    model = model_of(**VARIANTS["einfft"])
    with pytest.raises(ValueError, match="selective channel mixer, which this base does not have"):
        resolve_targets(model, LoraSettings(projections=["channel_in_proj"]))
    peft_model = wrap(model, LoraSettings(projections=["in_proj"], modules_to_save=["channel_mixer"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(re.search(r"channel_mixer\.modules_to_save\..*weight1$", n) for n in trainable)
    assert any("mixer.in_proj.text.lora_A" in n for n in trainable)


# ---- FLOPs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["einfft", "mambamixer"])
def test_channel_mixer_matmul_flops_equal_flop_counter(variant):
    model = model_of(**VARIANTS[variant])
    config, ids = model.config, ids_of(model.config)
    tokens = ids.numel()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    table = flops.flop_table(config)
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = "MoMForCausalLM.backbone.layers"
    for i in range(config.n_layer):
        if variant == "einfft":  # the counter sees EinFFT's einsums (its FFTs are not counted: an fft row)
            assert per_module[f"{root}.{i}.channel_mixer"] == tokens * table["layer.einfft.emm"].flops
        else:
            for p in CHANNEL_PROJECTIONS:
                assert per_module[f"{root}.{i}.channel_mixer.{p}"] == tokens * table[f"layer.{p}"].flops, (i, p)
    if variant == "einfft":
        fft = table["layer.einfft.fft"]
        assert fft.kind == "fft" and fft.flops == 2 * round(5 * config.d_model * math.log2(config.d_model))
    else:
        assert table["layer_averaging"].total_flops == config.d_model * config.n_layer * (config.n_layer + 2)
        assert table["layer_averaging"].total_params == sum(
            p.numel() for n, p in model.named_parameters() if "layer_weights" in n)
    params = sum(p.numel() for p in model.parameters())
    assert table.total_params == params  # every stored parameter has a row (the tied head counts once)
    dense = flops.flop_table(tiny_config(decouple=(), **VARIANTS[variant]))
    assert dense.forward_flops == table.forward_flops and dense.total_params < table.total_params


# ---- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(channel_mixer="mlp"), r"channel_mixer: must be one of \[None, 'einfft', 'selective'\], got 'mlp'"),
    (dict(channel_mixer="einfft", einfft_blocks=5), r"einfft_blocks: must divide d_model=16 \(channel_mixer: einfft"),
    (dict(channel_groups=0), "channel_groups: must be a positive integer, got 0"),
    (dict(channel_mixer="selective", channel_groups=3), "channel_groups: must divide d_model=16"),
    (dict(channel_d_state=1.5), "channel_d_state: must be a positive integer"),
    (dict(einfft_shrink=-0.1), "einfft_shrink: must be a number >= 0"),
    (dict(layer_averaging="yes"), "layer_averaging: must be true or false"),
])
def test_bad_channel_mixing_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_sizes_of_an_unused_channel_mixer_need_not_divide_d_model():
    config = tiny_config(d_model=12, channel_groups=8, einfft_blocks=5)  # no channel mixer: the sizes are unused
    assert config.channel_mixer is None and "layer.norm2" not in {r.component for r in flops.flop_table(config).rows}


# ---- training ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["einfft", "mambamixer"])
def test_a_tiny_model_learns(variant):
    model = model_of(**VARIANTS[variant]).train()
    ids = ids_of(model.config, batch=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.layers[0].channel_mixer
                   .parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


# ---- GPU ------------------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["einfft", "mambamixer"])
def test_cuda_forward_and_gradients_equal_the_cpu_reference(variant, monkeypatch):
    """fp32 on the GPU (mamba-ssm's scan kernel for the channel scan when installed, cuFFT for EinFFT) against the
    pure-PyTorch model on the CPU: loss, logits and every gradient."""
    monkeypatch.setenv("MOM_FORCE_REFERENCE", "0")
    cpu = model_of(**VARIANTS[variant]).train()
    perturb(cpu)
    gpu_model = model_of(**VARIANTS[variant]).train().cuda()
    gpu_model.load_state_dict(cpu.state_dict())
    ids = ids_of(cpu.config, batch=4)
    monkeypatch.setenv("MOM_FORCE_REFERENCE", "1")
    ref = cpu(ids, labels=ids)
    ref.loss.backward()
    monkeypatch.setenv("MOM_FORCE_REFERENCE", "0")
    out = gpu_model(ids.cuda(), labels=ids.cuda())
    out.loss.backward()
    torch.testing.assert_close(out.logits.cpu(), ref.logits, atol=1e-4, rtol=1e-4)
    grads = dict(gpu_model.named_parameters())
    for name, p in cpu.named_parameters():
        torch.testing.assert_close(grads[name].grad.cpu(), p.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.gpu
@needs_cuda
@needs_generate_cache
@pytest.mark.parametrize("variant", ["einfft", "mambamixer"])
def test_cuda_graph_decode_gives_the_eager_tokens(variant, monkeypatch):
    """generate() replaying a CUDA graph of the decode step (channel mixers' `step`, layer averaging) writes the
    eager step's tokens."""
    monkeypatch.setenv("MOM_FORCE_REFERENCE", "0")
    model = model_of(**VARIANTS[variant]).cuda()
    perturb(model)
    prompt = torch.stack([row.roll(3 * i) for i, row in enumerate(ids_of(model.config, batch=4))]).cuda()
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    eager = model.generate(prompt, cuda_graph=False, **kwargs)
    assert torch.equal(model.generate(prompt, **kwargs), eager)
    assert model.decode_graphs.captures == 1
