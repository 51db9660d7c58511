"""Training targets and min-SNR weights: what the network is asked to predict, and how much
each sample's error counts.

A leaf module: it knows the forward process only through an `alphas_cumprod` tensor (or any
object with an `alphas_cumprod` attribute, such as `AdvancedScheduler`) passed in.
"""

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# The guide's default process: linear betas 1e-4..0.02 over 1000 steps (Ho et al. 2020). Used
# only when a caller of snr_loss passes no schedule.
GUIDE_NUM_TRAIN_TIMESTEPS = 1000
GUIDE_BETA_START = 1e-4
GUIDE_BETA_END = 0.02


def guide_default_alphas_cumprod() -> torch.Tensor:
    """abar_t of the guide's default linear schedule, (1000,) float64."""
    betas = torch.linspace(GUIDE_BETA_START, GUIDE_BETA_END, GUIDE_NUM_TRAIN_TIMESTEPS,
                           dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def as_alphas_cumprod(schedule) -> torch.Tensor:
    """Accept None (the guide's default schedule), a (T,) tensor, or a scheduler; return the
    (T,) table, preferring a scheduler's float64 copy (SNR near t = 0 needs 1 - abar exactly)."""
    if schedule is None:
        return guide_default_alphas_cumprod()
    table = getattr(schedule, "alphas_cumprod_float64", None)
    if table is None:
        table = getattr(schedule, "alphas_cumprod", schedule)
    if not isinstance(table, torch.Tensor) or table.ndim != 1:
        raise TypeError(f"alphas_cumprod must be a 1-D tensor or have an .alphas_cumprod "
                        f"attribute; got {type(schedule).__name__}")
    return table


def broadcast_to_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients (B,) or a scalar -> (B, 1, ..., 1) in `like`'s dtype/device.

    The one place where per-timestep coefficients meet a sample's shape.
    """
    coef = torch.as_tensor(coef).to(device=like.device, dtype=like.dtype)
    if coef.ndim == 0:
        return coef
    if coef.ndim == like.ndim and all(s == 1 for s in coef.shape[1:]):
        coef = coef.reshape(-1)  # already (B, 1, ..., 1)
    if coef.ndim != 1 or coef.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"coefficients of shape {tuple(coef.shape)} do not match a batch of "
                         f"{like.shape[0]} samples of shape {tuple(like.shape)}")
    return coef.reshape(-1, *([1] * (like.ndim - 1)))


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of "
                         f"{list(PREDICTION_TYPES)}")


def training_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor,
                    alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the network should output for x_t = sqrt(abar) x0 + sqrt(1 - abar) noise.

    epsilon: noise; sample: x0; v_prediction: v = sqrt(abar) noise - sqrt(1 - abar) x0
    (Salimans & Ho 2022, section 4). alpha_bar: (B,) or broadcastable to x0; the square roots
    are taken in float64 and cast once (pass a float64 table's values: 1 - abar near t = 0
    loses ~3e-4 relative in float32, and all of it in bf16/fp16).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    abar = torch.as_tensor(alpha_bar, device=x0.device).double()
    return (broadcast_to_sample(abar.sqrt(), x0) * noise
            - broadcast_to_sample((1 - abar).sqrt(), x0) * x0)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min-SNR-gamma loss weight (Hang et al. 2023, eq. 8 and its v / x0 variants).

    The weight makes each target's loss equal min(SNR, gamma) * ||x0 - x0_hat||^2:
    epsilon: min(SNR, gamma) / SNR; v_prediction: min(SNR, gamma) / (SNR + 1);
    sample: min(SNR, gamma). At SNR = 0 the epsilon weight is its limit, 1.
    """
    check_prediction_type(prediction_type)
    if not gamma > 0:
        raise ValueError(f"gamma={gamma!r} must be > 0")
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)  # = min(SNR, gamma) / SNR; 1 at SNR = 0
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped
