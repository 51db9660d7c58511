"""AdvancedLossFunctions, training targets and min-SNR weights."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from diffusion import AdvancedScheduler, DiffusionConfig, alphas_cumprod_from_betas, make_betas
from losses import AdvancedLossFunctions as L
from losses import guide_default_alphas_cumprod, min_snr_weight, training_target

F64 = torch.float64
seeds = st.integers(0, 2**16)


def rand(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_l2_and_l1_match_torch():
    pred, target = rand(0, 4, 3, 8, 8), rand(1, 4, 3, 8, 8)
    torch.testing.assert_close(L.l2_loss(pred, target), F.mse_loss(pred, target))
    torch.testing.assert_close(L.l1_loss(pred, target), F.l1_loss(pred, target))


@pytest.mark.parametrize("loss", [L.l2_loss, L.l1_loss, L.huber_loss])
def test_reductions_agree(loss):
    pred, target = rand(0, 4, 3, 5, 5), rand(1, 4, 3, 5, 5)
    per_sample = loss(pred, target, reduction="per_sample")
    elementwise = loss(pred, target, reduction="none")
    assert per_sample.shape == (4,) and elementwise.shape == pred.shape
    torch.testing.assert_close(per_sample.mean(), loss(pred, target))
    torch.testing.assert_close(elementwise.mean(dim=(1, 2, 3)), per_sample)


@given(seeds, st.floats(1e-4, 10.0))
def test_pseudo_huber(seed, c):
    pred, target = rand(seed, 3, 2, 4, 4, dtype=F64), rand(seed + 1, 3, 2, 4, 4, dtype=F64)
    d = pred - target
    expected = (torch.sqrt(d**2 + c**2) - c).mean()
    got = L.huber_loss(pred, target, c=c)
    torch.testing.assert_close(got, expected)
    assert got >= 0
    assert L.huber_loss(pred, pred, c=c) == 0


def test_half_precision_inputs_are_reduced_in_float32():
    pred, target = rand(0, 2, 3, 4, 4).bfloat16(), rand(1, 2, 3, 4, 4).bfloat16()
    assert L.l2_loss(pred, target).dtype == torch.float32
    torch.testing.assert_close(L.l2_loss(pred, target),
                               F.mse_loss(pred.float(), target.float()))


def test_pseudo_huber_limits():
    """~ d^2 / (2c) for |d| << c, ~ |d| - c for |d| >> c."""
    d = torch.tensor([1e-3])
    assert L.huber_loss(d, torch.zeros(1), c=1.0).item() == pytest.approx(0.5e-6, rel=1e-3)
    d = torch.tensor([1e3])
    assert L.huber_loss(d, torch.zeros(1), c=1.0).item() == pytest.approx(1e3 - 1, rel=1e-6)


@given(st.floats(1e-6, 1e6), st.floats(0.1, 20.0))
def test_min_snr_weights_match_definition(snr_value, gamma):
    snr = torch.tensor([snr_value], dtype=F64)
    m = min(snr_value, gamma)
    w_eps = min_snr_weight(snr, gamma, "epsilon").item()
    assert w_eps == pytest.approx(m / snr_value, rel=1e-12) and w_eps <= 1
    assert min_snr_weight(snr, gamma, "v_prediction").item() == pytest.approx(
        m / (snr_value + 1), rel=1e-12)
    assert min_snr_weight(snr, gamma, "sample").item() == pytest.approx(m, rel=1e-12)


def test_min_snr_weight_at_zero_snr_is_finite():
    zero = torch.zeros(1, dtype=F64)
    assert min_snr_weight(zero, 5.0, "epsilon").item() == 1.0
    assert min_snr_weight(zero, 5.0, "v_prediction").item() == 0.0


@given(seeds, st.sampled_from(["linear", "cosine"]), st.floats(0.5, 20.0))
def test_min_snr_loss_is_the_same_x0_loss_in_every_parameterisation(seed, schedule, gamma):
    """Hang et al.: each target's weighted loss equals min(SNR, gamma) ||x0 - x0_hat||^2.

    Fix x_t and an x0 estimate; express the estimate as eps, v and x0 through the scheduler's
    conversions; the weighted snr_loss must be the same number in all three spaces.
    """
    x0, eps, x0_hat = (rand(seed + i, 4, 2, 3, 3, dtype=F64) for i in range(3))
    t = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(seed))
    values = []
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        sched = AdvancedScheduler(DiffusionConfig(prediction_type=prediction_type,
                                                  beta_schedule=schedule))
        x_t = sched.add_noise(x0, t, noise=eps)
        eps_hat = (x_t - sched.alpha_bar(t, x_t).sqrt() * x0_hat) / \
            (1 - sched.alpha_bar(t, x_t)).sqrt()
        pred = sched.model_output_from(x0_hat, eps_hat, t)
        target = sched.model_output_from(x0, eps, t)
        values.append(L.snr_loss(pred, target, eps, t, gamma=gamma, alphas_cumprod=sched,
                                 prediction_type=prediction_type, reduction="per_sample"))
    abar = sched.alphas_cumprod_float64[t]
    snr = abar / (1 - abar)
    expected = torch.clamp(snr, max=gamma) * ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    for got in values:
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_snr_loss_default_schedule_is_the_guides_linear_schedule():
    abar = alphas_cumprod_from_betas(make_betas("linear", 1000, 1e-4, 0.02))
    torch.testing.assert_close(guide_default_alphas_cumprod(), abar, rtol=0, atol=0)
    pred, target = rand(0, 4, 3, 8, 8), rand(1, 4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(L.snr_loss(pred, target, pred, t, gamma=5.0),
                               L.snr_loss(pred, target, pred, t, gamma=5.0, alphas_cumprod=abar))


def test_snr_loss_weights_uint8_timesteps_by_value():
    """uint8 timesteps used to index the abar table as a boolean mask."""
    pred, target = rand(0, 4, 3, 8, 8), rand(1, 4, 3, 8, 8)
    t = torch.tensor([0, 10, 200, 255])
    per_sample = L.snr_loss(pred, target, pred, t, gamma=5.0, reduction="per_sample")
    torch.testing.assert_close(
        L.snr_loss(pred, target, pred, t.to(torch.uint8), gamma=5.0, reduction="per_sample"),
        per_sample, rtol=0, atol=0)


def test_snr_loss_without_gamma_is_plain_mse():
    pred, target = rand(0, 4, 3, 8, 8), rand(1, 4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(L.snr_loss(pred, target, target, t, gamma=None),
                               L.l2_loss(pred, target))


def test_snr_loss_guide_call():
    pred, target, noise = rand(0, 4, 3, 32, 32), rand(1, 4, 3, 32, 32), rand(2, 4, 3, 32, 32)
    timesteps = torch.randint(0, 1000, (4,))
    loss = L.snr_loss(pred, target, noise, timesteps, gamma=5.0)
    assert loss.ndim == 0 and torch.isfinite(loss)


@given(seeds, st.floats(0.0, 0.999))
def test_v_prediction_loss_is_the_v_space_mse(seed, abar_value):
    """Fixing x_t, ||v_hat - v||^2 with v_hat formed from x0_hat equals the returned loss."""
    x0, eps, x0_hat = (rand(seed + i, 3, 2, 4, 4, dtype=F64) for i in range(3))
    abar = torch.full((3,), abar_value, dtype=F64)
    a = abar.reshape(3, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    v, v_hat = training_target("v_prediction", x0, eps, abar), \
        training_target("v_prediction", x0_hat, eps_hat, abar)
    expected = ((v_hat - v) ** 2).mean(dim=(1, 2, 3))
    got = L.v_prediction_loss(x0_hat, x0, abar, reduction="per_sample")
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_v_prediction_loss_guide_call():
    pred, target = rand(0, 4, 3, 32, 32), rand(1, 4, 3, 32, 32)
    alpha_bar = torch.rand(4, 1, 1, 1)
    loss = L.v_prediction_loss(pred, target, alpha_bar)
    expected = (((pred - target) ** 2) / (1 - alpha_bar)).mean()
    torch.testing.assert_close(loss, expected)


def test_training_target_definitions():
    x0, eps = rand(0, 2, 3, 4, 4), rand(1, 2, 3, 4, 4)
    abar = torch.tensor([0.9, 0.1])
    assert torch.equal(training_target("epsilon", x0, eps, abar), eps)
    assert torch.equal(training_target("sample", x0, eps, abar), x0)
    a = abar.reshape(2, 1, 1, 1)
    torch.testing.assert_close(training_target("v_prediction", x0, eps, abar),
                               a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_v_target_keeps_the_noise_near_t0_in_low_precision():
    """sqrt(1 - abar) is taken in float64: at abar = 1 - 1e-5 the bf16 target still holds
    -sqrt(1e-5) x0 (1 - abar cast to bf16 first would be 0), and fp32 matches float64."""
    abar = torch.tensor([1 - 1e-5], dtype=torch.float64)
    x0, eps = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    v16 = training_target("v_prediction", x0.bfloat16(), eps.bfloat16(), abar)
    assert v16.dtype == torch.bfloat16
    torch.testing.assert_close(v16.float(), torch.full_like(x0, -(1e-5) ** 0.5), rtol=1e-2,
                               atol=0)
    v32 = training_target("v_prediction", x0, eps, abar)
    assert v32[0, 0, 0, 0].item() == pytest.approx(-(1e-5) ** 0.5, rel=1e-7)


@pytest.mark.parametrize("call, error, message", [
    (lambda: L.l2_loss(torch.zeros(2, 3), torch.zeros(2, 4)), ValueError,
     r"pred has shape \(2, 3\) but target has shape \(2, 4\)"),
    (lambda: L.l1_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="sum"), ValueError,
     r"reduction='sum' is not one of \['mean', 'per_sample', 'none'\]"),
    (lambda: L.huber_loss(torch.zeros(2), torch.zeros(2), c=0.0), ValueError,
     r"c=0.0 must be > 0"),
    (lambda: L.snr_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.tensor([0, 1000])), ValueError,
     r"timesteps must be integers in \[0, 999\]; got \[0, 1000\]"),
    (lambda: L.snr_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.tensor([0.0, 5.0])), ValueError,
     r"timesteps must be integers in \[0, 999\]; got \[0.0, 5.0\]"),
    (lambda: L.snr_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.tensor([True, False])), ValueError,
     r"timesteps must be integers in \[0, 999\]; got \[True, False\]"),
    (lambda: L.snr_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.tensor([0, 1, 2])), ValueError,
     r"timesteps has shape \(3,\); expected \(2,\)"),
    (lambda: L.snr_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.tensor([0, 1]), gamma=-1.0), ValueError, r"gamma=-1.0 must be > 0"),
    (lambda: L.snr_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.tensor([0, 1]), reduction="none"), ValueError,
     r"reduction='none' is not one of \['mean', 'per_sample'\]"),
    (lambda: L.snr_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.tensor([0, 1]), prediction_type="eps"), ValueError,
     r"prediction_type='eps' is not one of"),
    (lambda: L.snr_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.tensor([0, 1]), alphas_cumprod="linear"), TypeError,
     r"alphas_cumprod must be a 1-D tensor"),
    (lambda: L.v_prediction_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, 1.0])),
     ValueError, r"alpha_bar must lie in \[0, 1\)"),
    (lambda: L.v_prediction_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3) * 0.5),
     ValueError, r"coefficients of shape \(3,\) do not match a batch of 2"),
    (lambda: L.snr_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4),
                        torch.tensor([0, 1])), ValueError,
     r"pred has shape \(2, 3\) but noise has shape \(2, 4\); they must match"),
    (lambda: L.snr_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                        torch.tensor([0, 1]), gamma=None, prediction_type="eps"), ValueError,
     r"prediction_type='eps' is not one of \['epsilon', 'v_prediction', 'sample'\]"),
    (lambda: L.l2_loss(torch.tensor(1.0), torch.tensor(2.0), reduction="per_sample"), ValueError,
     r"reduction='per_sample' needs inputs with a batch dimension \(B, \.\.\.\); got 0-d"),
    (lambda: L.huber_loss(torch.tensor(1.0), torch.tensor(2.0), reduction="per_sample"),
     ValueError, r"reduction='per_sample' needs inputs with a batch dimension"),
])
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
