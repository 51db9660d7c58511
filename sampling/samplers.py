"""Sampling loops, the fast solvers and classifier-free guidance.

`sample(model_fn, scheduler, x_T, ...)` is the one entry point: `model_fn(x, t)` returns the
network's output in the scheduler's prediction type (guidance already composed inside it, see
`guided_model_fn`), and the scheduler's timestep list decides where the steps go.

Every sampler below has the same signature, `(model_fn, x, timesteps, *, scheduler, eta,
generator, callback)`, and follows the list exactly: step i goes from `timesteps[i]` to
`scheduler.previous_timestep(timesteps[i])` (the next entry, whatever the spacing), and the
step after the last entry goes to abar = 1, the clean sample. Network outputs become
(x0_hat, eps_hat) in one place, `AdvancedScheduler.convert_model_output`, which also applies
x0 clipping / thresholding, so every sampler clips the same way (docs/design.md, Math).

Notation (per timestep t): abar = alphas_cumprod[t]; the variance-preserving (VP) sample is
x_t = alpha x0 + sigma_vp eps with alpha = sqrt(abar), sigma_vp = sqrt(1 - abar);
log-SNR lambda = log(alpha / sigma_vp) (DPM-Solver++); the variance-exploding (VE) view is
x~ = x_t / alpha = x0 + sigma eps with sigma = sqrt((1 - abar) / abar) (Karras et al. 2022).
The loops carry x_t in the VP scale between steps, so `model_fn` and `callback` see the same
kind of sample whichever sampler runs.
"""

import math
import reprlib
from collections.abc import Callable, Iterator

import torch

from diffusion import AdvancedScheduler, randn_like
from diffusion.scheduler import STEP_SAMPLERS, Generators  # Generators: see randn_like

# k-diffusion's default: the full ancestral noise, which makes `euler_ancestral` the same
# chain as DDIM with eta = 1 (see sample_euler_ancestral). `sample`'s eta is DDIM's only.
EULER_ANCESTRAL_ETA = 1.0
# DPM-Solver++(2M) makes its step into the list's last entry first order when the previous
# step was shorter than this fraction of it in lambda (r = h_prev / h < 1/2; see
# sample_dpmsolver_pp)
MIN_STEP_RATIO = 0.5


# ---- shared pieces ----

def _alpha_bar(scheduler: AdvancedScheduler, t) -> float:
    """abar at one timestep as a float64 python float; t = -1 (after the list) gives 1."""
    return scheduler._alpha_bar_or_one(t)


def _steps(scheduler: AdvancedScheduler,
           timesteps: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, float, float]]:
    """(i, t, abar_t, abar_next) for every step; the next timestep is the scheduler's next
    list entry, and abar_next = 1 after the last one."""
    for i, t in enumerate(timesteps):
        t_next = scheduler.previous_timestep(t)
        yield i, t, _alpha_bar(scheduler, t), _alpha_bar(scheduler, t_next)


def _denoise(model_fn: Callable, scheduler: AdvancedScheduler, x: torch.Tensor, t):
    """(x0_hat, eps_hat), each like x (B, C, H, W), from one network call at timestep t.

    The conversion (and x0 clipping, when configured) is the scheduler's.
    """
    out = model_fn(scheduler.scale_model_input(x, t), t)
    return scheduler.convert_model_output(out.to(x.dtype), t, x)


def _lambda(abar: float) -> float:
    """Half log-SNR, lambda = log(sqrt(abar) / sqrt(1 - abar)); -inf at abar = 0, +inf at 1."""
    if abar <= 0.0:
        return -math.inf
    if abar >= 1.0:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


def _sigma(abar: float) -> float:
    """VE noise level sigma = sqrt((1 - abar) / abar); inf at abar = 0 (zero terminal SNR)."""
    return math.inf if abar <= 0.0 else math.sqrt((1.0 - abar) / abar)


def _euler_to(x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, abar: float,
              abar_next: float, sigma_to: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE in (sigma, x~), returned in the VP scale.

    Karras et al. 2022, eq. 1 with sigma(t) = t and s(t) = 1 (k-diffusion's `to_d`):
    dx~/dsigma = (x~ - x0_hat) / sigma = eps_hat, so x~' = x~ + (sigma_to - sigma) eps_hat, and
    x_{t'} = sqrt(abar_next) x~'. At sigma = inf (abar = 0, zero terminal SNR) x~ is infinite;
    there we take the step's limit, x~' = x0_hat + sigma_to eps_hat (x~ = x0_hat + sigma
    eps_hat holds exactly, also after clipping, since eps_hat is recomputed from x0_hat).
    x, x0, eps: (B, C, H, W).
    """
    sigma = _sigma(abar)
    if math.isinf(sigma):
        x_ve = x0 + sigma_to * eps
    else:
        x_ve = x / math.sqrt(abar) + (sigma_to - sigma) * eps
    return math.sqrt(abar_next) * x_ve


# ---- the samplers: one signature ----

def sample_scheduler_step(model_fn: Callable, x: torch.Tensor, timesteps: torch.Tensor, *,
                          scheduler: AdvancedScheduler, eta: float = 0.0,
                          generator: Generators = None,
                          callback: Callable | None = None) -> torch.Tensor:
    """DDPM (Ho et al. 2020, eqs. 6-7) or DDIM (Song et al. 2021, eq. 12), whichever
    `scheduler.sampler` names, through `AdvancedScheduler.step`. x: (B, C, H, W)."""
    for i, t in enumerate(timesteps):
        out = model_fn(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
        if callback is not None:
            callback(i, t, x)
    return x


def sample_euler(model_fn: Callable, x: torch.Tensor, timesteps: torch.Tensor, *,
                 scheduler: AdvancedScheduler, eta: float = 0.0,
                 generator: Generators = None,
                 callback: Callable | None = None) -> torch.Tensor:
    """Euler on the probability-flow ODE in (sigma, x~) (Karras et al. 2022, eq. 1; the
    first-order part of their Algorithm 1; k-diffusion `sample_euler`). Deterministic.

    x~' = x~ + (sigma' - sigma) eps_hat for each step sigma -> sigma' of the list; the last
    step goes to sigma' = 0 (abar = 1), where x~' = x~ - sigma eps_hat = x0_hat, which is
    returned as is. eta and generator are unused. x: (B, C, H, W) at timesteps[0].

    With sigma and x~ = x_t / sqrt(abar) taken from the same discrete abar table, this is
    exactly DDIM with eta = 0: sqrt(abar') (x~ + (sigma' - sigma) eps_hat) =
    sqrt(abar') x0_hat + sqrt(1 - abar') eps_hat (Song et al. 2021, eq. 12; Karras et al.
    2022, sec. 3). The two differ only in rounding, and a test pins that (test_samplers.py).
    """
    for i, t, abar, abar_next in _steps(scheduler, timesteps):
        x0, eps = _denoise(model_fn, scheduler, x, t)
        x = x0 if abar_next == 1.0 else _euler_to(x, x0, eps, abar, abar_next, _sigma(abar_next))
        if callback is not None:
            callback(i, t, x)
    return x


def sample_euler_ancestral(model_fn: Callable, x: torch.Tensor, timesteps: torch.Tensor, *,
                           scheduler: AdvancedScheduler, eta: float = 0.0,
                           generator: Generators = None,
                           callback: Callable | None = None) -> torch.Tensor:
    """Euler ancestral in (sigma, x~) (k-diffusion `sample_euler_ancestral`, Crowson 2022).

    Each step sigma -> sigma' takes an Euler step down to sigma_down, then adds fresh noise
    of std sigma_up (k-diffusion `get_ancestral_step`, eta = EULER_ANCESTRAL_ETA = 1):
    sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)),
    sigma_down = sqrt(sigma'^2 - sigma_up^2), x~' = x~ + (sigma_down - sigma) eps_hat +
    sigma_up z, z ~ N(0, I) from `generator`. The last step (sigma' = 0) returns x0_hat with
    no noise. `sample`'s eta (DDIM's) is not used. x: (B, C, H, W) at timesteps[0].

    In the VP scale, sqrt(abar') sigma_up is DDIM's eta = 1 noise std and sqrt(abar')
    sigma_down its eps_hat coefficient, so this is the same chain as DDIM(eta = 1), noise
    draw for noise draw (a test pins it).
    """
    for i, t, abar, abar_next in _steps(scheduler, timesteps):
        x0, eps = _denoise(model_fn, scheduler, x, t)
        if abar_next == 1.0:
            x = x0
        else:
            sigma, sigma_next = _sigma(abar), _sigma(abar_next)
            ratio = sigma_next / sigma  # 0 when sigma = inf
            sigma_up = min(sigma_next, EULER_ANCESTRAL_ETA * sigma_next
                           * math.sqrt(max(1.0 - ratio**2, 0.0)))
            sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
            x = _euler_to(x, x0, eps, abar, abar_next, sigma_down)
            x = x + math.sqrt(abar_next) * sigma_up * randn_like(x, generator)
        if callback is not None:
            callback(i, t, x)
    return x


def sample_dpmsolver_pp(model_fn: Callable, x: torch.Tensor, timesteps: torch.Tensor, *,
                        scheduler: AdvancedScheduler, eta: float = 0.0,
                        generator: Generators = None,
                        callback: Callable | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): multistep, second order, data prediction (Lu et al. 2022,
    "DPM-Solver++", Algorithm 2). Deterministic; eta and generator are unused.

    With alpha = sqrt(abar), sigma_vp = sqrt(1 - abar), lambda = log(alpha / sigma_vp) and
    h = lambda_{t'} - lambda_t for a step t -> t':
      first order (= DDIM, eta = 0):
        x_{t'} = (sigma_vp_{t'} / sigma_vp_t) x_t + alpha_{t'} (1 - e^{-h}) x0_hat_t
      second order, with the previous step's x0_hat_{t-} and r = h_prev / h:
        D = (1 + 1 / (2r)) x0_hat_t - 1 / (2r) x0_hat_{t-}, used in place of x0_hat_t.
    The first step has no history and the last step (to abar = 1, lambda = +inf, h = inf,
    r = 0) must be first order; there the update is exactly x0_hat_t, so the output carries
    no residual noise. The step into the list's last entry is first order too when it is more
    than twice as long in lambda as the one before (r < 1/2), where the extrapolation weight
    1/(2r) exceeds 1 and amplifies the two estimates' difference (in the spirit of
    DPM-Solver's "lower order final"). lambda grows like -log(t) near t = 0, so with
    `linspace` or `leading` spacing that step, into t = 0, has r ~ 0.2 at any step count.
    Measured on Gaussian data against the closed-form ODE solution (tests/test_samplers.py),
    max error at 10 / 20 / 40 / 80 / 160 steps on `leading`: 0.27 / 0.060 / 2.6e-4 / 3.9e-3 /
    1.5e-3, against 0.57 / 0.34 / 0.12 / 0.030 / 7.0e-3 for plain 2M. With `trailing`
    spacing (the default) it applies only from ~150 steps on, where integer rounding makes
    the last steps uneven, and there it costs a little: 4.4e-4 -> 7.0e-4 at 300 steps,
    1.4e-4 -> 2.7e-4 at 700; below that trailing is unchanged. Only this one step is
    guarded: guarding every step with r < 1/2 made trailing at 700 steps 5.2e-3. 1 - e^{-h}
    is computed as -expm1(-h), sigma ratios from float64 abar, so zero terminal SNR
    (lambda = -inf at the first step) stays finite.
    x: (B, C, H, W) at timesteps[0].
    """
    x0_prev, h_prev = None, None
    into_last_entry = len(timesteps) - 2  # the step index whose target is the list's last entry
    for i, t, abar, abar_next in _steps(scheduler, timesteps):
        x0, _ = _denoise(model_fn, scheduler, x, t)
        h = _lambda(abar_next) - _lambda(abar)
        last = abar_next == 1.0
        if x0_prev is None or last or (i == into_last_entry and h_prev < MIN_STEP_RATIO * h):
            d = x0
        else:
            half_inv_r = 0.5 * h / h_prev  # 1 / (2r); 0 after a step from lambda = -inf
            d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
        sigma_ratio = math.sqrt((1.0 - abar_next) / (1.0 - abar))
        x = sigma_ratio * x + math.sqrt(abar_next) * -math.expm1(-h) * d
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x)
    return x


SAMPLER_FNS: dict[str, Callable] = {
    "ddpm": sample_scheduler_step,
    "ddim": sample_scheduler_step,
    "dpmsolver++": sample_dpmsolver_pp,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
}
SAMPLERS = tuple(SAMPLER_FNS)


def check_sampler(name: str) -> str:
    """Return `name` if it is a known sampler, else a ValueError listing the known ones."""
    if name not in SAMPLER_FNS:
        raise ValueError(f"sampler={name!r} is not one of {list(SAMPLERS)}")
    return name


@torch.no_grad()
def sample(model_fn: Callable, scheduler: AdvancedScheduler, x_T: torch.Tensor, *,
           sampler: str = "ddim", num_inference_steps: int = 50, eta: float = 0.0,
           generator: Generators = None, callback: Callable | None = None,
           timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """Run the reverse process from x_T (B, C, H, W) and return x_0 (B, C, H, W).

    sampler: one of SAMPLERS; "ddpm"/"ddim" run through AdvancedScheduler.step, the others
    are the solvers above. `scheduler.set_timesteps(num_inference_steps)` gives the list;
    `timesteps` (optional) runs only a tail of it, for image-to-image, with x_T already
    noised to timesteps[0] (e.g. `scheduler.img2img_timesteps(strength)`); anything but a
    tail is refused, since each step lands on the list's next entry. eta: DDIM's noise
    scale (the other samplers ignore it). generator: all randomness (DDPM, DDIM eta > 0,
    euler_ancestral): one torch.Generator for the batch, or a list of B, one per image, so
    that image i depends on generator[i] only. callback(i, t, x) after every step, x being
    the sample at the next timestep (the final sample after the last). Half-precision
    samples are updated in float32 and returned in x_T's dtype.
    """
    check_sampler(sampler)
    scheduler_for_sampler = scheduler
    if sampler in STEP_SAMPLERS and scheduler.sampler != sampler:
        scheduler_for_sampler = AdvancedScheduler(scheduler.config, sampler=sampler)
    scheduler_for_sampler.set_timesteps(num_inference_steps, device=x_T.device)
    if timesteps is None:
        timesteps = scheduler_for_sampler.timesteps
    else:
        _check_tail(timesteps, scheduler_for_sampler.timesteps)
    work_dtype = torch.promote_types(x_T.dtype, torch.float32)
    x = x_T.to(work_dtype) * scheduler_for_sampler.init_noise_sigma
    x = SAMPLER_FNS[sampler](model_fn, x, timesteps, scheduler=scheduler_for_sampler,
                             eta=eta, generator=generator, callback=callback)
    return x.to(x_T.dtype)


def _check_tail(timesteps, full: torch.Tensor) -> None:
    """ValueError unless `timesteps` is a 1-D integer tensor equal to full[len(full) - k:]."""
    if not isinstance(timesteps, torch.Tensor) or timesteps.ndim != 1 \
            or timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool:
        what = (f"a {timesteps.dtype} tensor of shape {tuple(timesteps.shape)}"
                if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__)
        raise ValueError(f"timesteps must be a 1-D integer tensor (a tail of "
                         f"scheduler.timesteps); got {what}")
    k, n = len(timesteps), len(full)
    if k > n or not torch.equal(timesteps.cpu(), full[n - k:].cpu()):
        raise ValueError(
            f"timesteps={reprlib.repr(timesteps.tolist())} is not a tail of the scheduler's "
            f"{n} timesteps {reprlib.repr(full.tolist())}: each step lands on the list's next "
            "entry, so only scheduler.timesteps[n - k:] (e.g. img2img_timesteps(strength)) "
            "gives the right distribution")


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eqs. 15-16): scale the guided output to the
    per-sample standard deviation of the conditional one, then mix: phi * rescaled +
    (1 - phi) * guided. Counters the over-exposure of large guidance scales."""
    dims = tuple(range(1, guided.ndim))
    std_guided = guided.std(dim=dims, keepdim=True).clamp(min=torch.finfo(guided.dtype).tiny)
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / std_guided)
    return phi * rescaled + (1 - phi) * guided


def guided_model_fn(denoise: Callable, cond: tuple, uncond: tuple, guidance_scale: float, *,
                    guidance_rescale: float = 0.0, batched: bool = True) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022): out_u + s (out_c - out_u).

    denoise(x, t, context, mask) -> (B, ...) output; cond / uncond: (context, mask) pairs of
    batch B. batched: both branches in one forward of 2B (fast), else two forwards of B (half
    the peak activation memory). Scale 1 is the conditional output alone (the unconditional
    forward is skipped); scale 0 the unconditional one. guidance_rescale > 0 applies
    `rescale_guidance`.
    """
    def model_fn(x: torch.Tensor, t) -> torch.Tensor:
        if guidance_scale == 1.0:
            return denoise(x, t, *cond)
        if batched:
            context = torch.cat([uncond[0], cond[0]])
            mask = torch.cat([uncond[1], cond[1]])
            out_uncond, out_cond = denoise(torch.cat([x, x]), t, context, mask).chunk(2)
        else:
            out_uncond, out_cond = denoise(x, t, *uncond), denoise(x, t, *cond)
        guided = out_uncond + guidance_scale * (out_cond - out_uncond)
        if guidance_rescale > 0:
            guided = rescale_guidance(guided, out_cond, guidance_rescale)
        return guided

    return model_fn
