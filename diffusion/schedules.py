"""Beta schedules, signal-to-noise ratios and inference timestep spacings.

Everything here is computed in float64; the scheduler stores float32 copies. Notation:
betas b_t, alphas a_t = 1 - b_t, alphas_cumprod abar_t = prod_{s<=t} a_s, t = 0..T-1.
"""

import math

import torch

# Nichol & Dhariwal 2021, eq. 17: the small offset s keeps beta_0 from being tiny.
COSINE_S = 0.008
# Nichol & Dhariwal 2021: betas are clipped so the cosine schedule has no singularity at t=T.
COSINE_MAX_BETA = 0.999
# GeoDiff's sigmoid schedule spans sigmoid(-6)..sigmoid(6) before rescaling to the beta range.
SIGMOID_RANGE = 6.0


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> torch.Tensor:
    """Betas (T,) float64 for a named schedule (docs/design.md gives the formulas).

    linear: linspace(beta_start, beta_end, T) (Ho et al. 2020).
    quadratic / scaled_linear: linspace(sqrt(beta_start), sqrt(beta_end), T)^2 (latent diffusion).
    cosine: b_i = min(1 - f((i+1)/T) / f(i/T), 0.999), f(u) = cos((u+s)/(1+s) pi/2)^2
        (Nichol & Dhariwal 2021); beta_start and beta_end are not used.
    sigmoid: sigmoid(linspace(-6, 6, T)) rescaled to [beta_start, beta_end] (Xu et al. 2022).
    """
    T = num_train_timesteps
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise ValueError(f"num_train_timesteps={T!r} must be an int >= 2")
    f64 = torch.float64
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=f64)
    if schedule in ("quadratic", "scaled_linear"):
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=f64) ** 2
    if schedule == "cosine":
        u = torch.arange(T + 1, dtype=f64) / T
        f = torch.cos((u + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
        return torch.clamp(1 - f[1:] / f[:-1], max=COSINE_MAX_BETA)
    if schedule == "sigmoid":
        s = torch.sigmoid(torch.linspace(-SIGMOID_RANGE, SIGMOID_RANGE, T, dtype=f64))
        return s * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule={schedule!r} is not one of "
                     "['linear', 'quadratic', 'scaled_linear', 'cosine', 'sigmoid']")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so abar_{T-1} = 0 exactly (Lin et al. 2023, Algorithm 1).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is unchanged;
    the last beta becomes 1 (the last step is pure noise), all others stay in (0, 1).
    """
    sqrt_abar = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - b_s), (T,) float64."""
    return torch.cumprod(1 - betas.double(), dim=0)


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def inference_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int,
                        steps_offset: int = 0) -> torch.Tensor:
    """The n strictly decreasing int64 timesteps a sampler visits (docs/design.md).

    leading:  k * (T // n) + steps_offset for k = n-1..0 (DDIM paper, Stable Diffusion).
    trailing: round(T - k * T / n) - 1 for k = 0..n-1; starts at T-1 (Lin et al. 2023, Table 2).
    linspace: round(linspace(0, T-1, n)), reversed; for n >= 2 it starts at T-1 and ends at 0,
        while n = 1 gives [0] (linspace's single point is its start, 0): one step from the
        least noisy timestep, as DESIGN's formula says; use trailing for a one-step sampler.
    steps_offset (leading only) must be >= 0: -1 is the samplers' "after the last entry"
    (abar = 1) and no timestep may fall below 0.
    """
    T, n = num_train_timesteps, num_inference_steps
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= T:
        raise ValueError(f"num_inference_steps={n!r} must be an int in [1, "
                         f"num_train_timesteps={T}]")
    if not isinstance(steps_offset, int) or isinstance(steps_offset, bool) or steps_offset < 0:
        raise ValueError(f"steps_offset={steps_offset!r} must be an int >= 0")
    f64 = torch.float64
    if spacing == "leading":
        steps = torch.arange(n - 1, -1, -1, dtype=torch.int64) * (T // n) + steps_offset
        if steps[0] > T - 1:
            raise ValueError(
                f"steps_offset={steps_offset} pushes the first 'leading' timestep to "
                f"{int(steps[0])}, past num_train_timesteps - 1 = {T - 1}")
        return steps
    if steps_offset:
        raise ValueError(f"steps_offset={steps_offset} only applies to timestep_spacing="
                         f"'leading', not {spacing!r}")
    if spacing == "trailing":
        k = torch.arange(n, dtype=f64)
        return (torch.round(T - k * T / n) - 1).to(torch.int64)
    if spacing == "linspace":
        return torch.round(torch.linspace(0, T - 1, n, dtype=f64)).flip(0).to(torch.int64)
    raise ValueError(f"timestep_spacing={spacing!r} is not one of "
                     "['leading', 'trailing', 'linspace']")
