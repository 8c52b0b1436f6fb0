"""Hardware FLOPs: what the GPU training path's backward recomputes, row by row (`FlopRow.recomputed`), against
counts worked out by hand from the kernels (docs/flops.md, "Hardware FLOPs"), for Mamba-1, Mamba-2 (two configs and
their paths), a hybrid with attention and the selective channel mixer. Every number here is written out by hand, not
taken from mom.model.flops, so that changing a formula there fails here."""

import pytest
from helpers import tiny_config

from mom.model import flops


def recomputed(table: flops.FlopTable) -> dict[str, int]:
    """Per-instance recompute of the rows that have one."""
    return {r.component: r.recomputed for r in table.rows if r.recomputed}


# tiny_config(): d_inner E=32, d_state N=4, dt_rank R=3, d_conv W=4, conv bias, every projection decoupled over 3
# modalities (out_proj routed: its gated input is kept, not rebuilt), fused path.
MAMBA1_FUSED = {
    "layer.conv1d": 512,  # 2 re-runs (explicit + causal_conv1d_bwd's pre-activation) * 2*E*W = 2 * 256
    "layer.conv_silu": 128,  # 4*E, the explicit re-run's SiLU
    "layer.dt_proj": 192,  # Δ re-run: 2*R*E
    "layer.biases": 96,  # Δ bias E + conv bias E at each of the 2 conv re-runs
    "layer.dt_softplus": 96,  # 3*E in the scan's backward kernel
    "layer.scan.discretize": 416,  # E*(3N+1)
    "layer.scan.update": 256,  # 2*E*N: the scan from its checkpoints
}  # per layer 1696; readout, D skip and (routed out_proj) the gate are not rebuilt


def test_mamba1_fused_recompute_equals_a_hand_count():
    config = tiny_config()
    table = flops.flop_table(config)
    assert flops.mamba_path(config) == "fused"
    assert recomputed(table) == MAMBA1_FUSED
    assert table.recomputed_flops == 2 * 1696
    fwd = table.forward_flops
    assert fwd == 14432  # tests/model/test_flops.py's hand total: model FLOPs unchanged
    assert flops.training_flops_per_token(config) == 3 * 14432
    assert flops.training_flops_per_token(config, hardware=True) == 3 * 14432 + 2 * 1696


def test_mamba1_recompute_follows_the_path():
    # a shared out_proj: the scan's backward also rebuilds the gated output for its weight gradient, 5*E
    shared = flops.flop_table(tiny_config(decouple=()))
    assert recomputed(shared) == {**MAMBA1_FUSED, "layer.scan.gate_z": 160}
    # use_fast_path: false: causal_conv1d_fn's backward (one pre-activation re-run) and selective_scan_fn's
    module = flops.flop_table(tiny_config(use_fast_path=False))
    assert flops.mamba_path(module.config) == "module"
    assert recomputed(module) == {"layer.conv1d": 256, "layer.biases": 32, "layer.dt_softplus": 96,
                                  "layer.scan.discretize": 416, "layer.scan.update": 256}
    # document resets: the pure-PyTorch conv and scan, which rebuild nothing
    reset = flops.flop_table(tiny_config(reset_at_document_boundaries=True))
    assert flops.mamba_path(reset.config) == "reference" and reset.recomputed_flops == 0
    assert reset.forward_flops == module.forward_flops == shared.forward_flops == 14432


MAMBA2 = dict(mixer="mamba2", d_model=16, d_state=4)
# Config A: E=32, N=4, headdim 8 -> H=4 heads, G=2 groups, chunk Q=8, W=4, conv channels c = E + 2*G*N = 48, conv bias
A = dict(MAMBA2, headdim=8, ngroups=2, chunk_size=8)
A_FORWARD = {
    "layer.in_proj": 2688,  # 2*16*(2*32 + 2*2*4 + 4)
    "layer.conv1d": 384,  # 2*c*W
    "layer.conv_silu": 192,  # 4*c
    "layer.biases": 48,  # conv bias c
    "layer.ssd.dt": 24,  # 6*H: + dt_bias, softplus 3, * A, cumsum
    "layer.ssd.intra_chunk": 768,  # C.B 2*Q*G*N 128 + decay 3*Q*H 96 + dt*x E 32 + scores@x 2*Q*E 512
    "layer.ssd.chunk_state": 296,  # 2*E*N 256 + decay 2*H 8 + decay*dt*x E 32
    "layer.ssd.state_passing": 32,  # (2*E*N + H) / Q = 260 / 8, floored
    "layer.ssd.inter_chunk": 324,  # C.state 2*E*N 256 + exp H 4 + decay, add 2*E 64
    "layer.ssd.skip_D": 64,  # 2*E
    "layer.gated_norm": 288,  # (4 + 1 + 4)*E
    "layer.out_proj": 1024,  # 2*E*16
}
A_FUSED = {
    "layer.conv1d": 768,  # causal_conv1d_fwd re-run + causal_conv1d_bwd's pre-activation: 2 * 384
    "layer.conv_silu": 192,  # the re-run's SiLU
    "layer.biases": 96,  # conv bias at each re-run: 2 * 48
    "layer.ssd.dt": 24,  # _chunk_cumsum_fwd
    "layer.ssd.intra_chunk": 128,  # _bmm_chunk_fwd: C.B only (not _chunk_scan_fwd)
    "layer.ssd.chunk_state": 296,  # _chunk_state_fwd
    "layer.ssd.state_passing": 32,  # _state_passing_fwd
    "layer.gated_norm": 160,  # _layer_norm_bwd rebuilds y*silu(z): 5*E
}  # per layer 1696
# Config B: headdim 4 -> H=8, G=1, Q=4, c = 40, no conv bias, projection biases
B = dict(MAMBA2, headdim=4, ngroups=1, chunk_size=4, conv_bias=False, bias=True)
B_FORWARD = {
    "layer.conv1d": 320,  # 2*40*4
    "layer.conv_silu": 160,
    "layer.biases": 96,  # in_proj's outputs E + c + H = 32 + 40 + 8, out_proj's 16
    "layer.ssd.dt": 48,
    "layer.ssd.intra_chunk": 416,  # 2*4*1*4 32 + 3*4*8 96 + 32 + 2*4*32 256
    "layer.ssd.chunk_state": 304,  # 256 + 2*8 + 32
    "layer.ssd.state_passing": 66,  # (256 + 8) / 4
    "layer.ssd.inter_chunk": 328,  # 256 + 8 + 64
    "layer.ssd.skip_D": 64,
    "layer.gated_norm": 288,
}
B_FUSED = {"layer.conv1d": 640, "layer.conv_silu": 160, "layer.ssd.dt": 48, "layer.ssd.intra_chunk": 32,
           "layer.ssd.chunk_state": 304, "layer.ssd.state_passing": 66, "layer.gated_norm": 160}  # per layer 1410
B_MODULE = {"layer.conv1d": 320, "layer.ssd.dt": 48, "layer.ssd.intra_chunk": 32, "layer.ssd.chunk_state": 304,
            "layer.ssd.state_passing": 66}  # per layer 770: causal_conv1d_fn + mamba_chunk_scan_combined


@pytest.mark.parametrize("overrides, forward, recompute, per_layer", [(A, A_FORWARD, A_FUSED, 1696),
                                                                      (B, B_FORWARD, B_FUSED, 1410)], ids=["A", "B"])
def test_mamba2_rows_and_recompute_equal_hand_counts(overrides, forward, recompute, per_layer):
    config = tiny_config(**overrides)
    table = flops.flop_table(config)
    rows = {r.component: r.flops for r in table.rows}
    assert {k: rows[k] for k in forward} == forward
    assert recomputed(table) == recompute
    assert sum(recompute.values()) == per_layer  # the two hand sums agree
    assert table.recomputed_flops == config.n_layer * per_layer
    assert flops.training_flops_per_token(config, hardware=True) == 3 * table.forward_flops + 2 * per_layer
    # what Mamba-1's scan recompute (every scan row) would give, the old count: not what the SSD kernels rebuild
    assert table.recomputed_flops != table.flops_of("scan")


def test_mamba2_module_path_recompute():
    table = flops.flop_table(tiny_config(**B, use_fast_path=False))
    assert flops.mamba_path(table.config) == "module"
    assert recomputed(table) == B_MODULE
    reset = flops.flop_table(tiny_config(**B, use_fast_path=False, reset_at_document_boundaries=True))
    assert recomputed(reset) == {k: v for k, v in B_MODULE.items() if k != "layer.conv1d"}  # PyTorch's conv
    fused_reset = flops.flop_table(tiny_config(**B, reset_at_document_boundaries=True))  # seq_idx in the kernels
    assert recomputed(fused_reset) == B_FUSED


def test_hybrid_attention_and_selective_channel_mixer_recompute():
    """3 blocks, block 1 attention (2 heads), a selective channel mixer (G=4 positions of g=4 channels, n=3) in all."""
    config = tiny_config(n_layer=3, attention_layers=(1,), attention_heads=2, channel_mixer="selective",
                         channel_groups=4, channel_d_state=3)
    table = flops.flop_table(config, seq_len=16)
    assert recomputed(table) == {
        **MAMBA1_FUSED,
        "layer.channel_scan": 608,  # G * 2 directions * (softplus 3g 12 + discretize 3gn+g 40 + update 2gn 24)
        "layer.attn.scores": 512,  # S = Q K^T rebuilt: 2*d*seq_len
        "layer.attn.softmax": 96,  # P = exp(scale*S - logsumexp): 3 * heads * seq_len
    }
    counts = {r.component: r.count for r in table.rows if r.recomputed}
    assert counts["layer.conv1d"] == 2 and counts["layer.channel_scan"] == 3 and counts["layer.attn.scores"] == 1
    assert table.recomputed_flops == 2 * 1696 + 3 * 608 + 512 + 96
    longer = flops.flop_table(config, seq_len=32)
    assert longer.recomputed_flops - table.recomputed_flops == 16 * (2 * 16 + 3 * 2)  # attention's grows with it


def test_einfft_and_layer_averaging_recompute_nothing():
    base = flops.flop_table(tiny_config()).recomputed_flops
    for overrides in (dict(channel_mixer="einfft", einfft_blocks=4), dict(layer_averaging=True)):
        assert flops.flop_table(tiny_config(**overrides)).recomputed_flops == base


def test_gradient_checkpointing_adds_every_per_layer_row():
    config = tiny_config(**A)
    table = flops.flop_table(config)
    layers = sum(r.total_flops for r in table.rows if r.component.startswith("layer."))
    assert flops.training_flops_per_token(config, hardware=True, gradient_checkpointing=True) == (
        3 * table.forward_flops + 2 * 1696 + layers)


def test_format_recompute_lists_the_rebuilt_rows():
    text = flops.flop_table(tiny_config(**A)).format_recompute()
    assert "fused path" in text and "_chunk_state_fwd" in text and f"{2 * 1696:,}" in text
    assert "layer.ssd.inter_chunk" not in text and "layer.ssd.skip_D" not in text
