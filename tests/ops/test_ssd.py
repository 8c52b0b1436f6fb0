"""The SSD scan of Mamba-2 (`mom.ops.ssd`): the chunked reference against the sequential recurrence, resets, the
final state, the recurrent step; on a GPU, mamba-ssm's kernels against the reference."""

import pytest
import torch

from mom.ops import backend, ssd

B, L, H, P, G, N = 2, 29, 4, 3, 2, 5  # l not a multiple of the chunk sizes below: the padding path runs


def _inputs(seed: int = 0, dtype=torch.float32, device="cpu", l: int = L):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, dt = rand(B, l, H, P), rand(B, l, H)
    A = -torch.rand(H, generator=g).mul(4).add(0.5).to(device)  # decays of different speeds per head
    Bm, C = rand(B, l, G, N), rand(B, l, G, N)
    D, dt_bias = torch.randn(H, generator=g).to(device), torch.randn(H, generator=g).to(device)
    return x, dt, A, Bm, C, D, dt_bias


def _resets(l: int = L, device="cpu") -> torch.Tensor:
    reset = torch.zeros(B, l, dtype=torch.bool, device=device)
    reset[0, [0, 5, 6, 17]] = True  # a reset at the first position, a one-token document
    reset[1, [8, 16]] = True  # a reset exactly at a chunk start for chunk_size 8 and 16
    return reset


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 64])
@pytest.mark.parametrize("with_reset", [False, True], ids=["flow", "reset"])
@pytest.mark.parametrize("with_initial", [False, True], ids=["zero-state", "initial-state"])
def test_chunked_equals_sequential(chunk_size, with_reset, with_initial):
    x, dt, A, Bm, C, D, dt_bias = _inputs()
    reset = _resets() if with_reset else None
    initial = torch.randn(B, H, P, N) if with_initial else None
    y, state = ssd.ssd_chunked(x, dt, A, Bm, C, chunk_size, D, dt_bias, True, reset, initial)
    y_ref, state_ref = ssd.ssd_sequential(x, dt, A, Bm, C, D, dt_bias, True, reset, initial)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(state, state_ref, atol=2e-5, rtol=2e-5)


def test_reset_equals_running_each_document_alone():
    x, dt, A, Bm, C, D, dt_bias = _inputs(1)
    reset = torch.zeros(B, L, dtype=torch.bool)
    reset[:, 11] = True
    y, state = ssd.ssd_chunked(x, dt, A, Bm, C, 8, D, dt_bias, True, reset, torch.randn(B, H, P, N))
    second = [t[:, 11:] for t in (x, dt, Bm, C)]
    y_alone, state_alone = ssd.ssd_chunked(second[0], second[1], A, second[2], second[3], 8, D, dt_bias, True)
    torch.testing.assert_close(y[:, 11:], y_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_alone, atol=1e-5, rtol=1e-5)


def test_final_state_continues_the_scan():
    """Scanning a prefix, then the rest from the prefix's final state, equals scanning the whole sequence."""
    x, dt, A, Bm, C, D, dt_bias = _inputs(2)
    y, state = ssd.ssd_chunked(x, dt, A, Bm, C, 8, D, dt_bias, True)
    cut = 13
    y1, s1 = ssd.ssd_chunked(x[:, :cut], dt[:, :cut], A, Bm[:, :cut], C[:, :cut], 8, D, dt_bias, True)
    y2, s2 = ssd.ssd_chunked(x[:, cut:], dt[:, cut:], A, Bm[:, cut:], C[:, cut:], 8, D, dt_bias, True,
                             initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, state, atol=1e-5, rtol=1e-5)


def test_steps_equal_the_full_scan():
    x, dt, A, Bm, C, D, dt_bias = _inputs(3)
    y, state = ssd.ssd_scan(x, dt, A, Bm, C, 8, D, dt_bias, return_final_state=True)
    step_state = torch.zeros(B, H, P, N)
    ys = [ssd.ssd_state_update(step_state, x[:, t], dt[:, t], A, Bm[:, t], C[:, t], D, dt_bias) for t in range(L)]
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_state, state, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_keep_their_dtype_and_the_state_is_fp32():
    x, dt, A, Bm, C, D, dt_bias = _inputs(4, dtype=torch.bfloat16)
    y, state = ssd.ssd_scan(x, dt, A, Bm, C, 8, D, dt_bias, return_final_state=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    y_ref, _ = ssd.ssd_sequential(x, dt, A, Bm, C, D, dt_bias, True)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=3e-2)


def test_heads_must_split_into_groups():
    x, dt, A, Bm, C, D, dt_bias = _inputs()
    with pytest.raises(ValueError, match="4 heads cannot be split into 3 groups"):
        ssd.ssd_chunked(x, dt, A, Bm[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1), 8)


def test_seq_idx_numbers_the_documents():
    reset = torch.tensor([[True, False, True, True, False]])
    assert ssd.seq_idx_of(reset).tolist() == [[1, 1, 2, 3, 3]]
    assert ssd.seq_idx_of(reset).dtype == torch.int32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("with_reset", [False, True], ids=["flow", "reset"])
def test_cuda_kernels_equal_the_reference(with_reset, monkeypatch):
    if backend.mamba2_kernels(torch.empty(1, device="cuda")) is None:
        pytest.skip("mamba-ssm SSD kernels not importable")
    l = 300
    x, dt, A, Bm, C, D, dt_bias = _inputs(5, device="cuda", l=l)
    reset = _resets(l, "cuda") if with_reset else None
    y, state = ssd.ssd_scan(x, dt, A, Bm, C, 64, D, dt_bias, reset=reset, return_final_state=True)
    y_ref, state_ref = ssd.ssd_chunked(x, dt, A, Bm, C, 64, D, dt_bias, True, reset)
    # mamba-ssm's SSD Triton kernels multiply fp32 operands in TF32 (tl.dot's default: a 10-bit mantissa), over
    # chunks of 64: at 1e-3 about a fifth of the outputs differed from the fp32 reference (H100, docs/mixers.md)
    torch.testing.assert_close(y, y_ref, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(state, state_ref, atol=5e-2, rtol=5e-2)
    step_state, ref_state = torch.zeros_like(state), torch.zeros_like(state)
    for t in range(4):
        out = ssd.ssd_state_update(step_state, x[:, t], dt[:, t], A, Bm[:, t], C[:, t], D, dt_bias)
        ref = ssd.ssd_step(ref_state, x[:, t], dt[:, t], A, Bm[:, t], C[:, t], D, dt_bias, True)
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
