"""Diffusion losses and training targets, and the autoencoder's losses (a leaf package: it
imports nothing from the project)."""

from .autoencoder import (
    adaptive_gan_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    psnr,
    reconstruction_loss,
    ssim,
)
from .functions import AdvancedLossFunctions, reduce
from .targets import (
    PREDICTION_TYPES,
    broadcast_to_sample,
    guide_default_alphas_cumprod,
    min_snr_weight,
    training_target,
)

__all__ = [
    "adaptive_gan_weight",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "psnr",
    "reconstruction_loss",
    "ssim",
    "PREDICTION_TYPES",
    "AdvancedLossFunctions",
    "broadcast_to_sample",
    "guide_default_alphas_cumprod",
    "min_snr_weight",
    "reduce",
    "training_target",
]
