"""Reconstruction quality of an autoencoder checkpoint (stage=autoencoder): PSNR and SSIM of
x against D(mean of E(x)) over a set of images, as `python -m sampling.evaluate --checkpoint
AE.pt [--data-dir D]` prints them. Without --data-dir the images are held-out shapes: a
ShapesDataset drawn with another seed than the training one.
"""

from pathlib import Path

import torch

from diffusion import ImageFolderDataset, ShapesDataset, load_checkpoint_file
from diffusion.checkpoint import config_from_checkpoint
from diffusion.latent import autoencoder_from_state
from losses import psnr, ssim

HELD_OUT_SEED_OFFSET = 1_000_003  # shapes seed of the held-out images: training seed + this
DEFAULT_RECONSTRUCTION_IMAGES = 240


def is_autoencoder_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a stage=autoencoder checkpoint (loading it; CheckpointError if it is
    not a checkpoint at all)."""
    return config_from_checkpoint(load_checkpoint_file(path), path).stage == "autoencoder"


@torch.no_grad()
def reconstruction_scores(autoencoder, images: torch.Tensor, batch_size: int = 32) -> dict:
    """PSNR (dB) and SSIM of images (N, C, H, W) in [-1, 1] against their reconstructions
    through the posterior mean, clamped to [-1, 1]: means, minima and the PSNR median."""
    device = next(autoencoder.parameters()).device
    psnrs, ssims = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device, torch.float32)
        out = autoencoder.decode(autoencoder.encode(x).mode()).clamp(-1, 1)
        psnrs.append(psnr(out, x).cpu())
        ssims.append(ssim(out, x).cpu())
    p, s = torch.cat(psnrs).double(), torch.cat(ssims).double()
    return {"psnr": p.mean().item(), "psnr_min": p.min().item(),
            "psnr_median": p.median().item(), "ssim": s.mean().item(),
            "ssim_min": s.min().item(), "num_images": len(p)}


def evaluate_autoencoder(path: str | Path, data_dir: str | Path | None = None,
                         num_images: int | None = None, batch_size: int = 32,
                         device=None) -> dict:
    """Reconstruction scores of the autoencoder (EMA weights) in checkpoint `path` on the
    first num_images images of `data_dir` (all of them by default) or, without one, on
    num_images (default 240) held-out shapes images at the training size."""
    model, config = autoencoder_from_state(load_checkpoint_file(path), path)
    if device is not None:
        model.to(device)
    size = config.sample_size
    if data_dir is None:
        data = ShapesDataset(sample_size=size, seed=config.seed + HELD_OUT_SEED_OFFSET)
        count = num_images or DEFAULT_RECONSTRUCTION_IMAGES
        source = f"held-out shapes (seed {config.seed + HELD_OUT_SEED_OFFSET})"
    else:
        data = ImageFolderDataset(data_dir, size, in_channels=config.in_channels)
        count = num_images or len(data)
        source = str(data_dir)
    count = min(count, len(data))
    images = torch.stack([data[i]["image"] for i in range(count)])
    return {**reconstruction_scores(model, images, batch_size), "images_from": source,
            "image_size": size, "downsampling_factor": model.downsampling_factor,
            "latent_channels": model.latent_channels}


def format_reconstruction_table(result: dict) -> str:
    lines = [f"{'metric':<12}{'mean':>10}{'min':>10}"]
    lines.append(f"{'psnr (dB)':<12}{result['psnr']:>10.2f}{result['psnr_min']:>10.2f}")
    lines.append(f"{'ssim':<12}{result['ssim']:>10.4f}{result['ssim_min']:>10.4f}")
    lines.append(f"({result['num_images']} images from {result['images_from']}, "
                 f"{result['image_size']} px, f={result['downsampling_factor']})")
    return "\n".join(lines)
