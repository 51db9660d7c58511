"""AdvancedLossFunctions: the guide's loss functions, as static methods.

Every loss takes `reduction`:
- "mean": one scalar, the mean over all elements (the guide's behaviour);
- "per_sample": (B,), the mean over every dimension but the batch, so a caller (the trainer)
  can weight samples before averaging;
- "none": the unreduced elementwise loss.
"""

import torch

from .targets import as_alphas_cumprod, broadcast_to_sample, check_prediction_type, min_snr_weight

REDUCTIONS = ("mean", "per_sample", "none")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are reduced in float32; float32/float64 keep their precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_pair(pred: torch.Tensor, other: torch.Tensor, name: str = "target") -> None:
    """ValueError unless `other` (called `name` in the message) has pred's shape."""
    if pred.shape != other.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but {name} has shape "
                         f"{tuple(other.shape)}; they must match")


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce an elementwise loss (B, ...) as `reduction` says (see the module docstring)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "per_sample":
        if loss.ndim == 0:
            raise ValueError("reduction='per_sample' needs inputs with a batch dimension "
                             "(B, ...); got 0-d tensors (use 'mean' or 'none')")
        return loss.reshape(loss.shape[0], -1).mean(dim=1)
    if reduction == "none":
        return loss
    raise ValueError(f"reduction={reduction!r} is not one of {list(REDUCTIONS)}")


class AdvancedLossFunctions:
    """Diffusion losses. Inputs are (B, ...) tensors of the same shape."""

    @staticmethod
    def l2_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean"):
        """Squared error (pred - target)^2."""
        _check_pair(pred, target)
        return reduce((_upcast(pred) - _upcast(target)) ** 2, reduction)

    @staticmethod
    def l1_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean"):
        """Absolute error |pred - target|."""
        _check_pair(pred, target)
        return reduce((_upcast(pred) - _upcast(target)).abs(), reduction)

    @staticmethod
    def huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float = 0.001,
                   reduction: str = "mean"):
        """Pseudo-Huber loss sqrt(d^2 + c^2) - c, d = pred - target (Charbonnier 1994; the
        consistency-models choice, Song & Dhariwal 2023). ~d^2 / (2c) for |d| << c, ~|d| - c
        for |d| >> c."""
        _check_pair(pred, target)
        if not c > 0:
            raise ValueError(f"c={c!r} must be > 0")
        d2 = (_upcast(pred) - _upcast(target)) ** 2
        # d^2 / (sqrt(d^2 + c^2) + c) is the same value without the cancellation that makes the
        # literal form (and its gradient) exactly 0 in float32 once d^2 < 1e-7 c^2.
        return reduce(d2 / (torch.sqrt(d2 + c**2) + c), reduction)

    @staticmethod
    def snr_loss(pred: torch.Tensor, target: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor, gamma: float = 5.0, alphas_cumprod=None,
                 prediction_type: str = "epsilon", reduction: str = "mean"):
        """min-SNR-gamma weighted MSE (Hang et al. 2023).

        pred, target: the network output and its training target, both in the space of
            `prediction_type` (noise for "epsilon", v for "v_prediction", x0 for "sample").
        noise: the noise that made x_t. The weighting needs only the timesteps, so it is not
            used in the value; it is part of the guide's signature and must match pred's shape.
        timesteps: (B,) int64 in [0, T-1].
        gamma: the clip of min(SNR, gamma); None gives the unweighted MSE (prediction_type is
            still checked: a typo is an error whatever gamma is).
        alphas_cumprod: the schedule the timesteps index: a (T,) tensor or a scheduler. None
            means the guide's default (linear 1e-4..0.02, T = 1000).
        Returns the mean of min(SNR, gamma)-weighted per-sample MSEs (see `reduction`).
        """
        _check_pair(pred, target)
        _check_pair(pred, noise, name="noise")
        check_prediction_type(prediction_type)
        if reduction not in ("mean", "per_sample"):
            raise ValueError(f"reduction={reduction!r} is not one of ['mean', 'per_sample'] for "
                             "snr_loss (its weights are per sample)")
        abar = as_alphas_cumprod(alphas_cumprod).to(pred.device)
        timesteps = torch.as_tensor(timesteps, device=pred.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(pred.shape[0])
        if timesteps.shape != (pred.shape[0],):
            raise ValueError(f"timesteps has shape {tuple(timesteps.shape)}; expected "
                             f"({pred.shape[0]},) for a batch of {pred.shape[0]}")
        integers = not (timesteps.dtype.is_floating_point or timesteps.is_complex()
                        or timesteps.dtype == torch.bool)
        if not integers or timesteps.min() < 0 or timesteps.long().max() >= abar.shape[0]:
            raise ValueError(f"timesteps must be integers in [0, {abar.shape[0] - 1}]; got "
                             f"{timesteps.tolist()}")
        timesteps = timesteps.long()  # uint8 would index abar as a mask
        per_sample = AdvancedLossFunctions.l2_loss(pred, target, reduction="per_sample")
        if gamma is not None:
            abar_t = abar.double()[timesteps]
            weight = min_snr_weight(abar_t / (1 - abar_t), gamma, prediction_type)
            per_sample = per_sample * weight.to(per_sample.dtype)
        return reduce(per_sample, reduction)

    @staticmethod
    def v_prediction_loss(pred: torch.Tensor, target: torch.Tensor, alpha_bar: torch.Tensor,
                          reduction: str = "mean"):
        """The v-space MSE of an x0 prediction (Salimans & Ho 2022).

        pred: the predicted clean sample x0_hat; target: the true x0; alpha_bar: abar_t, (B,)
        or (B, 1, ..., 1), in [0, 1). For a fixed x_t, v - v_hat = (x0_hat - x0) / sqrt(1 - abar)
        (substitute eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar) into the definition of v), so
        the loss is ||x0_hat - x0||^2 / (1 - abar) = (SNR + 1) ||x0_hat - x0||^2, exactly
        ||v_hat - v||^2 without forming v. To train a v-predicting network on v targets
        directly, use l2_loss on (v_hat, v).
        """
        _check_pair(pred, target)
        abar = torch.as_tensor(alpha_bar, device=pred.device)
        if abar.numel() and (abar.min() < 0 or abar.max() >= 1):
            raise ValueError(f"alpha_bar must lie in [0, 1); got values in "
                             f"[{abar.min().item():.4g}, {abar.max().item():.4g}]")
        diff2 = (_upcast(pred) - _upcast(target)) ** 2
        weight = 1 / (1 - broadcast_to_sample(abar.double(), pred.double()))
        return reduce(weight.to(diff2.dtype) * diff2, reduction)
