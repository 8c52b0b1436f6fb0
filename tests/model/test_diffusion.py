"""`mom.model.diffusion`: schedule values, noising and the loss against hand computations, DDIM's steps."""

import math

import pytest
import torch

from mom.model.diffusion import (
    add_noise,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    make_schedule,
    noise_prediction_loss,
)


def test_cosine_schedule_matches_nichol_dhariwal():
    T = 1000
    s = make_schedule("cosine", T)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    assert s.num_timesteps == T
    assert s.alpha_bar[0].item() == pytest.approx(f(1 / T) / f(0), rel=1e-12)
    assert s.alpha_bar[499].item() == pytest.approx(f(500 / T) / f(0), rel=1e-9)
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())  # strictly less signal at every step
    assert 0 < s.alpha_bar[-1].item() < 1e-4  # nearly pure noise at T-1 (beta clipped at 0.999)


def test_linear_schedule_is_ddpm():
    s = make_schedule("linear", 1000)
    beta1 = 1e-4 + (0.02 - 1e-4) / 999
    assert s.alpha_bar[0].item() == pytest.approx(1 - 1e-4)
    assert s.alpha_bar[1].item() == pytest.approx((1 - 1e-4) * (1 - beta1))


def test_add_noise_and_loss_by_hand():
    s = make_schedule("cosine", 100)
    x0 = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    noise = torch.tensor([[0.5, -0.5], [2.0, 0.0]])
    t = torch.tensor([0, 99])
    ab = s.alpha_bar.float()
    want = torch.stack([ab[0].sqrt() * x0[0] + (1 - ab[0]).sqrt() * noise[0],
                        ab[99].sqrt() * x0[1] + (1 - ab[99]).sqrt() * noise[1]])
    assert torch.allclose(add_noise(s, x0, noise, t), want)
    predicted = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # ((0.5)^2 + (0.5)^2) / 2 = 0.25 ; ((1 - 2)^2 + (1 - 0)^2) / 2 = 1.0
    assert noise_prediction_loss(predicted, noise).tolist() == [0.25, 1.0]


def test_ddim_timesteps_trailing():
    ts = ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 19
    assert all(a - b == 20 for a, b in zip(ts, ts[1:]))
    assert ddim_timesteps(1000, 1) == [999]
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1000, 0)
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(10, 11)


def test_ddim_first_and_last_steps_against_the_schedule():
    s = make_schedule("cosine", 1000)
    ab = s.alpha_bar
    x = torch.tensor([1.5, -0.5])
    eps = torch.tensor([0.2, 0.4])
    x0 = (x - (1 - ab[999]).sqrt() * eps) / ab[999].sqrt()
    first = ab[979].sqrt() * x0 + (1 - ab[979]).sqrt() * eps  # 999 -> 979
    assert torch.allclose(ddim_step(s, x, eps, 999, 979), first.float())
    last = (x - (1 - ab[19]).sqrt() * eps) / ab[19].sqrt()  # 19 -> the end: alpha_bar = 1, the x0 prediction
    assert torch.allclose(ddim_step(s, x, eps, 19, None), last.float())

    seen = []

    def predict(x_t, t):
        seen.append(t)
        return eps.expand_as(x_t)

    ddim_sample(predict, x, s, steps=50)
    assert seen == ddim_timesteps(1000, 50)


def test_ddim_with_the_true_noise_recovers_x0():
    """A deterministic DDIM trajectory with the exact noise prediction lands on the x0 it was noised from."""
    s = make_schedule("cosine", 1000)
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    x_T = add_noise(s, x0, eps, torch.full((3,), 999))
    out = ddim_sample(lambda x_t, t: eps, x_T, s, steps=25)
    assert torch.allclose(out, x0, atol=1e-9)


def test_bad_inputs():
    s = make_schedule("cosine", 100)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="timestep 100 is out of range"):
        add_noise(s, x, x, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="timestep -1 is out of range"):
        add_noise(s, x, x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="integers"):
        add_noise(s, x, x, torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="noise has shape"):
        add_noise(s, x, torch.zeros(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise_schedule"):
        make_schedule("quadratic", 100)
    with pytest.raises(ValueError, match="num_timesteps"):
        make_schedule("cosine", 1)
    with pytest.raises(ValueError, match="predict_noise returned"):
        ddim_sample(lambda x_t, t: torch.zeros(5), x, s, steps=2)
