"""The forward process and training: config, schedules, scheduler (DDPM / DDIM steps)."""

from .config import DiffusionConfig, config_reference, parse_overrides
from .scheduler import AdvancedScheduler, SchedulerOutput, randn_like
from .schedules import (
    alphas_cumprod_from_betas,
    inference_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
    snr,
)

__all__ = [
    "AdvancedScheduler",
    "DiffusionConfig",
    "SchedulerOutput",
    "alphas_cumprod_from_betas",
    "config_reference",
    "inference_timesteps",
    "make_betas",
    "parse_overrides",
    "randn_like",
    "rescale_zero_terminal_snr",
    "snr",
]
