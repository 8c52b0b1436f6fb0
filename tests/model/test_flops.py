import functools

import pytest
import torch
from helpers import interleaved_ids, tiny_config
from torch.utils.flop_counter import FlopCounterMode

import mom
from mom.model import flops
from mom.model.config import PROJECTIONS

RUNS = [(0, 5), (1, 7), (2, 4), (0, 3), (1, 2)]  # every modality present, interleaved; l = 21
DECOUPLE_SETS = [PROJECTIONS, (), ("x_proj", "out_proj")]
ROOT = "MoMForCausalLM"


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("MOM_FORCE_REFERENCE", "1")  # the pure-PyTorch scan/conv, whose matmuls the counter sees


@functools.cache
def measured(decouple: tuple[str, ...], **variant) -> tuple[mom.MoMConfig, tuple[int, int], FlopCounterMode]:
    """(config, (b, l), counter) of one reference forward with labels; cached: a forward under the counter is slow."""
    config = tiny_config(decouple=decouple, **variant)
    model = mom.MoMForCausalLM(config).eval()
    ids = interleaved_ids(config, batch=2, runs=RUNS, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, labels=ids)
    return config, tuple(ids.shape), counter


def op_counts(counter: FlopCounterMode, key: str = "Global") -> dict[str, int]:
    return {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()[key].items()}


@pytest.mark.parametrize("decouple", DECOUPLE_SETS, ids=["mom", "dense", "partial"])
@pytest.mark.parametrize("variant", [{}, dict(bias=True, tie_word_embeddings=False, conv_bias=False)])
def test_matmul_flops_equal_flop_counter(decouple, variant):
    """The counter sees mm/addmm (projections, LM head), convolution and the einsum readout (bmm), nothing else."""
    config, (b, l), counter = measured(decouple, **variant)
    tokens = b * l
    table = flops.flop_table(config)
    ops = op_counts(counter)

    assert set(ops) <= {"mm", "addmm", "convolution", "bmm"}
    assert ops.get("mm", 0) + ops.get("addmm", 0) == tokens * table.flops_of("matmul")
    # The reference conv pads both sides and drops the last d_conv-1 outputs of each sequence.
    conv = table["layer.conv1d"]
    assert ops["convolution"] == b * (l + config.d_conv - 1) * conv.total_flops
    assert ops["bmm"] == tokens * table["layer.scan.readout"].total_flops

    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    for i in range(config.n_layer):
        for p in PROJECTIONS:
            assert per_module[f"{ROOT}.backbone.layers.{i}.mixer.{p}"] == tokens * table[f"layer.{p}"].flops, (i, p)
    assert per_module[f"{ROOT}.lm_head"] == tokens * table["lm_head"].flops

    # What the counter cannot see: norms, SiLU/softplus, the elementwise scan ops, residuals, biases, the loss.
    unseen = table.forward_flops - table.flops_of("matmul", "conv") - table["layer.scan.readout"].total_flops
    assert unseen == table.flops_of("elementwise") + table.flops_of("scan") - table["layer.scan.readout"].total_flops
    assert unseen > 0


def test_mom_active_flops_equal_dense_flops_at_same_width():
    mom_cfg, dense_cfg = tiny_config(), tiny_config(decouple=())
    assert flops.forward_flops_per_token(mom_cfg) == flops.forward_flops_per_token(dense_cfg)
    assert flops.training_flops_per_token(mom_cfg) == flops.training_flops_per_token(dense_cfg)
    mom_measured = measured(PROJECTIONS)[2].get_total_flops()
    dense_measured = measured(())[2].get_total_flops()
    assert mom_measured == dense_measured > 0


