"""The forward process and training: config, schedules, scheduler (DDPM / DDIM steps), the
training objective, EMA, data, checkpoints, the trainers (diffusion and autoencoder) and the
latent space of latent diffusion."""

from .autoencoder_trainer import AutoencoderTrainer, build_trainer
from .checkpoint import CheckpointError, find_resumable, load_checkpoint_file
from .config import DiffusionConfig, config_reference, parse_overrides
from .data import GlobalBatchSampler, build_dataset, collate
from .ema import EMAModel
from .folder import ImageFolderDataset
from .latent import LatentSpace
from .objective import training_losses
from .optim import get_scheduler
from .scheduler import AdvancedScheduler, SchedulerOutput, randn_like
from .schedules import (
    alphas_cumprod_from_betas,
    inference_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
    snr,
)
from .shapes import SHAPE_COLOURS, SHAPES, ShapesDataset, all_captions, parse_caption
from .trainer import AdvancedDiffusionTrainer, NonFiniteLossError

__all__ = [
    "SHAPES",
    "SHAPE_COLOURS",
    "AdvancedDiffusionTrainer",
    "AutoencoderTrainer",
    "LatentSpace",
    "build_trainer",
    "CheckpointError",
    "EMAModel",
    "GlobalBatchSampler",
    "ImageFolderDataset",
    "NonFiniteLossError",
    "ShapesDataset",
    "all_captions",
    "build_dataset",
    "collate",
    "find_resumable",
    "get_scheduler",
    "load_checkpoint_file",
    "parse_caption",
    "training_losses",
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
