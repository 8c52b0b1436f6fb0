"""`ClipAndSkip` where it computes the gradient norm itself (stage 0 with fp32 weights): the same update as torch's
``clip_grad_norm_`` then AdamW, and a non-finite gradient leaves weights, moments and step count as they were. The
oracle is torch's own clipping and optimizer on a copy of the model."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from test_train import TINY

from mom.train.distributed import ClipAndSkip, Context, clip_mode, deepspeed_config, requested_config
from mom.train.recipe import load_recipe

CPU = Context(0, 1, 0, torch.device("cpu"), "fp32")


def model_and_grads(scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    (model(torch.randn(4, 6)).square().sum() * scale).backward()
    return model


def guarded(model: nn.Module, clip: float, fused: bool = True) -> tuple[torch.optim.AdamW, ClipAndSkip]:
    """AdamW over ``model`` with a `ClipAndSkip` of a stage-0 fp32 recipe clipping at ``clip`` (a stand-in engine:
    DeepSpeed hands such a step to torch's optimizer as it is)."""
    overrides = [f"optim.grad_clip={clip}", "deepspeed.zero_stage=0"]
    if not fused:
        overrides.append("deepspeed.extra.optimizer.params.fused=false")
    recipe = load_recipe(TINY, overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    guard = ClipAndSkip(SimpleNamespace(optimizer=optimizer, basic_optimizer=optimizer), recipe, CPU)
    assert guard.mode == "own_norm"
    return optimizer, guard


@pytest.mark.parametrize("clip", [0.0, 0.5, 1e6])  # off, active (the norm is above 0.5), inactive
def test_own_norm_clips_as_torch_does(clip):
    model = model_and_grads()
    reference = copy.deepcopy(model)
    for theirs, ours in zip(reference.parameters(), model.parameters()):
        theirs.grad = ours.grad.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip if clip > 0 else float("inf"))
    assert expected_norm > 0.5
    torch.optim.AdamW(reference.parameters(), lr=0.1).step()

    optimizer, guard = guarded(model, clip)
    optimizer.step()
    torch.testing.assert_close(guard.norm(), expected_norm)
    assert guard.last().item() == 0.0
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_own_norm_skips_a_non_finite_step_leaving_everything_as_it_was(fused):
    model = model_and_grads()
    optimizer, guard = guarded(model, 1.0, fused)
    optimizer.step()  # a first, finite step: moments and step count exist
    state = copy.deepcopy(optimizer.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]

    model.zero_grad()
    (model(torch.randn(4, 6)).sum() * float("nan")).backward()
    optimizer.step()
    assert not torch.isfinite(guard.norm()) and guard.last().item() == 1.0
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    after = optimizer.state_dict()["state"]
    for key, moments in state["state"].items():
        assert all(torch.equal(moments[name], after[key][name]) for name in ("step", "exp_avg", "exp_avg_sq"))

    model.zero_grad()
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()  # trains again
    assert guard.last().item() == 0.0 and not all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def test_who_clips():
    def mode(*overrides, precision="fp32"):
        ctx = Context(0, 1, 0, torch.device("cpu"), precision)
        recipe = load_recipe(TINY, list(overrides))
        config = deepspeed_config(recipe, ctx)
        return clip_mode(requested_config(recipe, ctx)), config["gradient_clipping"]

    assert mode("deepspeed.zero_stage=0") == ("own_norm", 0.0)
    assert mode("deepspeed.zero_stage=0", precision="autocast_bf16") == ("own_norm", 0.0)
    assert mode("deepspeed.zero_stage=1", precision="bf16") == ("deepspeed_norm", 0.0)
    assert mode("deepspeed.zero_stage=0", precision="bf16") == (None, 1.0)  # DeepSpeed's bf16 optimizer clips
    assert mode("deepspeed.zero_stage=1") == (None, 1.0)  # ZeRO with fp32 weights: DeepSpeed clips and skips
    assert mode("deepspeed.zero_stage=3", precision="bf16") == (None, 1.0)
    assert mode("deepspeed.zero_stage=0", "deepspeed.extra.optimizer.params.torch_adam=false") == (None, 1.0)