@pytest.mark.parametrize("decouple", DECOUPLE_SETS, ids=["mom", "dense", "partial"])
def test_params_scale_with_decoupled_projections(decouple):
    config, dense = tiny_config(decouple=decouple), tiny_config(decouple=())
    table, dense_table = flops.flop_table(config), flops.flop_table(dense)
    M = config.num_modalities
    for row, dense_row in zip(table.rows, dense_table.rows):
        factor = M if row.component.removeprefix("layer.") in decouple else 1
        assert row.total_params == factor * dense_row.total_params, row.component
        assert row.total_active_params == dense_row.total_params, row.component
    total, active = flops.count_params(config)
    assert active == flops.count_params(dense)[0]
    if decouple:
        assert total > active
    else:
        assert total == active


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(decouple=()),
        dict(decouple=("in_proj", "dt_proj")),
        dict(bias=True, tie_word_embeddings=False, rms_norm=False, conv_bias=False),
    ],
    ids=["mom", "dense", "partial", "bias-untied-layernorm"],
)
def test_count_params_equals_real_model(overrides):
    config = tiny_config(**overrides)
    model = mom.MoMForCausalLM(config)
    total, active = flops.count_params(config)
    assert total == sum(p.numel() for p in model.parameters())  # a tied LM head is one Parameter: counted once
    dense = mom.MoMForCausalLM(tiny_config(**{**overrides, "decouple": ()}))
    assert active == sum(p.numel() for p in dense.parameters())


def test_training_flops():
    config = tiny_config()
    table = flops.flop_table(config)
    fwd = table.forward_flops
    assert flops.training_flops_per_token(config) == 3 * fwd
    recompute = table.recomputed_flops  # by hand: tests/model/test_flops_hardware.py
    assert recompute > 0
    assert flops.training_flops_per_token(config, hardware=True) == 3 * fwd + recompute
    layers = sum(r.total_flops for r in table.rows if r.count == config.n_layer)
    assert flops.training_flops_per_token(config, hardware=True, gradient_checkpointing=True) == (
        3 * fwd + recompute + layers
    )
    with pytest.raises(ValueError, match="hardware=True"):
        flops.training_flops_per_token(config, gradient_checkpointing=True)
    assert flops.training_flops(config, 1000) == 1000 * 3 * fwd
    with pytest.raises(ValueError, match="tokens"):
        flops.training_flops(config, -1)


def test_peak_flops_and_mfu():
    assert flops.peak_flops("cpu") is None
    assert flops.peak_flops(torch.device("cpu")) is None
    assert flops.peak_flops("Some Unknown Accelerator") is None
    h100 = flops.peak_flops("NVIDIA H100 80GB HBM3")
    assert h100 == pytest.approx(989.4e12)
    assert flops.peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", torch.float32) < flops.peak_flops(
        "NVIDIA H100 80GB HBM3", torch.float32, tf32=True
    ) < h100
    # Substring precedence: longer names must not be caught by their prefixes.
    assert flops.gpu_peak("NVIDIA A100-SXM4-80GB").name == "A100"
    assert flops.gpu_peak("NVIDIA A10G").name == "A10G"
    assert flops.gpu_peak("NVIDIA A10").name == "A10"
    assert flops.gpu_peak("NVIDIA L40S").name == "L40S"
    assert flops.gpu_peak("NVIDIA L4").name == "L4"
    assert flops.gpu_peak("NVIDIA GH200 480GB").name == "GH200"
    with pytest.raises(ValueError, match="dtype"):
        flops.peak_flops("NVIDIA H100 80GB HBM3", torch.int8)

    config = tiny_config()
    per_token = flops.training_flops_per_token(config)
    assert flops.mfu(h100 / per_token, config, "NVIDIA H100 80GB HBM3") == pytest.approx(1.0)
    assert flops.mfu(h100 / per_token, config, "NVIDIA H100 80GB HBM3", num_devices=4) == pytest.approx(0.25)
    assert flops.mfu(1e6, config, "cpu") is None


