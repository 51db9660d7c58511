"""AdvancedScheduler: forward process, parameterisations, DDPM/DDIM steps, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusion import AdvancedScheduler, DiffusionConfig, randn_like

SCHEDULES = ("linear", "quadratic", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace")
# (prediction_type, rescale_betas_zero_snr): every combination the config allows.
PROCESSES = [("epsilon", False), ("v_prediction", False), ("sample", False),
             ("v_prediction", True), ("sample", True)]
F64 = torch.float64


def make(prediction_type="epsilon", schedule="linear", zero_snr=False, sampler=None, **kw):
    kw.setdefault("clip_sample", False)
    config = DiffusionConfig(prediction_type=prediction_type, beta_schedule=schedule,
                             rescale_betas_zero_snr=zero_snr, **kw)
    return AdvancedScheduler(config, sampler=sampler)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@st.composite
def processes(draw):
    prediction_type, zero_snr = draw(st.sampled_from(PROCESSES))
    T = draw(st.sampled_from([2, 10, 100, 1000]))
    return make(prediction_type, draw(st.sampled_from(SCHEDULES)), zero_snr,
                num_train_timesteps=T, num_inference_steps=min(50, T))


# ---- forward process ----

@given(processes(), st.integers(0, 2**16))
def test_add_noise_coefficients_preserve_unit_variance(sched, seed):
    """sqrt(abar)^2 + sqrt(1-abar)^2 = 1 at every timestep, so unit-variance data stays so."""
    t = torch.arange(sched.num_train_timesteps)
    ones, zeros = torch.ones(len(t), 1, dtype=F64), torch.zeros(len(t), 1, dtype=F64)
    signal = sched.add_noise(ones, t, noise=zeros)
    noise = sched.add_noise(zeros, t, noise=ones)
    torch.testing.assert_close(signal**2 + noise**2, ones, rtol=0, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_add_noise_of_unit_variance_data_has_unit_variance(schedule):
    sched = make("v_prediction", schedule)
    n = 200_000  # variance estimate has standard error sqrt(2 / n) = 0.0032; allow 5 of them
    for t in (0, 250, 500, 999):
        x0 = torch.randn(n, generator=gen(t), dtype=F64)
        x_t = sched.add_noise(x0, torch.full((n,), t), generator=gen(t + 1))
        assert abs(x_t.var().item() - 1) < 5 * (2 / n) ** 0.5


def test_randn_like_with_one_generator_per_row():
    """A list of B generators draws row i from generator i alone: each row equals that
    generator's draw for a batch of one, whatever the other rows' generators are."""
    x = torch.zeros(3, 2, 4, 4)
    rows = randn_like(x, [gen(5), gen(6), gen(7)])
    assert rows.shape == x.shape and rows.dtype == x.dtype
    for i, seed in enumerate((5, 6, 7)):
        assert torch.equal(rows[i:i + 1], randn_like(x[:1], gen(seed)))
        assert torch.equal(rows[i:i + 1], randn_like(x[:1], [gen(seed)]))
    assert torch.equal(randn_like(x, (gen(9), gen(6), gen(7)))[1:], rows[1:])  # a tuple too
    halves = randn_like(x.double(), [gen(5), gen(6), gen(7)])
    assert halves.dtype == torch.float64 and torch.equal(halves[0:1], randn_like(x[:1].double(),
                                                                                   gen(5)))


@pytest.mark.parametrize("generator, error, message", [
    ([gen(0), gen(1)], ValueError,
     r"generator is a list of 2 generators but x is a batch of 3; pass one generator per row"),
    ((gen(0),) * 4, ValueError, r"generator is a tuple of 4 generators but x is a batch of 3"),
    ([gen(0), 1, gen(2)], TypeError, r"generator must be a torch.Generator.*; got int"),
    (7, TypeError, r"generator must be a torch.Generator, a list or tuple of them, or None; "
                   r"got int"),
])
def test_randn_like_generator_errors(generator, error, message):
    with pytest.raises(error, match=message):
        randn_like(torch.zeros(3, 2), generator)


def test_step_noise_with_one_generator_per_row_equals_row_by_row_steps():
    """scheduler.step passes a list of generators through: image i's noise is its own."""
    sched = make(sampler="ddpm")
    sched.set_timesteps(10)
    x, out = torch.randn(3, 2, 4, 4, dtype=F64), torch.randn(3, 2, 4, 4, dtype=F64)
    t = int(sched.timesteps[2])
    batch = sched.step(out, t, x, generator=[gen(5), gen(6), gen(7)]).prev_sample
    for i, seed in enumerate((5, 6, 7)):
        row = sched.step(out[i:i + 1], t, x[i:i + 1], generator=gen(seed)).prev_sample
        assert torch.equal(batch[i:i + 1], row)
    one = sched.step(out, t, x, generator=gen(5)).prev_sample  # one generator: rows differ
    assert not torch.equal(batch[1:], one[1:])


