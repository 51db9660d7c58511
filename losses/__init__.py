"""Diffusion losses and training targets (a leaf package: it imports nothing from the project)."""

from .functions import AdvancedLossFunctions, reduce
from .targets import (
    PREDICTION_TYPES,
    broadcast_to_sample,
    guide_default_alphas_cumprod,
    min_snr_weight,
    training_target,
)

__all__ = [
    "PREDICTION_TYPES",
    "AdvancedLossFunctions",
    "broadcast_to_sample",
    "guide_default_alphas_cumprod",
    "min_snr_weight",
    "reduce",
    "training_target",
]
