"""What train.py shows of a model while it trains: the sample grid and the periodic
evaluation, for a diffusion model (generated images; FD, KID, adherence) and for an
autoencoder (training images above their reconstructions; PSNR, SSIM). Both use the EMA
weights."""

import torch
from PIL import Image

from diffusion import AutoencoderTrainer, collate

from .images import make_grid
from .pipeline import AdvancedDiffusionPipeline
from .reference import evaluate_pipeline


def sample_grid(trainer, prompts: list[str], dataset) -> Image.Image:
    """The EMA model's images for `prompts` and seeds 0..n-1; for an autoencoder, the first
    len(prompts) training images above their reconstructions."""
    with trainer.ema_weights():
        if isinstance(trainer, AutoencoderTrainer):
            originals = collate([dataset[i] for i in range(len(prompts))])["images"]
            images = (torch.cat([originals, trainer.reconstruct(originals).cpu()]) + 1) / 2
            return make_grid(images, columns=len(prompts))
        images = AdvancedDiffusionPipeline.from_trainer(trainer).generate(
            prompts, list(range(len(prompts))))
    return make_grid(images, prompts)


def evaluate_during_training(trainer, dataset) -> dict:
    """FD, KID and caption adherence of the EMA model's images against the training data; for
    an autoencoder, the reconstruction PSNR and SSIM of the first eval_num_images images."""
    config = trainer.config
    with trainer.ema_weights():
        if isinstance(trainer, AutoencoderTrainer):
            first = torch.utils.data.Subset(dataset, range(min(len(dataset),
                                                               config.eval_num_images)))
            return trainer.validate(torch.utils.data.DataLoader(
                first, batch_size=config.batch_size, collate_fn=collate))
        return evaluate_pipeline(AdvancedDiffusionPipeline.from_trainer(trainer), dataset,
                                 num_images=config.eval_num_images, seed=config.seed)
