"""Exact denoisers for Gaussian-mixture data: an analytic oracle for samplers.

If every pixel of x0 is drawn independently from sum_k w_k N(mu_k, s_k^2), then
x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is a mixture too, and the MMSE denoiser E[x0 | x_t]
is closed form. A sampler driven by it must reproduce the data distribution up to its
discretisation error, with no training involved; the tests use this to check the scheduler
and the samplers, and `python -m diffusion` shows it.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixture:
    """Per-pixel 1-D mixture sum_k weights[k] N(means[k], stds[k]^2); stds may be 0."""

    weights: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]

    def __post_init__(self):
        k = len(self.weights)
        if k == 0 or len(self.means) != k or len(self.stds) != k:
            raise ValueError(f"weights, means and stds must have the same non-zero length; got "
                             f"{len(self.weights)}, {len(self.means)}, {len(self.stds)}")
        values = (*self.weights, *self.means, *self.stds)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"weights, means and stds must be finite; got {self.weights}, "
                             f"{self.means}, {self.stds}")
        if any(w <= 0 for w in self.weights) or abs(sum(self.weights) - 1) > 1e-9:
            raise ValueError(f"weights={self.weights} must be positive and sum to 1")
        if any(s < 0 for s in self.stds):
            raise ValueError(f"stds={self.stds} must be >= 0")

    def mean(self) -> float:
        return sum(w * m for w, m in zip(self.weights, self.means))

    def std(self) -> float:
        second = sum(w * (s**2 + m**2) for w, m, s in zip(self.weights, self.means, self.stds))
        return (second - self.mean() ** 2) ** 0.5

    def sample(self, shape, generator: torch.Generator | None = None,
               dtype=torch.float64) -> torch.Tensor:
        """Draw x0 of `shape` (independent pixels)."""
        w = torch.tensor(self.weights, dtype=torch.float64)
        k = torch.multinomial(w, int(torch.Size(shape).numel()), replacement=True,
                              generator=generator).reshape(shape)
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        x0 = torch.tensor(self.means, dtype=torch.float64)[k] + \
            torch.tensor(self.stds, dtype=torch.float64)[k] * z
        return x0.to(dtype)

    def denoise(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; alpha_bar broadcasts to x_t.

        Component k gives x_t ~ N(sqrt(abar) mu_k, abar s_k^2 + 1 - abar), with posterior mean
        mu_k + sqrt(abar) s_k^2 / (abar s_k^2 + 1 - abar) (x_t - sqrt(abar) mu_k); the
        responsibilities weight these by each component's likelihood of x_t.
        """
        x = x_t.double().unsqueeze(-1)  # (..., 1) against (K,)
        a = torch.as_tensor(alpha_bar, dtype=torch.float64).unsqueeze(-1)
        mu = torch.tensor(self.means, dtype=torch.float64)
        var0 = torch.tensor(self.stds, dtype=torch.float64) ** 2
        var_t = a * var0 + (1 - a)  # (..., K)
        centred = x - a.sqrt() * mu
        log_lik = -0.5 * centred**2 / var_t - 0.5 * var_t.log()
        log_w = torch.tensor(self.weights, dtype=torch.float64).log()
        resp = torch.softmax(log_lik + log_w, dim=-1)
        post_mean = mu + a.sqrt() * var0 / var_t * centred
        return (resp * post_mean).sum(-1).to(x_t.dtype)


def exact_model_fn(scheduler, mixture: GaussianMixture) -> Callable:
    """model_fn(x_t, t) that returns the exact denoiser in `scheduler.prediction_type`,
    computed in float64 and cast once to x_t's dtype (in float32, eps = (x_t - sqrt(abar) x0)
    / sqrt(1 - abar) would lose ~5e-5 to cancellation near t = 0)."""

    def model_fn(x_t: torch.Tensor, t) -> torch.Tensor:
        x = x_t.double()
        abar = scheduler.alpha_bar(t, x)
        x0 = mixture.denoise(x, abar)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return scheduler.model_output_from(x0, eps, t).to(x_t.dtype)

    return model_fn


def sample_exact(scheduler, mixture: GaussianMixture, num_samples: int, *,
                 eta: float | None = None, seed: int = 0) -> torch.Tensor:
    """Run `scheduler.step` over its timesteps with the exact denoiser; (num_samples,) float64.

    Starts from x_T ~ N(0, 1) (init_noise_sigma = 1) with one generator for all randomness.
    """
    generator = torch.Generator().manual_seed(seed)
    model_fn = exact_model_fn(scheduler, mixture)
    x = torch.randn(num_samples, 1, 1, 1, generator=generator, dtype=torch.float64)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model_fn(x, t), t, x, eta=eta, generator=generator).prev_sample
    return x.flatten()
