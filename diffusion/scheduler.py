"""AdvancedScheduler: the forward process q(x_t | x0), the eps / x0 / v parameterisations, and
one reverse step of DDPM (Ho et al. 2020) or DDIM (Song et al. 2021).

Conventions (docs/design.md): abar_t = prod_{s<=t} (1 - b_s) for t = 0..T-1; a step from t goes to
the next entry t' of `self.timesteps`, and after the last entry abar_{t'} = 1 (the clean image).
Coefficients come from float64 tables and are cast once to the sample's dtype.
"""

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from losses.targets import broadcast_to_sample, training_target

from .config import DiffusionConfig
from .schedules import (
    alphas_cumprod_from_betas,
    inference_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
)

STEP_SAMPLERS = ("ddpm", "ddim")
# What every `generator` argument of the forward and reverse process accepts: None (the global
# RNG), one torch.Generator for the whole batch, or one generator per image (see randn_like).
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class SchedulerOutput:
    """prev_sample: x_{t'} (B, C, H, W); pred_original_sample: the (clipped) x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like x (B, ...), in x's dtype and on x's device.

    generator: None (the global RNG); one torch.Generator for the whole tensor; or a list or
    tuple of B generators, one per row: row i is drawn from generator[i] alone, so it does
    not depend on the rest of the batch (the pipeline gives each image its own seed this way;
    a row equals what that generator gives for a batch of one). Each draw happens on its
    generator's device, so a CPU generator gives the same numbers whatever device x lives on.
    """
    if isinstance(generator, (list, tuple)):
        if x.ndim == 0 or len(generator) != x.shape[0]:
            batch = "a 0-d tensor" if x.ndim == 0 else f"a batch of {x.shape[0]}"
            raise ValueError(f"generator is a {type(generator).__name__} of {len(generator)} "
                             f"generators but x is {batch}; pass one generator per row")
        rows = [_randn(x.shape[1:], x, g) for g in generator]
        return torch.stack(rows) if rows else x.new_empty(x.shape)
    return _randn(x.shape, x, generator)


