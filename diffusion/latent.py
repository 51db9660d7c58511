"""The latent space of latent diffusion (Rombach et al. 2022): a frozen KL autoencoder and the
affine map that makes its latents unit-variance for the diffusion process.

    z = (E(x) - shift) * scale          x = D(z / scale + shift)

`scale` is LDM's `scale_by_std`: 1 / std of the posterior samples of a fixed set of training
images (`fit`); `shift` is their mean when `latent_shift` is on, else 0. A diffusion checkpoint
stores the autoencoder's config and weights with the scale and shift (`state_dict`), so it
samples without the autoencoder's own file.
"""

import copy
from pathlib import Path

import torch
from torch import nn

from nets import AutoencoderKL

from .checkpoint import CheckpointError, config_from_checkpoint, load_checkpoint_file
from .config import DiffusionConfig

LATENT_FIT_SEED = 4321  # posterior noise of the images that set the scale
LATENT_FIT_BATCH = 32


def autoencoder_from_state(state: dict, path: str | Path) -> tuple[AutoencoderKL, DiffusionConfig]:
    """The autoencoder (EMA weights when saved) of a stage=autoencoder checkpoint `state`."""
    config = config_from_checkpoint(state, path)
    if config.stage != "autoencoder":
        raise CheckpointError(f"autoencoder={str(path)!r} is a stage={config.stage!r} "
                              "checkpoint; latent diffusion needs one trained with "
                              "stage=autoencoder")
    model = AutoencoderKL.from_config(config)
    model.load_state_dict(state["model"])
    ema = state.get("ema")
    if ema is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in ema["shadow"].items():
                params[name].copy_(value)
    return model.eval().requires_grad_(False), config


class LatentSpace(nn.Module):
    """A frozen autoencoder with the latent scale and shift.

    encode: images (B, C, H, W) in [-1, 1] -> scaled latents (B, latent_channels, H/f, W/f);
    decode: scaled latents -> images in [-1, 1] (not clamped).
    """

    def __init__(self, autoencoder: AutoencoderKL, autoencoder_config: DiffusionConfig,
                 scale: float | None = None, shift: float = 0.0, source: str = ""):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.autoencoder_config = autoencoder_config
        self.scale, self.shift, self.source = scale, shift, source

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "LatentSpace":
        """The autoencoder of a stage=autoencoder checkpoint; the scale is not set yet."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"autoencoder={str(path)!r} does not exist; train one with "
                             "`python train.py --config configs/shapes_autoencoder.yaml` and "
                             "point autoencoder at its last.pt")
        model, config = autoencoder_from_state(load_checkpoint_file(path), path)
        return cls(model, config, source=str(path))

    @property
    def downsampling_factor(self) -> int:
        return self.autoencoder.downsampling_factor

    @property
    def image_channels(self) -> int:
        return self.autoencoder.in_channels

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    def check_matches(self, config: DiffusionConfig) -> None:
        """The UNet of `config` must take and predict latent_channels channels."""
        c = self.latent_channels
        if config.in_channels != c or config.out_channels != c:
            raise ValueError(
                f"autoencoder={self.source!r} has latent_channels={c}, but the diffusion "
                f"config has in_channels={config.in_channels}, out_channels="
                f"{config.out_channels}; set both to {c}")

    def _require_scale(self) -> float:
        if self.scale is None:
            raise RuntimeError("the latent scale is not set: call fit(images) (train.py does, "
                               "from latent_scale_images training images) or load it from a "
                               "latent diffusion checkpoint")
        return self.scale

    @torch.no_grad()
    def fit(self, images: torch.Tensor, shift: bool = False) -> dict:
        """Set scale = 1 / std (and shift = mean when `shift`) of posterior samples of `images`
        (N, C, H, W), drawn with a fixed seed. Returns {"scale", "shift", "std", "mean"}."""
        generator = torch.Generator().manual_seed(LATENT_FIT_SEED)
        device = next(self.autoencoder.parameters()).device
        latents = torch.cat([
            self.autoencoder.encode(images[i:i + LATENT_FIT_BATCH].to(device)).sample(generator)
            for i in range(0, len(images), LATENT_FIT_BATCH)]).double()
        mean, std = latents.mean().item(), latents.std().item()
        self.shift = mean if shift else 0.0
        spread = (latents - self.shift).pow(2).mean().sqrt().item() if shift else std
        self.scale = 1.0 / spread
        return {"scale": self.scale, "shift": self.shift, "std": std, "mean": mean}

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = True, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]: a posterior sample (its noise drawn from
        `generator`, or given) or, with sample=False, the posterior mean."""
        scale = self._require_scale()
        posterior = self.autoencoder.encode(images)
        z = posterior.sample(generator, noise) if sample else posterior.mode()
        return (z - self.shift) * scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped) from scaled latents."""
        scale = self._require_scale()
        return self.autoencoder.decode(latents.float() / scale + self.shift)

    def with_own_switches(self) -> "LatentSpace":
        """The same weights, scale and shift, with slicing and tiling switches of its own (a
        pipeline built over a trainer's latent space turns them on without touching the
        trainer's encoding)."""
        autoencoder = copy.copy(self.autoencoder)  # shares the parameters, not the flags
        return LatentSpace(autoencoder, self.autoencoder_config, self.scale, self.shift,
                           self.source)

    def state_dict_for_checkpoint(self) -> dict:
        """What a diffusion checkpoint stores: plain tensors, numbers, strings and dicts."""
        return {"scale": self._require_scale(), "shift": self.shift, "source": self.source,
                "config": self.autoencoder_config.to_dict(),
                "weights": self.autoencoder.state_dict()}

    @classmethod
    def from_checkpoint_state(cls, state: dict, path: str | Path = "") -> "LatentSpace":
        """Rebuild from `state_dict_for_checkpoint` output, as stored in a diffusion checkpoint."""
        try:
            config = DiffusionConfig.from_dict(state["config"])
            model = AutoencoderKL.from_config(config)
            model.load_state_dict(state["weights"])
            scale, shift = float(state["scale"]), float(state["shift"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint {str(path)!r}: its latent-space entry is "
                                  f"incomplete or does not fit its autoencoder config "
                                  f"({type(err).__name__}: {err})") from err
        return cls(model, config, scale, shift, source=str(state.get("source", "")))