def test_add_noise_generator_determinism():
    sched = make()
    x0 = torch.zeros(2, 3, 4, 4)
    a = sched.add_noise(x0, 10, generator=gen(1))
    b = sched.add_noise(x0, 10, generator=gen(1))
    c = sched.add_noise(x0, 10, generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@given(processes(), st.integers(0, 2**16))
def test_conversions_round_trip(sched, seed):
    g = gen(seed)
    x0 = torch.randn(6, 2, 3, 3, generator=g, dtype=F64)
    eps = torch.randn(6, 2, 3, 3, generator=g, dtype=F64)
    t = torch.randint(0, sched.num_train_timesteps, (6,), generator=g)
    t[0], t[1] = 0, sched.num_train_timesteps - 1  # both ends every time
    x_t = sched.add_noise(x0, t, noise=eps)
    out = sched.model_output_from(x0, eps, t)
    x0_hat, eps_hat = sched.convert_model_output(out, t, x_t, clip=False)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_add_noise_adds_noise_at_small_t(dtype):
    """sqrt(1 - abar_0) = 0.01 must not round to 0: 1 - abar is taken in float64, then cast
    (in bf16, 1 - bf16(abar_0) = 1 - 1 = 0 would leave x_0 noise-free)."""
    sched = make()
    x0, noise = torch.zeros(2, 3, 4, 4, dtype=dtype), torch.ones(2, 3, 4, 4, dtype=dtype)
    x_t = sched.add_noise(x0, 0, noise=noise)
    expected = (1 - sched.alphas_cumprod_float64[0]).sqrt().to(dtype)
    assert x_t.dtype == dtype and (x_t == expected).all() and expected > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_float32_coefficients_are_float64_coefficients_cast_once(prediction_type, schedule):
    """Every coefficient a float32 sample meets is the float64 one rounded once (half an ulp,
    6e-8 relative; a quotient of two such, 3 roundings). Unit inputs isolate each coefficient:
    add_noise(0, 1) = sqrt(1 - abar), get_velocity(1, 0) = -sqrt(1 - abar), and the
    conversions with x_t = 0 and output = 1. Casting abar to float32 first and taking 1 - abar
    there is off by up to ~3e-4 relative near t = 0."""
    sched = make(prediction_type, schedule)
    T = sched.num_train_timesteps
    t = torch.arange(T)
    abar = sched.alphas_cumprod_float64
    sa, s1 = abar.sqrt().reshape(-1, 1), (1 - abar).sqrt().reshape(-1, 1)
    zeros, ones = torch.zeros(T, 1), torch.ones(T, 1)

    def close(actual, expected64, ulps=1):
        torch.testing.assert_close(actual, expected64.float(), rtol=ulps * 1.2e-7, atol=0)

    close(sched.add_noise(zeros, t, noise=ones), s1)
    close(sched.add_noise(ones, t, noise=zeros), sa)
    close(sched.get_velocity(ones, zeros, t), -s1)
    x0_hat, eps_hat = sched.convert_model_output(ones, t, zeros, clip=False)  # x_t = 0
    if prediction_type == "epsilon":   # x0 = -sqrt(1-abar)/sqrt(abar) eps
        close(x0_hat, -s1 / sa, ulps=3)
    elif prediction_type == "v_prediction":  # x0 = -sqrt(1-abar) v, eps = sqrt(abar) v
        close(x0_hat, -s1)
        close(eps_hat, sa)
    else:  # eps = -sqrt(abar)/sqrt(1-abar) x0
        close(eps_hat, -sa / s1, ulps=3)


def test_get_velocity_definition():
    sched = make("v_prediction")
    x0, eps = torch.randn(3, 1, 2, 2, dtype=F64), torch.randn(3, 1, 2, 2, dtype=F64)
    t = torch.tensor([0, 500, 999])
    abar = sched.alpha_bar(t, x0)
    assert abar.shape == (3, 1, 1, 1)
    torch.testing.assert_close(abar.float().flatten(), sched.alphas_cumprod[t])
    torch.testing.assert_close(sched.get_velocity(x0, eps, t),
                               abar.sqrt() * eps - (1 - abar).sqrt() * x0, rtol=1e-12, atol=1e-12)


@given(processes())
def test_betas_and_alphas_tables_match_alphas_cumprod(sched):
    """The public tables describe one process: alphas = 1 - betas and b_t = 1 - abar_t /
    abar_{t-1} (b_0 = 1 - abar_0), with the zero-terminal-SNR rescale applied to betas too
    (its last beta is 1)."""
    abar = sched.alphas_cumprod_float64
    expected = 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
    torch.testing.assert_close(sched.betas, expected.float(), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(sched.alphas, (1 - expected).float(), rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(sched.alphas + sched.betas, torch.ones_like(sched.betas))
    if sched.config.rescale_betas_zero_snr:
        assert sched.betas[-1] == 1 and sched.alphas_cumprod[-1] == 0


# ---- timestep list ----

@given(st.integers(2, 4000), st.data(), st.sampled_from(SPACINGS))
def test_set_timesteps_gives_n_unique_decreasing_in_range(T, data, spacing):
    n = data.draw(st.integers(1, T))
    sched = make(num_train_timesteps=T, timestep_spacing=spacing, num_inference_steps=1)
    sched.set_timesteps(n)
    steps = sched.timesteps
    assert steps.shape == (n,) and (steps[1:] < steps[:-1]).all()
    assert 0 <= steps.min() and steps.max() < T
    for a, b in zip(steps.tolist(), steps.tolist()[1:] + [-1]):
        assert sched.previous_timestep(a) == b


def test_guide_step_before_set_timesteps():
    """The guide steps from t=500 without set_timesteps: the list is all T timesteps."""
    sched = AdvancedScheduler(DiffusionConfig())
    assert sched.timesteps.tolist() == list(range(999, -1, -1))
    noisy = sched.add_noise(torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,)))
    result = sched.step(torch.randn(2, 3, 32, 32), 500, noisy)
    assert result.prev_sample.shape == (2, 3, 32, 32)
    assert sched.previous_timestep(500) == 499
    # the guide's manual loop passes the model's {"sample": ...} dict straight to step
    out = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(sched.step({"sample": out}, 500, noisy).prev_sample,
                               sched.step(out, 500, noisy).prev_sample)


# ---- DDIM ----

@given(processes(), st.sampled_from(SPACINGS), st.data())
def test_ddim_with_true_prediction_walks_the_forward_process_to_x0(sched, spacing, data):
    """DDIM eta=0 fed the true (x0, eps) lands exactly on x_{t'} = sqrt(abar') x0 + sqrt(1-abar')
    eps at the NEXT entry of the list (not t - T//n), and the last step returns x0."""
    sched.config.timestep_spacing = spacing
    T = sched.num_train_timesteps
    sched.set_timesteps(data.draw(st.integers(1, min(T, 60))))
    g = gen(data.draw(st.integers(0, 1000)))
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=F64), torch.randn(2, 3, 4, 4,
                                                                          generator=g, dtype=F64)
    x = sched.add_noise(x0, int(sched.timesteps[0]), noise=eps)
    for t in sched.timesteps:
        out = sched.step(sched.model_output_from(x0, eps, t), t, x, eta=0.0)
        torch.testing.assert_close(out.pred_original_sample, x0, rtol=1e-7, atol=1e-7)
        t_prev = sched.previous_timestep(t)
        expected = x0 if t_prev < 0 else sched.add_noise(x0, t_prev, noise=eps)
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-7, atol=1e-7)
        x = out.prev_sample
    torch.testing.assert_close(x, x0, rtol=1e-7, atol=1e-7)


