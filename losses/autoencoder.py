"""Losses of the latent-diffusion autoencoder (Rombach et al. 2022, "LDM", its first stage):
pixel reconstruction (L1, L2), SSIM, PSNR, the hinge GAN losses of the PatchGAN discriminator
and LDM's adaptive weight that balances the GAN term against reconstruction. The KL term is
the posterior's own `.kl()` (nets/autoencoder.py). No perceptual network: nothing is
downloaded.

Images are (B, C, H, W) in [-1, 1] (data_range 2); per-sample losses are (B,).
"""

import torch
import torch.nn.functional as F

DATA_RANGE = 2.0  # images live in [-1, 1]
SSIM_WINDOW = 11  # Gaussian window of Wang et al. 2004
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
ADAPTIVE_WEIGHT_EPS = 1e-4  # LDM: keeps the ratio finite when the GAN gradient vanishes
ADAPTIVE_WEIGHT_MAX = 1e4  # LDM clamps the ratio to [0, 1e4]


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor):
    """Normalised 2-D Gaussian, one copy per channel for a depthwise conv: (C, 1, size, size)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    window = torch.outer(g, g).to(like.device, like.dtype)
    return window.expand(channels, 1, size, size)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE,
         window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, eq. 13) with an 11x11 Gaussian window
    (sigma 1.5), C1 = (0.01 L)^2, C2 = (0.03 L)^2, averaged over the valid window positions
    and the channels. The window shrinks (to the largest odd size that fits) for images
    smaller than 11 pixels. x, y: (B, C, H, W) -> (B,) in [-1, 1]; 1 iff x == y."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape; got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    x, y = x.float(), y.float()
    w = _gaussian_window(size, sigma, x.shape[1], x)

    def blur(t):
        return F.conv2d(t, w, groups=x.shape[1])  # (B, C, H - size + 1, W - size + 1)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / \
        ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Peak signal-to-noise ratio 10 log10(L^2 / MSE) in dB, per sample: (B,). Identical
    images give +inf."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, *,
                        l1_weight: float = 1.0, l2_weight: float = 0.0,
                        ssim_weight: float = 0.0) -> torch.Tensor:
    """l1_weight |x - x^| + l2_weight (x - x^)^2 (pixel means) + ssim_weight (1 - SSIM): (B,)."""
    diff = (reconstruction.float() - target.float()).flatten(1)
    loss = torch.zeros(diff.shape[0], device=diff.device)
    if l1_weight:
        loss = loss + l1_weight * diff.abs().mean(1)
    if l2_weight:
        loss = loss + l2_weight * diff.pow(2).mean(1)
    if ssim_weight:
        loss = loss + ssim_weight * (1 - ssim(reconstruction, target))
    return loss


def hinge_discriminator_loss(logits_real: torch.Tensor,
                             logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017; LDM's `hinge_d_loss`):
    1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x^))]), a scalar."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: -E[D(x^)], a scalar."""
    return -logits_fake.mean()


def adaptive_gan_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor,
                        last_layer: torch.Tensor) -> torch.Tensor:
    """LDM's adaptive weight (after Esser et al. 2021, eq. 7): ||grad_L rec|| /
    (||grad_L gan|| + 1e-4), clamped to [0, 1e4] and detached, with L the decoder's last
    layer, so the GAN term pushes that layer about as hard as reconstruction does. Both losses
    must still hold their graphs (they are kept for the backward pass)."""
    rec_grad, = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()
