"""`mom.train.captured_step.CapturedStep`: on CPU with an eager "capture" (replaying runs the step again), the
warm-up, the static batch, the checks and the errors; on a GPU, the CUDA graph's losses and weights against ordinary
steps on the same batches."""

import copy

import pytest
import torch
from helpers import interleaved_ids, tiny_config

import mom
from mom.train.captured_step import CapturedStep, CaptureError

EAGER = dict(capture=lambda fn, pool: fn, device_type="cpu", autocast_dtype=None)
RUNS = [(0, 5), (1, 7), (2, 4), (0, 8)]


def _batches(config, n: int, batch: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = interleaved_ids(config, batch, RUNS, generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _ordinary_losses(model, optimizer, batches, autocast_dtype=None) -> list[float]:
    losses = []
    device = next(model.parameters()).device
    for batch in batches:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _pair(config, device="cpu", capturable=False, lr=1e-2):
    torch.manual_seed(0)
    model = mom.MoMForCausalLM(config).to(device)
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=lr, capturable=capturable)
    return model, opt, twin, opt_twin


def test_eager_capture_equals_ordinary_steps_and_reuses_its_batch_buffers():
    config = tiny_config()
    batches = _batches(config, 6)
    model, opt, twin, opt_twin = _pair(config)
    recorded = []
    step = CapturedStep(twin, opt_twin, warmup=2,
                        **{**EAGER, "capture": lambda fn, pool: recorded.append(fn) or fn})
    losses = []
    for i, batch in enumerate(batches):
        loss = step(batch)
        losses.append(loss.item())
        assert step.captured == (i >= 2)
    want = _ordinary_losses(model, opt, batches)
    assert losses == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert len(recorded) == 1  # recorded once, on the third call
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert step(batches[0]) is loss  # the recorded step's loss is one tensor, overwritten by each call


def test_gradient_clipping_matches_an_ordinary_clipped_step():
    config = tiny_config()
    batches = _batches(config, 4)
    model, opt, twin, opt_twin = _pair(config)
    step = CapturedStep(twin, opt_twin, warmup=1, max_grad_norm=0.01, **EAGER)
    got = [step(b).item() for b in batches]
    want = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        opt.zero_grad(set_to_none=True)
        want.append(loss.item())
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_batch_the_recording_cannot_take_is_named_before_anything_is_copied():
    config = tiny_config()
    model = mom.MoMForCausalLM(config)
    step = CapturedStep(model, torch.optim.AdamW(model.parameters()), warmup=1, **EAGER)
    batches = _batches(config, 2)
    step(batches[0])
    step(batches[1])  # recorded
    before = step._static["input_ids"].clone()
    longer = interleaved_ids(config, 2, RUNS + [(1, 3)])
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 27\).*recorded step takes \(2, 24\)"):
        step({"input_ids": longer, "labels": longer})
    with pytest.raises(ValueError, match=r"keys \['input_ids'\] but the recorded step takes"):
        step({"input_ids": batches[0]["input_ids"]})
    bad = batches[0]["input_ids"].clone()
    bad[1, 3] = config.vocab_size + 5
    with pytest.raises(ValueError, match=f"token id {config.vocab_size + 5} is out of range"):
        step({"input_ids": bad, "labels": batches[0]["labels"]})
    wrong_modality = {**batches[0], "modality_ids": torch.zeros_like(bad)}
    with pytest.raises(ValueError, match="keys"):
        step(wrong_modality)
    assert torch.equal(step._static["input_ids"], before)  # nothing of a rejected batch went in


def test_a_changed_float_learning_rate_raises_and_a_tensor_one_schedules():
    config = tiny_config()
    batches = _batches(config, 3)
    model = mom.MoMForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = CapturedStep(model, opt, warmup=1, **EAGER)
    step(batches[0])
    step(batches[1])
    opt.param_groups[0]["lr"] = 5e-4
    with pytest.raises(ValueError, match="learning rate changed from 0.001 to 0.0005.*tensor learning rate"):
        step(batches[2])

    model, opt, twin, opt_twin = _pair(config)
    opt_twin.param_groups[0]["lr"] = torch.tensor(1e-2)
    step = CapturedStep(twin, opt_twin, warmup=1, **EAGER)
    got = []
    for i, batch in enumerate(batches):
        lr = 1e-2 / (i + 1)
        opt.param_groups[0]["lr"] = lr
        opt_twin.param_groups[0]["lr"].fill_(lr)
        got.append(step(batch).item())
    assert got == pytest.approx(_ordinary_losses_lrs(model, opt, batches), rel=1e-6, abs=1e-7)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _ordinary_losses_lrs(model, opt, batches) -> list[float]:
    losses = []
    for i, batch in enumerate(batches):
        opt.param_groups[0]["lr"] = 1e-2 / (i + 1)
        losses += _ordinary_losses(model, opt, [batch])
    return losses


