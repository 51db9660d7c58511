"""Property tests of the beta schedules, SNR and the inference timestep spacings."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusion import (
    AdvancedScheduler,
    DiffusionConfig,
    alphas_cumprod_from_betas,
    inference_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
    snr,
)

SCHEDULES = ("linear", "quadratic", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace")


@st.composite
def schedule_args(draw):
    T = draw(st.integers(2, 4000))
    beta_start = draw(st.floats(1e-5, 1e-2))
    beta_end = draw(st.floats(beta_start * 1.5, 0.2))
    return draw(st.sampled_from(SCHEDULES)), T, beta_start, beta_end


@given(schedule_args())
def test_betas_in_open_unit_interval(args):
    betas = make_betas(*args)
    assert betas.dtype == torch.float64 and betas.shape == (args[1],)
    assert (betas > 0).all() and (betas < 1).all()


@given(schedule_args())
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(args):
    abar = alphas_cumprod_from_betas(make_betas(*args))
    assert (abar > 0).all() and (abar <= 1).all()
    assert (abar[1:] < abar[:-1]).all()


@given(schedule_args())
def test_snr_strictly_decreasing(args):
    ratio = snr(alphas_cumprod_from_betas(make_betas(*args)))
    assert (ratio > 0).all() and (ratio[1:] < ratio[:-1]).all()


@given(schedule_args(), st.booleans())
def test_alphas_cumprod_is_the_exact_float64_product(args, zero_snr):
    """abar_t = prod_{s<=t} (1 - b_s), taken in float64 throughout: a running product over
    python floats (IEEE doubles) agrees to rounding. A float32 product is off by ~1e-7
    relative, and one shifted by an index (prod_{s<t}) by a factor 1 - b_t."""
    betas = make_betas(*args)
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    abar = alphas_cumprod_from_betas(betas)
    assert abar.dtype == torch.float64
    running, expected = 1.0, []
    for b in betas.tolist():
        running *= 1.0 - b
        expected.append(running)
    torch.testing.assert_close(abar, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-300)


@given(schedule_args())
def test_snr_is_the_signal_to_noise_power_ratio_of_add_noise(args):
    """SNR(t) is the power of the signal coefficient over that of the noise in
    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (Kingma et al. 2021), read off add_noise with
    unit inputs; and SNR is 1 where abar = 1/2, with SNR(1 - abar) = 1 / SNR(abar)."""
    _, T, beta_start, beta_end = args
    config = DiffusionConfig(beta_schedule=args[0], num_train_timesteps=T,
                             beta_start=beta_start, beta_end=beta_end,
                             num_inference_steps=min(50, T))
    sched = AdvancedScheduler(config)
    t = torch.arange(T)
    ones, zeros = torch.ones(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    signal = sched.add_noise(ones, t, noise=zeros)
    noise = sched.add_noise(zeros, t, noise=ones)
    ratio = snr(sched.alphas_cumprod_float64)
    torch.testing.assert_close(ratio, (signal / noise) ** 2, rtol=1e-10, atol=0)
    a = torch.tensor([0.5, 0.1, 0.3, 0.9], dtype=torch.float64)
    assert snr(a)[0] == 1
    torch.testing.assert_close(snr(1 - a), 1 / snr(a), rtol=1e-12, atol=0)


@given(schedule_args())
def test_zero_terminal_snr(args):
    betas = make_betas(*args)
    rescaled = rescale_zero_terminal_snr(betas)
    abar, abar_old = alphas_cumprod_from_betas(rescaled), alphas_cumprod_from_betas(betas)
    assert abar[-1] == 0 and rescaled[-1] == 1
    assert (rescaled[:-1] > 0).all() and (rescaled[:-1] < 1).all()
    assert (abar[1:] < abar[:-1]).all()
    # Lin et al. 2023: sqrt(abar) is an affine map of the old one fixing the first value.
    torch.testing.assert_close(abar[0], abar_old[0], rtol=1e-12, atol=0)
    s_old, s_new = abar_old.sqrt(), abar.sqrt()
    expected = (s_old - s_old[-1]) * s_old[0] / (s_old[0] - s_old[-1])
    torch.testing.assert_close(s_new, expected, rtol=1e-9, atol=1e-12)
    assert snr(abar)[-1] == 0


def test_linear_and_quadratic_formulas():
    torch.testing.assert_close(make_betas("linear", 1000, 1e-4, 0.02)[[0, -1]],
                               torch.tensor([1e-4, 0.02], dtype=torch.float64))
    quad = make_betas("quadratic", 5, 1e-4, 0.04)
    expected = torch.linspace(0.01, 0.2, 5, dtype=torch.float64) ** 2
    torch.testing.assert_close(quad, expected)
    torch.testing.assert_close(make_betas("scaled_linear", 7, 1e-4, 0.02),
                               make_betas("quadratic", 7, 1e-4, 0.02))


@given(st.integers(2, 4000))
def test_cosine_alphas_cumprod_closed_form(T):
    """Nichol & Dhariwal: abar_t = f((t+1)/T) / f(0) wherever the 0.999 clip is inactive."""
    betas = make_betas("cosine", T)
    abar = alphas_cumprod_from_betas(betas)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    unclipped = int((betas < 0.999).sum())
    assert unclipped >= T - 1  # only the last beta can hit the clip
    for t in range(0, unclipped, max(1, unclipped // 20)):
        assert abar[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)


def test_sigmoid_endpoints():
    betas = make_betas("sigmoid", 1000, 1e-4, 0.02)
    s = torch.sigmoid(torch.tensor([-6.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(betas[[0, -1]], s * (0.02 - 1e-4) + 1e-4)


@given(st.integers(2, 4000), st.data(), st.sampled_from(SPACINGS))
def test_spacings_strictly_decreasing_unique_in_range(T, data, spacing):
    n = data.draw(st.integers(1, T))
    steps = inference_timesteps(spacing, T, n)
    assert steps.dtype == torch.int64 and steps.shape == (n,)
    assert (steps[1:] < steps[:-1]).all()
    assert steps.min() >= 0 and steps.max() <= T - 1


def test_spacing_values():
    assert inference_timesteps("trailing", 1000, 4).tolist() == [999, 749, 499, 249]
    assert inference_timesteps("leading", 1000, 4).tolist() == [750, 500, 250, 0]
    assert inference_timesteps("leading", 1000, 4, steps_offset=1).tolist() == [751, 501, 251, 1]
    assert inference_timesteps("linspace", 1000, 4).tolist() == [999, 666, 333, 0]
    assert inference_timesteps("trailing", 10, 10).tolist() == list(range(9, -1, -1))
    assert inference_timesteps("trailing", 1000, 1).tolist() == [999]
    # one linspace step is linspace(0, T-1, 1) = [0] (DESIGN's formula), not T-1 as for n >= 2
    assert inference_timesteps("linspace", 1000, 1).tolist() == [0]
    assert inference_timesteps("linspace", 1000, 2).tolist() == [999, 0]


@given(st.integers(2, 4000), st.data(), st.sampled_from(SPACINGS))
def test_spacings_are_the_nearest_integers_to_their_real_grids(T, data, spacing):
    """Each rounded spacing is the nearest integer to its real-valued grid (docs/design.md):
    trailing t_k + 1 = T - k T/n, linspace t = j (T-1)/(n-1) for j = 0..n-1; leading is exact, with
    every gap T // n and the last entry steps_offset. Floor or integer division in place of
    round is off by up to 1 for n not dividing T."""
    n = data.draw(st.integers(1, T))
    steps = inference_timesteps(spacing, T, n).to(torch.float64)
    k = torch.arange(n, dtype=torch.float64)
    if spacing == "trailing":
        assert ((steps + 1 - (T - k * T / n)).abs() <= 0.5).all()
    elif spacing == "linspace" and n >= 2:
        assert ((steps.flip(0) - k * (T - 1) / (n - 1)).abs() <= 0.5).all()
        assert steps[0] == T - 1 and steps[-1] == 0
    elif spacing == "leading":
        offset = data.draw(st.integers(0, T - 1 - (n - 1) * (T // n)))
        steps = inference_timesteps(spacing, T, n, steps_offset=offset)
        assert steps[-1] == offset and (steps[:-1] - steps[1:] == T // n).all()


def test_scheduler_tables_are_float32_copies_of_float64_math():
    config = DiffusionConfig(beta_schedule="cosine")
    sched = AdvancedScheduler(config)
    abar64 = alphas_cumprod_from_betas(make_betas("cosine", 1000))
    assert sched.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(sched.alphas_cumprod, abar64.float())
    torch.testing.assert_close(sched.betas, make_betas("cosine", 1000).float())


@pytest.mark.parametrize("call, message", [
    (lambda: make_betas("cosin", 10), r"beta_schedule='cosin' is not one of"),
    (lambda: make_betas("linear", 1), r"num_train_timesteps=1 must be an int >= 2"),
    (lambda: inference_timesteps("even", 10, 5), r"timestep_spacing='even' is not one of"),
    (lambda: inference_timesteps("trailing", 10, 0), r"num_inference_steps=0 must be an int"),
    (lambda: inference_timesteps("trailing", 10, 11), r"num_inference_steps=11 .* \[1, "),
    (lambda: inference_timesteps("leading", 10, 10, steps_offset=1),
     r"steps_offset=1 pushes the first 'leading' timestep to 10"),
    (lambda: inference_timesteps("trailing", 10, 5, steps_offset=1),
     r"steps_offset=1 only applies to timestep_spacing='leading'"),
    # -1 would collide with the samplers' "after the last entry" (abar = 1) sentinel
    (lambda: inference_timesteps("leading", 10, 5, steps_offset=-1),
     r"steps_offset=-1 must be an int >= 0"),
    (lambda: inference_timesteps("leading", 10, 5, steps_offset=-3),
     r"steps_offset=-3 must be an int >= 0"),
])
def test_schedule_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