def test_ddim_linspace_step_lands_on_next_entry_not_t_minus_T_over_n():
    sched = make(timestep_spacing="linspace")
    sched.set_timesteps(4)  # 999, 666, 333, 0; T // n = 250 would land on 749
    x0, eps = torch.randn(1, 1, 2, 2, dtype=F64), torch.randn(1, 1, 2, 2, dtype=F64)
    x = sched.add_noise(x0, 999, noise=eps)
    prev = sched.step(sched.model_output_from(x0, eps, 999), 999, x).prev_sample
    torch.testing.assert_close(prev, sched.add_noise(x0, 666, noise=eps))


@given(processes(), st.integers(0, 2**16), st.data())
def test_ddim_eta_one_equals_ddpm_fixed_small(sched, seed, data):
    """Song et al. 2021: eta = 1 gives sigma^2 = DDPM's posterior (fixed_small) variance."""
    config = sched.config
    ddpm = AdvancedScheduler(config, sampler="ddpm")
    n = data.draw(st.integers(1, min(config.num_train_timesteps, 30)))
    sched.set_timesteps(n)
    ddpm.set_timesteps(n)
    t = data.draw(st.sampled_from(sched.timesteps.tolist()))
    g = gen(seed)
    x, out = torch.randn(2, 1, 3, 3, generator=g, dtype=F64), torch.randn(2, 1, 3, 3,
                                                                          generator=g, dtype=F64)
    a = sched.step(out, t, x, eta=1.0, generator=gen(seed)).prev_sample
    b = ddpm.step(out, t, x, generator=gen(seed)).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@given(processes(), st.floats(0.0, 1.0), st.integers(0, 2**16), st.data())
