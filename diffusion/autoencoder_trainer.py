"""AutoencoderTrainer: training of latent diffusion's first stage (Rombach et al. 2022) with the
diffusion trainer's machinery (AdamW and its groups, LR schedule, clipping, accumulation, EMA,
non-finite skipping, checkpoints, resume). train.py picks it for `stage: autoencoder`.

Per image, with x^ = D(z), z ~ q(z | x) = E(x):

    L = ae_l1_weight |x - x^| + ae_l2_weight (x - x^)^2 + ae_ssim_weight (1 - SSIM(x, x^))
        + ae_kl_weight KL(q || N(0, I))
        + ae_gan_weight * lambda * (-D(x^))            (from step ae_gan_start on)

lambda is LDM's adaptive weight (losses.adaptive_gan_weight) at the decoder's output conv.
The PatchGAN discriminator D has its own AdamW (learning_rate, betas (0.5, 0.9) as in LDM) and
takes one hinge-loss step per micro-batch once the GAN term is on. The posterior noise comes
from the trainer's generator, so runs repeat and resume exactly.
"""

import torch

from losses import (
    adaptive_gan_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    psnr,
    reconstruction_loss,
    ssim,
)
from nets import AdvancedUNet, AutoencoderKL, PatchDiscriminator

from .config import DiffusionConfig
from .trainer import AdvancedDiffusionTrainer

DISCRIMINATOR_BETAS = (0.5, 0.9)  # LDM's Adam betas for the discriminator