def _randn(shape: torch.Size, like: torch.Tensor,
           generator: torch.Generator | None) -> torch.Tensor:
    """torch.randn(shape) from `generator` on its own device, moved to `like`'s device."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, a list or tuple of them, or "
                        f"None; got {type(generator).__name__}")
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Half-precision samples are updated in float32; float32/float64 stay as they are."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def check_strength(strength) -> float:
    """An image-to-image strength as a float in [0, 1]: any real number (python, numpy or a
    one-element tensor) in range; TypeError or ValueError naming `strength` otherwise."""
    if isinstance(strength, torch.Tensor) and strength.numel() == 1 \
            and not (strength.dtype == torch.bool or strength.is_complex()):
        strength = strength.item()
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"strength must be a real number in [0, 1]; got "
                        f"{type(strength).__name__} {strength!r}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength={float(strength)!r} must lie in [0, 1]")
    return float(strength)


class AdvancedScheduler:
    """Noise schedule plus DDPM / DDIM steps for one `DiffusionConfig`.

    Attributes: betas, alphas, alphas_cumprod ((T,) float32); alphas_cumprod_float64 (the table
    every coefficient is computed from: 1 - abar near t = 0 needs float64); timesteps (int64,
    strictly decreasing; all T training timesteps until `set_timesteps` is called);
    init_noise_sigma; prediction_type; sampler ("ddpm" or "ddim": what `step` does).
    """

    def __init__(self, config: DiffusionConfig, sampler: str | None = None):
        if not isinstance(config, DiffusionConfig):
            raise TypeError(f"config must be a DiffusionConfig; got {type(config).__name__}")
        config.validate()
        if sampler is None:
            sampler = config.sampler if config.sampler in STEP_SAMPLERS else "ddim"
        if sampler not in STEP_SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: AdvancedScheduler.step implements "
                             f"{list(STEP_SAMPLERS)}; the other samplers live in sampling/")
        self.config = config
        self.sampler = sampler
        self.prediction_type = config.prediction_type
        self.num_train_timesteps = T = config.num_train_timesteps
        betas = make_betas(config.beta_schedule, T, config.beta_start, config.beta_end)
        if config.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.alphas_cumprod_float64 = alphas_cumprod_from_betas(betas)
        self.betas = betas.float()
        self.alphas = (1 - betas).float()
        self.alphas_cumprod = self.alphas_cumprod_float64.float()
        self.init_noise_sigma = 1.0  # x_T ~ N(0, I) for a variance-preserving process
        self.num_inference_steps: int | None = None
        self._set_timestep_list(torch.arange(T - 1, -1, -1, dtype=torch.int64))

    def __len__(self) -> int:
        return self.num_train_timesteps

    # ---- timesteps ----

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Pick the inference timesteps with `config.timestep_spacing` (docs/design.md)."""
        steps = inference_timesteps(self.config.timestep_spacing, self.num_train_timesteps,
                                    num_inference_steps, self.config.steps_offset)
        self.num_inference_steps = num_inference_steps
        self._set_timestep_list(steps.to(device) if device is not None else steps)

    def _set_timestep_list(self, timesteps: torch.Tensor) -> None:
        self.timesteps = timesteps
        values = timesteps.tolist()
        self._next = dict(zip(values, values[1:] + [-1]))

    def previous_timestep(self, timestep) -> int:
        """The timestep a step from `timestep` lands on: the next entry of the list, or -1
        (meaning abar = 1, the clean sample) after the last."""
        return self._next[self._check_in_list(timestep)]

    def img2img_timesteps(self, strength: float) -> torch.Tensor:
        """The tail of `self.timesteps` that image-to-image (SDEdit) runs for `strength`.

        round(n * strength) steps remain; the input is noised to the first of them. strength 0
        leaves no step (the input comes back unchanged), strength 1 runs the whole list.
        """
        strength = check_strength(strength)
        n = len(self.timesteps)
        keep = min(int(round(n * strength)), n)
        return self.timesteps[n - keep:]

    def _check_in_list(self, timestep) -> int:
        t = _as_int_timestep(timestep)
        if t not in self._next:
            raise ValueError(
                f"timestep={t} is not one of the scheduler's {len(self._next)} timesteps "
                f"({self.timesteps[0].item()}..{self.timesteps[-1].item()}); step from an entry "
                "of scheduler.timesteps (after set_timesteps, if you called it)")
        return t

    # ---- forward process and parameterisations ----

    def alpha_bar(self, timesteps, like: torch.Tensor) -> torch.Tensor:
        """abar at `timesteps` (an int or (B,) ints in [0, T-1]) broadcast to `like` (B, ...)
        and cast to its dtype."""
        t = self._check_timesteps(timesteps, like)
        return broadcast_to_sample(self.alphas_cumprod_float64[t], like)

    def _alpha_bar_or_one(self, timestep) -> float:
        """abar at one timestep as a float64 python float, where -1 (the step after the last
        entry of the list, see previous_timestep) gives 1, the clean sample. For the reverse
        steps here and in sampling/; the public conversions refuse -1."""
        t = int(timestep)
        if not -1 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep={t} must lie in [-1, {self.num_train_timesteps - 1}]")
        return 1.0 if t == -1 else float(self.alphas_cumprod_float64[t])

    def _check_timesteps(self, timesteps, x: torch.Tensor) -> torch.Tensor:
        """`timesteps` as a CPU int64 tensor: a scalar, or (1,) or (B,) for x (B, ...), with
        values in [0, T-1]; TypeError or ValueError naming what was received otherwise."""
        t = torch.as_tensor(timesteps)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timesteps must be integers; got dtype {t.dtype}")
        t = t.cpu().long()  # uint8 would index the schedule's table as a mask, and wraps 1000
        if x.ndim == 0:
            if t.ndim != 0:
                raise ValueError(f"timesteps has shape {tuple(t.shape)}; expected a scalar for "
                                 "a 0-d sample")
        elif t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"timesteps has shape {tuple(t.shape)}; expected a scalar or "
                             f"({x.shape[0]},) for a batch of {x.shape[0]}")
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]; got "
                             f"values in [{t.min().item()}, {t.max().item()}]")
        return t

    def _sqrt_coefficients(self, t: torch.Tensor, like: torch.Tensor):
        """(sqrt(abar_t), sqrt(1 - abar_t)) for checked timesteps t, computed in float64 from
        the float64 table and cast once, when broadcast to `like` (B, ...): 1 - abar taken
        after a cast to float32 loses ~3e-4 relative near t = 0, and in bf16/fp16 it is 0."""
        abar = self.alphas_cumprod_float64[t]
        return broadcast_to_sample(abar.sqrt(), like), broadcast_to_sample((1 - abar).sqrt(), like)

    def add_noise(self, original_samples: torch.Tensor, timesteps, noise=None,
                  generator: Generators = None) -> torch.Tensor:
        """Sample q(x_t | x0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. eq. 4).

        original_samples: (B, ...); timesteps: an int or (B,) ints; noise: like x0, drawn from
        `generator` (one, or one per image: see randn_like) when None.
        """
        t = self._check_timesteps(timesteps, original_samples)
        if noise is None:
            noise = randn_like(original_samples, generator)
        elif noise.shape != original_samples.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but original_samples has "
                             f"shape {tuple(original_samples.shape)}")
        sqrt_abar, sqrt_one_minus_abar = self._sqrt_coefficients(t, original_samples)
        return sqrt_abar * original_samples + sqrt_one_minus_abar * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022); `sample` is x0,
        (B, ...), noise like it; timesteps: an int or (B,) ints."""
        t = self._check_timesteps(timesteps, sample)
        if noise.shape != sample.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but sample has shape "
                             f"{tuple(sample.shape)}")
        return training_target("v_prediction", sample, noise, self.alphas_cumprod_float64[t])

    def model_output_from(self, x0: torch.Tensor, eps: torch.Tensor, timesteps) -> torch.Tensor:
        """Express an (x0, eps) pair, each (B, ...), in this scheduler's prediction type: eps,
        x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0. timesteps: an int or (B,) ints."""
        if self.prediction_type == "v_prediction":
            return self.get_velocity(x0, eps, timesteps)
        self._check_timesteps(timesteps, x0)
        if eps.shape != x0.shape:
            raise ValueError(f"eps has shape {tuple(eps.shape)} but x0 has shape "
                             f"{tuple(x0.shape)}")
        return eps if self.prediction_type == "epsilon" else x0

    def convert_model_output(self, model_output: torch.Tensor, timesteps,
                             sample: torch.Tensor, clip: bool = True):
        """(x0_hat, eps_hat), each like `sample` (B, ...), from a network output in this
        scheduler's prediction type at `timesteps` (an int or (B,) ints in [0, T-1]).

        epsilon: x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
        v_prediction: x0 = sqrt(abar) x_t - sqrt(1-abar) v, eps = sqrt(1-abar) x_t + sqrt(abar) v
        sample: eps = (x_t - sqrt(abar) x0) / sqrt(1-abar)
        With `clip` (and config.clip_sample or config.thresholding), x0_hat is clipped or
        dynamically thresholded and eps_hat recomputed from it, so the update stays consistent.
        The samplers in sampling/ use this too.
        """
        t = self._check_timesteps(timesteps, sample)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample "
                             f"has shape {tuple(sample.shape)}")
        sqrt_abar, sqrt_one_minus_abar = self._sqrt_coefficients(t, sample)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - sqrt_one_minus_abar * eps) / sqrt_abar
        elif self.prediction_type == "v_prediction":
            x0 = sqrt_abar * sample - sqrt_one_minus_abar * model_output
            eps = sqrt_one_minus_abar * sample + sqrt_abar * model_output
        else:
            x0 = model_output
            eps = (sample - sqrt_abar * x0) / sqrt_one_minus_abar
        if clip and (self.config.thresholding or self.config.clip_sample):
            x0 = self._bound_x0(x0)
            eps = (sample - sqrt_abar * x0) / sqrt_one_minus_abar
        return x0, eps

    def _bound_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022, sec. 2.3) when config.thresholding, else
        static clipping to +-clip_sample_range."""
        cfg = self.config
        if not cfg.thresholding:
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        flat = x0.reshape(x0.shape[0], -1).abs().float()
        s = torch.quantile(flat, cfg.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1.0, max=cfg.sample_max_value)  # s = 1 is plain clipping to [-1, 1]
        s = broadcast_to_sample(s, x0)
        return torch.maximum(torch.minimum(x0, s), -s) / s

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """DDPM/DDIM feed x_t to the network unscaled (the Euler samplers scale inside)."""
        return sample

    # ---- reverse steps ----

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             eta: float | None = None, generator: Generators = None) -> SchedulerOutput:
        """One reverse step from `timestep` to the next entry of `self.timesteps`.

        model_output: (B, C, H, W), or the model's {"sample": tensor} as the guide passes it;
        sample: (B, C, H, W); timestep: an int or one-element tensor from
        `self.timesteps`; eta: DDIM noise scale (default config.eta; DDPM ignores it);
        generator: the step noise's, one or one per image (see randn_like).
        """
        if isinstance(model_output, dict):  # the guide passes AdvancedUNet's {"sample": ...}
            model_output = model_output["sample"]
        t = self._check_in_list(timestep)
        t_prev = self._next[t]
        dtype = sample.dtype
        work = _compute_dtype(sample)
        x_t = sample.to(work)
        x0, eps = self.convert_model_output(model_output.to(work), t, x_t)
        abar_t, abar_prev = self._alpha_bar_or_one(t), self._alpha_bar_or_one(t_prev)
        if self.sampler == "ddpm":
            prev, std = self._ddpm_mean_std(x0, x_t, abar_t, abar_prev)
        else:
            eta = self.config.eta if eta is None else eta
            if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (
                    0 <= eta < math.inf):
                raise ValueError(f"eta={eta!r} must be a finite number >= 0")
            prev, std = self._ddim_mean_std(x0, eps, abar_t, abar_prev, eta)
        if std > 0 and t_prev >= 0:
            prev = prev + std * randn_like(x_t, generator)
        return SchedulerOutput(prev.to(dtype), x0.to(dtype))

    def _ddpm_mean_std(self, x0, x_t, abar_t: float, abar_prev: float):
        """Posterior q(x_{t'} | x_t, x0) (Ho et al. 2020, eqs. 6-7) for a skip t -> t'.

        With alpha~ = abar_t / abar_t' and b~ = 1 - alpha~:
        mean = sqrt(abar_t') b~ / (1 - abar_t) x0 + sqrt(alpha~) (1 - abar_t') / (1 - abar_t) x_t,
        variance fixed_small = (1 - abar_t') / (1 - abar_t) b~, fixed_large = b~.
        No noise is added on the final step (t' = -1), as in Ho et al. Algorithm 2.
        """
        alpha_step = abar_t / abar_prev
        beta_step = 1 - alpha_step
        coef_x0 = abar_prev**0.5 * beta_step / (1 - abar_t)
        coef_xt = alpha_step**0.5 * (1 - abar_prev) / (1 - abar_t)
        if self.config.variance_type == "fixed_small":
            variance = (1 - abar_prev) / (1 - abar_t) * beta_step
        else:
            variance = beta_step
        return coef_x0 * x0 + coef_xt * x_t, max(variance, 0.0) ** 0.5

    @staticmethod
    def _ddim_mean_std(x0, eps, abar_t: float, abar_prev: float, eta: float):
        """DDIM update (Song et al. 2021, eq. 12); eta=0 is deterministic, eta=1 has DDPM's
        fixed_small variance.

        sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t')
        x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t' - sigma^2) eps + sigma z
        """
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        direction = max(1 - abar_prev - sigma**2, 0.0) ** 0.5  # eta > 1 would make it negative
        return abar_prev**0.5 * x0 + direction * eps, sigma


def _as_int_timestep(timestep: int | torch.Tensor) -> int:
    """A python int from an int or a one-element integer tensor; a clear error otherwise."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1 or timestep.dtype.is_floating_point \
                or timestep.dtype == torch.bool:
            raise ValueError(f"timestep must be one integer; got a {timestep.dtype} tensor of "
                             f"shape {tuple(timestep.shape)}")
        return int(timestep.item())
    if isinstance(timestep, bool) or not isinstance(timestep, int):
        raise TypeError(f"timestep={timestep!r} must be an int or a one-element int tensor")
    return timestep
