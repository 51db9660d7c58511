"""The training objective: what one training step minimises (Ho et al. 2020, Algorithm 1, with
the guide's additions).

    t ~ U{0..T-1},  eps ~ N(0, I) (+ offset noise),  prompts -> "" with probability cfg_dropout
    x_t  = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                        (scheduler.add_noise)
    loss_b = w_b * loss_type(model(x_t, t, text), target_b)             (training_losses)

target is eps, x0 or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 as `prediction_type` says, and
w_b the min-SNR-gamma weight (Hang et al. 2023) when `snr_gamma` is set, else 1. The trainer
(trainer.py) averages over the batch and adds accumulation, clipping, AdamW and EMA around it.
The seeds of the dropout masks and the stratified timesteps of validation are here too.
"""

from collections.abc import Callable

import torch

from losses import AdvancedLossFunctions, min_snr_weight, training_target

from .data import derived_seed
from .scheduler import AdvancedScheduler

GOLDEN_FRACTION = (5 ** 0.5 - 1) / 2  # rotates the validation strata from batch to batch


def draw_training_noise(generator: torch.Generator, shape: torch.Size, config, *,
                        world_size: int = 1, rank: int = 0):
    """Timesteps (B,), noise (B, C, H, W) and prompt-dropout mask (B,) for one rank's batch of
    `shape`.

    The numbers are drawn for the whole global batch (B * world_size) and this rank keeps its
    interleaved slice [rank::world_size], the slice of the data GlobalBatchSampler gives it, so
    N processes draw exactly what one process with the same global batch draws.
    Offset noise (Guttenberg 2023) adds noise_offset * N(0, 1) per (sample, channel).
    """
    B, g = shape[0], generator
    G = B * world_size
    t = torch.randint(0, config.num_train_timesteps, (G,), generator=g)
    noise = torch.randn((G, *shape[1:]), generator=g)
    if config.noise_offset > 0:
        noise = noise + config.noise_offset * torch.randn((G, shape[1], 1, 1), generator=g)
    drop = torch.rand(G, generator=g) < config.cfg_dropout
    return t[rank::world_size], noise[rank::world_size], drop[rank::world_size]


def regression_loss(pred: torch.Tensor, target: torch.Tensor, config) -> torch.Tensor:
    """`config.loss_type` (l2, l1 or huber with `huber_c`) per sample: (B, ...) -> (B,)."""
    L = AdvancedLossFunctions
    if config.loss_type == "l2":
        return L.l2_loss(pred, target, reduction="per_sample")
    if config.loss_type == "l1":
        return L.l1_loss(pred, target, reduction="per_sample")
    return L.huber_loss(pred, target, c=config.huber_c, reduction="per_sample")


def training_losses(model: Callable, scheduler: AdvancedScheduler, x0: torch.Tensor,
                    timesteps: torch.Tensor, noise: torch.Tensor, config,
                    model_kwargs: dict | None = None) -> torch.Tensor:
    """The per-sample diffusion training loss (B,), min-SNR-weighted when config.snr_gamma is set.

    model(x_t, t, **model_kwargs) returns the prediction in config.prediction_type (the text
    conditioning goes in model_kwargs); x0, noise: (B, C, H, W); timesteps: (B,) int64 on the
    model's device. The loss is computed in float32 whatever precision the model ran in.
    """
    x_t = scheduler.add_noise(x0, timesteps, noise=noise)
    abar = scheduler.alphas_cumprod_float64[timesteps.cpu()]  # (B,) float64
    target = training_target(config.prediction_type, x0, noise, abar)
    pred = model(x_t, timesteps, **(model_kwargs or {}))
    loss = regression_loss(pred.float(), target.float(), config)
    if config.snr_gamma is not None:
        weight = min_snr_weight(abar / (1 - abar), config.snr_gamma, config.prediction_type)
        loss = loss * weight.to(loss.device, loss.dtype)
    return loss


def dropout_seed(seed: int, micro_step: int, rank: int) -> int:
    """The torch seed of one micro-batch's dropout masks on one rank. Dropout draws from the
    global torch RNG, which every rank seeds alike (same initial weights): seeding it per
    (seed, micro-step, rank) gives each rank and step its own masks, and a resumed run (which
    restores the micro-step count) the same ones."""
    return derived_seed(seed, micro_step, rank)


def validation_timesteps(batch_index: int, batch_size: int, T: int) -> torch.Tensor:
    """Stratified timesteps for validation batch `batch_index`: sample i lies in the stratum
    [i T / B, (i + 1) T / B), at an offset within the strata that moves by the golden ratio
    from batch to batch, so even batches of one cover [0, T-1] (a plain linspace put every
    sample of a one-sample batch at t = 0)."""
    offset = (batch_index * GOLDEN_FRACTION) % 1.0
    strata = torch.arange(batch_size, dtype=torch.float64) + offset
    return (strata * T / batch_size).floor().long()