def test_replaced_parameters_after_the_recording_raise():
    config = tiny_config()
    batches = _batches(config, 3)
    model = mom.MoMForCausalLM(config)
    step = CapturedStep(model, torch.optim.AdamW(model.parameters()), warmup=1, **EAGER)
    step(batches[0])
    step(batches[1])
    original = model.lm_head.weight
    model.lm_head.weight = torch.nn.Parameter(original.detach().clone())
    for _ in range(2):  # and again at the next call
        with pytest.raises(ValueError, match="replaced since the step was recorded"):
            step(batches[2])
    model.lm_head.weight = original  # the recorded parameter back: the step runs again
    step(batches[2])


def test_bad_setups_are_named():
    config = tiny_config()
    model = mom.MoMForCausalLM(config)
    with pytest.raises(ValueError, match="capturable=False"):  # checked for CUDA graphs
        CapturedStep(model, torch.optim.AdamW(model.parameters(), capturable=False))
    with pytest.raises(ValueError, match="must be on a CUDA device, its parameters are on cpu"):
        CapturedStep(model, torch.optim.AdamW(model.parameters(), capturable=True))
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        CapturedStep(model, torch.optim.AdamW(model.parameters()), warmup=0, **EAGER)

    def failing(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    step = CapturedStep(model, torch.optim.AdamW(model.parameters()), warmup=1,
                        **{**EAGER, "capture": failing})
    batches = _batches(config, 2)
    step(batches[0])
    with pytest.raises(CaptureError, match="could not be recorded.*operation not permitted"):
        step(batches[1])
    assert not step.captured


def test_check_inputs_names_bad_values_on_cpu_tensors():
    config = tiny_config()
    model = mom.MoMForCausalLM(config)
    ids = interleaved_ids(config, 2, RUNS)
    model.check_inputs(input_ids=ids, labels=ids, seq_idx=torch.zeros_like(ids))
    labels = ids.clone()
    labels[0, 0] = -7
    with pytest.raises(ValueError, match="label -7 is out of range"):
        model.check_inputs(input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match="modality_ids contradict the token ids"):
        model.check_inputs(input_ids=ids, modality_ids=torch.zeros_like(ids))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_setup(fast: bool):
    config = tiny_config(d_model=64, n_layer=2, use_fast_path=fast)
    batches = [{k: v.pin_memory() for k, v in b.items()} for b in _batches(config, 7, batch=4)]
    model, opt, twin, opt_twin = _pair(config, "cuda", capturable=True, lr=1e-3)
    return batches, model, opt, twin, CapturedStep(twin, opt_twin)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_step_equals_ordinary_steps():
    """The fused path's default call records (nothing read on the host) and replays each new batch as an ordinary
    bf16-autocast step computes it."""
    batches, model, opt, twin, step = _cuda_setup(fast=True)
    if not mom.ops.scan_ops.runs_on(next(twin.parameters())):
        pytest.skip("the fused path needs mamba-ssm and causal-conv1d")
    got = [step(b).item() for b in batches]
    assert step.captured
    want = _ordinary_losses(model, opt, batches, torch.bfloat16)
    assert len(set(got)) == len(got)  # every replay ran on its own batch
    # the recorded backward groups the weight gradients on the device in bf16; the ordinary one, with the counts
    # read by then, runs one fp32 GEMM per expert: bf16 rounding apart
    assert got == pytest.approx(want, rel=1e-2)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=2e-3)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_of_a_step_that_reads_the_host_is_named():
    """The module path reads the tokens per modality on the host: its recording fails with a CaptureError."""
    batches, _, _, _, step = _cuda_setup(fast=False)
    for b in batches[: step.warmup]:
        step(b)
    with pytest.raises(CaptureError, match="could not be recorded"):
        step(batches[step.warmup])
    assert not step.captured
