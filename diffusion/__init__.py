"""The forward process and training: config, schedules, scheduler (DDPM / DDIM steps), EMA,
data, checkpoints and the trainer."""

from .checkpoint import CheckpointError, find_resumable, load_checkpoint_file
from .config import DiffusionConfig, config_reference, parse_overrides
from .data import (
    SHAPE_COLOURS,
    SHAPES,
    ImageFolderDataset,
    ShapesDataset,
    all_captions,
    build_dataset,
    classify_shape_image,
    collate,
    parse_caption,
    shapes_adherence,
)
from .ema import EMAModel
from .scheduler import AdvancedScheduler, SchedulerOutput, randn_like
from .schedules import (
    alphas_cumprod_from_betas,
    inference_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
    snr,
)
from .trainer import (
    AdvancedDiffusionTrainer,
    GlobalBatchSampler,
    NonFiniteLossError,
    get_scheduler,
)

__all__ = [
    "SHAPES",
    "SHAPE_COLOURS",
    "AdvancedDiffusionTrainer",
    "CheckpointError",
    "EMAModel",
    "GlobalBatchSampler",
    "ImageFolderDataset",
    "NonFiniteLossError",
    "ShapesDataset",
    "all_captions",
    "build_dataset",
    "classify_shape_image",
    "collate",
    "find_resumable",
    "get_scheduler",
    "load_checkpoint_file",
    "parse_caption",
    "shapes_adherence",
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