def test_ddim_noise_scale_is_eta_times_the_posterior_std(sched, eta, seed, data):
    """Song et al. 2021, eq. 16: sigma_t(eta) = eta * sqrt(posterior variance), linear in eta,
    so eta = 1/2 is half DDPM's fixed_small std (eta in {0, 1} cannot tell eta from eta^2).
    Each std is read off from step(z1) - step(z2) = std (z1 - z2) with two noise seeds; DDIM's
    default eta is config.eta."""
    ddpm = AdvancedScheduler(sched.config, sampler="ddpm")
    n = data.draw(st.integers(2, min(sched.num_train_timesteps, 30)))
    sched.set_timesteps(n)
    ddpm.set_timesteps(n)
    t = data.draw(st.sampled_from(sched.timesteps[:-1].tolist()))
    g = gen(seed)
    x, out = torch.randn(2, 1, 3, 3, generator=g, dtype=F64), torch.randn(2, 1, 3, 3,
                                                                          generator=g, dtype=F64)
    dz = randn_like(x, gen(seed + 1)) - randn_like(x, gen(seed + 2))

    def std(stepper, **kw):
        a = stepper.step(out, t, x, generator=gen(seed + 1), **kw).prev_sample
        b = stepper.step(out, t, x, generator=gen(seed + 2), **kw).prev_sample
        return ((a - b) * dz).sum().item() / (dz * dz).sum().item()  # least squares

    ddpm_std = std(ddpm)
    assert std(sched, eta=eta) == pytest.approx(eta * ddpm_std, rel=1e-9, abs=1e-12)
    sched.config.eta = eta
    assert std(sched) == pytest.approx(eta * ddpm_std, rel=1e-9, abs=1e-12)


# ---- DDPM ----

@given(processes(), st.sampled_from(["fixed_small", "fixed_large"]), st.integers(0, 2**16),
       st.data())