# Hand counts per token of every row for tiny_config(): d=16, d_inner=32, d_state=4, dt_rank=3, d_conv=4, V=80,
# n_layer=2, RMSNorm, conv bias, no projection bias. Each number is worked out by hand from docs/flops.md's
# conventions, not from mom.model.flops, so that changing a formula there (e.g. the scan's) fails here.
HAND_COUNT = {
    "embedding": 0,
    "layer.norm": 64,  # 4 * 16 (square, sum, rsqrt scale, weight)
    "layer.in_proj": 2048,  # 2 * 16 * 64
    "layer.conv1d": 256,  # 2 * 32 * 4
    "layer.conv_silu": 128,  # 4 * 32
    "layer.x_proj": 704,  # 2 * 32 * (3 + 2 * 4)
    "layer.dt_proj": 192,  # 2 * 3 * 32
    "layer.biases": 64,  # dt bias 32 + conv bias 32
    "layer.dt_softplus": 96,  # 3 * 32
    "layer.scan.discretize": 416,  # 32 * 4 * 3 (dt*A, exp, dt*x*B) + 32 (dt*x)
    "layer.scan.update": 256,  # 32 * 4 * 2 (dA*h, + dBx)
    "layer.scan.readout": 256,  # 32 * 4 * 2 (C*h, sum)
    "layer.scan.skip_D": 64,  # 2 * 32
    "layer.scan.gate_z": 160,  # (4 + 1) * 32
    "layer.out_proj": 1024,  # 2 * 32 * 16
    "layer.residual": 16,
    "norm_f": 64,
    "lm_head": 2560,  # 2 * 16 * 80
    "loss": 320,  # 4 * 80
}
# The biased / LayerNorm variant differs in these rows only.
HAND_COUNT_VARIANT = {
    **HAND_COUNT,
    "layer.norm": 112,  # 7 * 16 (mean, subtract, square, sum, scale, weight, bias)
    "norm_f": 112,
    "layer.biases": 112,  # dt bias 32 + in_proj bias 64 + out_proj bias 16, no conv bias
}
# Forward FLOPs per token summed by hand: per layer 64 + 2048 + 256 + 128 + 704 + 192 + 64 + 96 + 416 + 256 + 256
# + 64 + 160 + 1024 + 16 = 5744, two layers 11488, plus norm_f 64, lm_head 2560 and loss 320.
HAND_TOTAL = 14432
HAND_KINDS = {"matmul": 2 * (2048 + 704 + 192 + 1024) + 2560, "conv": 2 * 256,
              "scan": 2 * (96 + 416 + 256 + 256 + 64 + 160), "elementwise": 2 * (64 + 128 + 64 + 16) + 64 + 320}


@pytest.mark.parametrize(
    "variant, expected",
    [({}, HAND_COUNT), (dict(bias=True, conv_bias=False, rms_norm=False), HAND_COUNT_VARIANT)],
    ids=["rmsnorm", "bias-layernorm"],
)
def test_every_row_equals_a_hand_count(variant, expected):
    """Issue 18.10: the elementwise and scan rows, which no counter sees, against hand counts; and the totals."""
    config = tiny_config(**variant)
    assert (config.d_inner, config.dt_rank, config.vocab_size) == (32, 3, 80)  # what the hand counts assume
    table = flops.flop_table(config)
    assert {r.component: r.flops for r in table.rows} == expected
    assert {r.component: r.count for r in table.rows if r.count != 1} == {
        k: config.n_layer for k in expected if k.startswith("layer.")}  # fmt: skip
    delta = 0 if not variant else 2 * (112 - 64) + (112 - 64) + 2 * (112 - 64)  # 2 layer norms, norm_f, 2x biases
    assert table.forward_flops == HAND_TOTAL + delta
    if not variant:
        assert {k: table.flops_of(k) for k in HAND_KINDS} == HAND_KINDS
        assert sum(HAND_KINDS.values()) == HAND_TOTAL  # the two hand sums agree
        assert flops.training_flops_per_token(config) == 3 * HAND_TOTAL
        # conv 2x, its SiLU, Δ (dt_proj + bias), conv bias 2x, softplus, discretize, update: per layer 1696
        hand_recompute = 2 * (2 * 256 + 128 + 192 + 32 + 2 * 32 + 96 + 416 + 256)
        assert flops.training_flops_per_token(config, hardware=True) == 3 * HAND_TOTAL + hand_recompute