class AutoencoderTrainer(AdvancedDiffusionTrainer):
    """Trains an AutoencoderKL (`model`) on images; batches are the diffusion trainer's
    {"images", "prompts"} (prompts are ignored). One process only.

    train_step returns the diffusion trainer's keys plus rec_loss, kl, psnr (of this
    micro-batch's reconstructions) and, with the GAN on, gan_weight and disc_loss.
    """

    def __init__(self, model: AutoencoderKL, config: DiffusionConfig, *, device=None,
                 distributed: bool = False):
        if not isinstance(config, DiffusionConfig):
            raise TypeError(f"config must be a DiffusionConfig; got {type(config).__name__}")
        if config.stage != "autoencoder":
            raise ValueError(f"AutoencoderTrainer needs stage='autoencoder'; got "
                             f"stage={config.stage!r}")
        if distributed:
            raise ValueError("autoencoder training runs in one process; run train.py without "
                             "torchrun for stage=autoencoder")
        if not isinstance(model, AutoencoderKL):
            raise TypeError(f"model must be an AutoencoderKL; got {type(model).__name__}")
        self.discriminator = None
        self.last_metrics: dict = {}
        super().__init__(model, config, device=device)
        if config.ae_gan_weight > 0:
            self.discriminator = PatchDiscriminator(
                model.in_channels, config.ae_disc_channels, config.ae_disc_layers).to(self.device)
            self.disc_optimizer = torch.optim.AdamW(
                self.discriminator.parameters(), lr=config.learning_rate,
                betas=DISCRIMINATOR_BETAS, weight_decay=0.0)

    def _build_networks(self, text_encoder) -> None:
        """The autoencoder alone is trained (and EMA-averaged); there is no text encoder."""
        self.text_encoder, self.tokenizer, self.latent_space = None, None, None
        self.denoiser = self.model

    @property
    def gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.config.ae_gan_start

    def _global_draws(self, shape: torch.Size):
        """No timesteps or prompt dropout; the noise of the posterior samples (latent shape)."""
        f = self.model.downsampling_factor
        B, _, H, W = shape
        noise = torch.randn((B, self.model.latent_channels, H // f, W // f),
                            generator=self.generator)
        return torch.zeros(B, dtype=torch.long), noise, torch.zeros(B, dtype=torch.bool)

    def _forward_loss(self, images, prompts, timesteps, noise) -> torch.Tensor:
        """The per-image loss (B,) of the module docstring; the metrics go to last_metrics."""
        cfg = self.config
        with self.autocast():
            reconstruction, posterior = self.net(images, noise=noise)
        reconstruction = reconstruction.float()
        rec = reconstruction_loss(reconstruction, images, l1_weight=cfg.ae_l1_weight,
                                  l2_weight=cfg.ae_l2_weight, ssim_weight=cfg.ae_ssim_weight)
        kl = posterior.kl().float()
        loss = rec + cfg.ae_kl_weight * kl
        metrics = {"rec_loss": rec.mean().item(), "kl": kl.mean().item(),
                   "psnr": psnr(reconstruction.detach().clamp(-1, 1), images).mean().item()}
        if self.gan_active and torch.is_grad_enabled():
            self.discriminator.requires_grad_(False)  # the generator step leaves D alone
            with self.autocast():
                g_loss = hinge_generator_loss(self.discriminator(reconstruction).float())
            self.discriminator.requires_grad_(True)
            weight = adaptive_gan_weight(rec.mean(), g_loss, self.model.decoder.last_layer)
            loss = loss + cfg.ae_gan_weight * weight * g_loss
            metrics["gan_weight"] = weight.item()
            self._fake = reconstruction.detach()
        self.last_metrics = metrics
        return loss

    def train_step(self, batch: dict) -> dict:
        """One autoencoder micro-batch (see AdvancedDiffusionTrainer.train_step), then, with
        the GAN on, one hinge-loss step of the discriminator on the same images."""
        self._fake = None
        result = super().train_step(batch)
        result.update(self.last_metrics)
        if self._fake is not None:
            real = batch["images"].to(self.device, torch.float32)
            with self.autocast():
                d_loss = hinge_discriminator_loss(self.discriminator(real).float(),
                                                  self.discriminator(self._fake).float())
            self.disc_optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(d_loss):
                d_loss.backward()
                self.disc_optimizer.step()
            result["disc_loss"] = d_loss.item()
            self._fake = None
        return result

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstructions through the posterior mean, in [-1, 1], in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            posterior = self.model.encode(images.to(self.device, torch.float32))
            return self.model.decode(posterior.mode()).clamp(-1, 1)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def validate(self, dataloader, max_batches: int | None = None) -> dict:
        """Mean reconstruction loss, PSNR and SSIM through the posterior mean over
        `dataloader`: {"val_loss", "psnr", "ssim", "num_batches"}."""
        sums, count, batches = {"val_loss": 0.0, "psnr": 0.0, "ssim": 0.0}, 0, 0
        cfg = self.config
        for b, batch in enumerate(dataloader):
            if max_batches is not None and b >= max_batches:
                break
            images, _ = self._check_batch(batch)
            images = images.to(self.device, torch.float32)
            out = self.reconstruct(images)
            rec = reconstruction_loss(out, images, l1_weight=cfg.ae_l1_weight,
                                      l2_weight=cfg.ae_l2_weight, ssim_weight=cfg.ae_ssim_weight)
            for key, values in (("val_loss", rec), ("psnr", psnr(out, images)),
                                ("ssim", ssim(out, images))):
                sums[key] += values.sum().item()
            count, batches = count + images.shape[0], batches + 1
        if count == 0:
            raise ValueError("validate() got an empty dataloader")
        return {**{k: v / count for k, v in sums.items()}, "num_batches": batches}

    # ---- checkpoints ----

    def _network_states(self) -> dict:
        states = {"model": self.model.state_dict(), "text_encoder": {}}
        if self.discriminator is not None:
            states["discriminator"] = {"model": self.discriminator.state_dict(),
                                       "optimizer": self.disc_optimizer.state_dict()}
        return states

    def _load_network_states(self, state: dict) -> None:
        """The autoencoder, and the discriminator when both the checkpoint and this run have
        one (a run that turns the GAN on later starts a fresh discriminator)."""
        self.model.load_state_dict(state["model"])
        saved = state.get("discriminator")
        if self.discriminator is not None and saved is not None:
            self.discriminator.load_state_dict(saved["model"])
            self.disc_optimizer.load_state_dict(saved["optimizer"])
            for group in self.disc_optimizer.param_groups:  # this run's config, as for AdamW
                group["lr"] = self.config.learning_rate


def build_trainer(config: DiffusionConfig, *, device=None, distributed: bool = False):
    """The trainer `config.stage` names, with a freshly initialised network: an
    AdvancedDiffusionTrainer over an AdvancedUNet, or an AutoencoderTrainer."""
    if config.stage == "autoencoder":
        return AutoencoderTrainer(AutoencoderKL.from_config(config), config, device=device,
                                  distributed=distributed)
    return AdvancedDiffusionTrainer(AdvancedUNet(config), config, device=device,
                                    distributed=distributed)