def test_ddpm_step_is_the_closed_form_posterior(sched, variance_type, seed, data):
    """q(x_t' | x_t, x0) by precision weighting of q(x_t | x_t') and q(x_t' | x0), written
    independently of the scheduler's product form (Ho et al. 2020, eq. 7)."""
    sched.config.variance_type = variance_type
    ddpm = AdvancedScheduler(sched.config, sampler="ddpm")
    T = ddpm.num_train_timesteps
    ddpm.set_timesteps(data.draw(st.integers(2, min(T, 40))))
    t = data.draw(st.sampled_from(ddpm.timesteps[:-1].tolist()))
    t_prev = ddpm.previous_timestep(t)
    g = gen(seed)
    x0, x_t = torch.randn(2, 3, 2, 2, generator=g, dtype=F64), torch.randn(2, 3, 2, 2,
                                                                          generator=g, dtype=F64)
    out = ddpm.step(ddpm.model_output_from(x0, torch.zeros_like(x0), t), t, x_t,
                    generator=gen(seed))
    a_t = ddpm.alpha_bar(t, x_t.new_zeros(())).item()  # float64 table entries
    a_p = ddpm.alpha_bar(t_prev, x_t.new_zeros(())).item()
    # convert_model_output rebuilds eps from (x0, x_t); only x0 enters the posterior mean
    x0_used = out.pred_original_sample
    step_var = 1 - a_t / a_p  # variance of q(x_t | x_t')
    var = 1 / (1 / (1 - a_p) + (a_t / a_p) / step_var)
    mean = var * (a_p**0.5 * x0_used / (1 - a_p) + (a_t / a_p) ** 0.5 * x_t / step_var)
    if variance_type == "fixed_large":
        var = step_var
    z = randn_like(x_t, gen(seed))
    torch.testing.assert_close(out.prev_sample, mean + var**0.5 * z, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_last_step_returns_x0_without_noise(sampler):
    sched = make(sampler=sampler, variance_type="fixed_large", eta=1.0)
    sched.set_timesteps(10)
    x0, x = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    last = sched.timesteps[-1]
    out = sched.step(sched.model_output_from(x0, torch.zeros_like(x0), last), last, x,
                     generator=gen(0))
    torch.testing.assert_close(out.prev_sample, out.pred_original_sample)


def test_stochastic_step_determinism():
    sched = make(sampler="ddpm")
    x, out = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    a = sched.step(out, 500, x, generator=gen(3)).prev_sample
    b = sched.step(out, 500, x, generator=gen(3)).prev_sample
    c = sched.step(out, 500, x, generator=gen(4)).prev_sample
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- x0 clipping and dynamic thresholding ----

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clip_sample_bounds_x0_and_recomputes_eps(prediction_type):
    sched = make(prediction_type, clip_sample=True, clip_sample_range=0.5)
    x_t, out = 3 * torch.randn(4, 3, 4, 4, dtype=F64), 3 * torch.randn(4, 3, 4, 4, dtype=F64)
    x0, eps = sched.convert_model_output(out, 300, x_t)
    assert x0.abs().max() <= 0.5 and (x0.abs() == 0.5).any()
    abar = sched.alpha_bar(300, x_t)
    torch.testing.assert_close(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, x_t)
    result = sched.step(out, 300, x_t)
    torch.testing.assert_close(result.pred_original_sample, x0)


def test_dynamic_thresholding():
    sched = make("sample", thresholding=True, dynamic_thresholding_ratio=0.9,
                 sample_max_value=10.0)
    x0 = torch.linspace(-4, 4, 100, dtype=F64).reshape(1, 1, 10, 10)
    x0 = torch.cat([x0, x0 / 8])  # second image inside [-1, 1]: threshold s = 1, unchanged
    x_t = torch.zeros_like(x0)
    bounded, _ = sched.convert_model_output(x0, 10, x_t)
    s = torch.quantile(x0[0].abs().flatten(), 0.9).item()
    assert 1 < s < 4
    torch.testing.assert_close(bounded[0], x0[0].clamp(-s, s) / s)
    torch.testing.assert_close(bounded[1], x0[1])
    # sample_max_value = 1 makes it plain clipping to [-1, 1]
    sched.config.sample_max_value = 1.0
    torch.testing.assert_close(sched.convert_model_output(x0, 10, x_t)[0], x0.clamp(-1, 1))


# ---- numerics everywhere ----

@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type, zero_snr", PROCESSES)
def test_no_nan_or_inf_at_any_timestep(schedule, prediction_type, zero_snr):
    g = gen(0)
    steppers = [make(prediction_type, schedule, zero_snr, sampler="ddpm", clip_sample=clip,
                     variance_type=var)
                for clip in (False, True) for var in ("fixed_small", "fixed_large")]
    steppers += [make(prediction_type, schedule, zero_snr, sampler="ddim", eta=eta)
                 for eta in (0.0, 1.0)]
    T = steppers[0].num_train_timesteps
    t_all = torch.arange(T)
    x0 = torch.randn(T, 2, 2, 2, generator=g)
    x_t = steppers[0].add_noise(x0, t_all, generator=g)
    assert torch.isfinite(x_t).all()
    assert torch.isfinite(steppers[0].get_velocity(x0, x_t, t_all)).all()
    out = 10 * torch.randn(T, 2, 2, 2, generator=g)
    for sched in steppers:
        x0_hat, eps_hat = sched.convert_model_output(out, t_all, x_t)
        assert torch.isfinite(x0_hat).all() and torch.isfinite(eps_hat).all()
        assert torch.isfinite(sched.model_output_from(x0, x_t, t_all)).all()
        for t in range(T):  # every timestep, first and last included, one step each
            result = sched.step(out[t:t + 1], t, x_t[t:t + 1], generator=g)
            assert torch.isfinite(result.prev_sample).all(), (sched.sampler, t)
            assert torch.isfinite(result.pred_original_sample).all(), (sched.sampler, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_step_keeps_dtype(dtype):
    sched = make(clip_sample=True)
    x, out = torch.randn(2, 3, 4, 4, dtype=dtype), torch.randn(2, 3, 4, 4, dtype=dtype)
    result = sched.step(out, 999, x)
    assert result.prev_sample.dtype == dtype and torch.isfinite(result.prev_sample).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_half_precision_step_is_the_float32_step_rounded_once(dtype, sampler, prediction_type):
    """A bf16/fp16 sample is updated in float32 and rounded once at the end: the step equals
    the float32 step of the same values, cast. Chaining the conversions and the update in half
    precision rounds at every operation and differs in the last bits."""
    sched = make(prediction_type, sampler=sampler, clip_sample=True)
    sched.set_timesteps(10)
    g = gen(0)
    x, out = torch.randn(2, 3, 8, 8, generator=g).to(dtype), torch.randn(2, 3, 8, 8,
                                                                          generator=g).to(dtype)
    for t in sched.timesteps.tolist():
        half = sched.step(out, t, x, eta=0.5, generator=gen(t))
        full = sched.step(out.float(), t, x.float(), eta=0.5, generator=gen(t))
        assert half.prev_sample.dtype == dtype
        assert torch.equal(half.prev_sample, full.prev_sample.to(dtype)), t
        assert torch.equal(half.pred_original_sample, full.pred_original_sample.to(dtype)), t


# ---- image-to-image ----

def test_img2img_timesteps():
    sched = make()
    sched.set_timesteps(10)
    assert len(sched.img2img_timesteps(0.0)) == 0
    assert torch.equal(sched.img2img_timesteps(1.0), sched.timesteps)
    assert torch.equal(sched.img2img_timesteps(0.5), sched.timesteps[5:])
    assert torch.equal(sched.img2img_timesteps(0.26), sched.timesteps[7:])


# ---- errors ----

@pytest.mark.parametrize("call, error, message", [
    (lambda s: AdvancedScheduler({"beta_schedule": "linear"}), TypeError,
     r"config must be a DiffusionConfig"),
    (lambda s: AdvancedScheduler(s.config, sampler="euler"), ValueError,
     r"sampler='euler'.*\['ddpm', 'ddim'\]"),
    (lambda s: s.step(torch.zeros(1, 1, 2, 2), 500, torch.zeros(1, 1, 2, 2)), ValueError,
     r"timestep=500 is not one of the scheduler's 10 timesteps"),
    (lambda s: s.step(torch.zeros(1, 1, 2, 2), 999.0, torch.zeros(1, 1, 2, 2)), TypeError,
     r"timestep=999.0 must be an int"),
    (lambda s: s.step(torch.zeros(1, 1, 2, 2), torch.tensor([999, 899]),
                      torch.zeros(1, 1, 2, 2)), ValueError, r"timestep must be one integer"),
    (lambda s: s.step(torch.zeros(1, 1, 2, 2), 999, torch.zeros(1, 1, 4, 4)), ValueError,
     r"model_output has shape \(1, 1, 2, 2\) but sample has shape \(1, 1, 4, 4\)"),
    (lambda s: s.step(torch.zeros(1, 1, 2, 2), 999, torch.zeros(1, 1, 2, 2), eta=-1.0),
     ValueError, r"eta=-1.0 must be a finite number >= 0"),
    (lambda s: s.step(torch.zeros(1, 1, 2, 2), 999, torch.zeros(1, 1, 2, 2), eta=float("nan")),
     ValueError, r"eta=nan must be a finite number >= 0"),
    (lambda s: s.step(torch.zeros(1, 1, 2, 2), 999, torch.zeros(1, 1, 2, 2), eta=float("inf")),
     ValueError, r"eta=inf must be a finite number >= 0"),
    (lambda s: s.add_noise(torch.zeros(2, 1), torch.tensor([0, 1000])), ValueError,
     r"timesteps must lie in \[0, 999\]; got values in \[0, 1000\]"),
    (lambda s: s.add_noise(torch.zeros(2, 1), torch.tensor([0.5, 1.0])), TypeError,
     r"timesteps must be integers"),
    (lambda s: s.add_noise(torch.zeros(2, 1), torch.tensor([1, 2, 3])), ValueError,
     r"timesteps has shape \(3,\); expected a scalar or \(2,\)"),
    (lambda s: s.add_noise(torch.zeros(2, 1), 5, noise=torch.zeros(2, 2)), ValueError,
     r"noise has shape \(2, 2\) but original_samples has shape \(2, 1\)"),
    # the public conversions take training timesteps only: -1 ("after the list", abar = 1) is
    # the samplers' private sentinel, and anything outside [0, T-1] or non-integer is refused
    (lambda s: s.alpha_bar(-1, torch.zeros(2, 1)), ValueError,
     r"timesteps must lie in \[0, 999\]; got values in \[-1, -1\]"),
    (lambda s: s.alpha_bar(torch.tensor([3, -5]), torch.zeros(2, 1)), ValueError,
     r"timesteps must lie in \[0, 999\]; got values in \[-5, 3\]"),
    (lambda s: s.alpha_bar(1000, torch.zeros(2, 1)), ValueError,
     r"timesteps must lie in \[0, 999\]; got values in \[1000, 1000\]"),
    (lambda s: s.alpha_bar(10.0, torch.zeros(2, 1)), TypeError, r"timesteps must be integers"),
    (lambda s: s.alpha_bar(torch.tensor([1, 2]), torch.zeros(())), ValueError,
     r"timesteps has shape \(2,\); expected a scalar for a 0-d sample"),
    (lambda s: s.convert_model_output(torch.zeros(2, 1), -1, torch.zeros(2, 1)), ValueError,
     r"timesteps must lie in \[0, 999\]; got values in \[-1, -1\]"),
    (lambda s: s.convert_model_output(torch.zeros(2, 1), 1000, torch.zeros(2, 1)), ValueError,
     r"timesteps must lie in \[0, 999\]"),
    (lambda s: s.convert_model_output(torch.zeros(2, 1), torch.tensor([0.5, 1.0]),
                                      torch.zeros(2, 1)), TypeError, r"timesteps must be integers"),
    (lambda s: s.model_output_from(torch.zeros(2, 1), torch.zeros(2, 1), -1), ValueError,
     r"timesteps must lie in \[0, 999\]; got values in \[-1, -1\]"),
    (lambda s: s.model_output_from(torch.zeros(2, 1), torch.zeros(2, 1), 2000), ValueError,
     r"timesteps must lie in \[0, 999\]"),
    (lambda s: s.model_output_from(torch.zeros(2, 1), torch.zeros(2, 1), 3.0), TypeError,
     r"timesteps must be integers"),
    (lambda s: s.get_velocity(torch.zeros(2, 1), torch.zeros(2, 1), -1), ValueError,
     r"timesteps must lie in \[0, 999\]"),
    (lambda s: s.set_timesteps(0), ValueError, r"num_inference_steps=0"),
    (lambda s: s.set_timesteps(1001), ValueError, r"num_inference_steps=1001"),
    (lambda s: s.img2img_timesteps(1.5), ValueError, r"strength=1.5 must lie in \[0, 1\]"),
    (lambda s: s.img2img_timesteps(-0.1), ValueError, r"strength=-0.1 must lie in \[0, 1\]"),
])
def test_errors(call, error, message):
    sched = make()
    sched.set_timesteps(10)
    with pytest.raises(error, match=message):
        call(sched)


def test_contradictory_config_is_caught_when_the_scheduler_is_built():
    config = DiffusionConfig()
    config.v_prediction = True  # and forgot prediction_type
    with pytest.raises(ValueError, match="contradicts"):
        AdvancedScheduler(config)


def test_small_integer_dtypes_index_the_schedule_by_value():
    """uint8 timesteps used to index the abar table as a boolean mask: with a batch of T the
    result was silently wrong, otherwise an IndexError from inside torch."""
    sched = AdvancedScheduler(DiffusionConfig(num_train_timesteps=200))
    x = torch.ones(200, 1)
    expected = sched.alpha_bar(torch.full((200,), 100), x)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        t = torch.full((200,), 100, dtype=dtype)
        torch.testing.assert_close(sched.alpha_bar(t, x), expected, rtol=0, atol=0)
        noise = torch.ones_like(x)
        torch.testing.assert_close(sched.add_noise(x, t, noise=noise),
                                   sched.add_noise(x, torch.full((200,), 100), noise=noise))
