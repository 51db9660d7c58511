"""AdvancedDiffusionPipeline: text-to-image and image-to-image with a trained (or fresh) UNet and
text encoder (prompts -> text encoder -> guided model function -> `sample` -> `decode_latents`).
The checks of its inputs are sampling/inputs.py; tensors <-> PIL images and grids are
sampling/images.py; the scripts' argument helpers are sampling/cli.py, which this module does
not import.

In pixel space "latents" are the images themselves in [-1, 1] and `decode_latents` only
rescales them to [0, 1]. A latent diffusion pipeline (`latent_space`, a diffusion.LatentSpace:
the frozen autoencoder with its scale) samples latents of (height / f, width / f), decodes them
with the autoencoder (one image at a time after `enable_vae_slicing`, in overlapping tiles
after `enable_vae_tiling`) and encodes init images for image-to-image.
"""

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from diffusion import (
    AdvancedScheduler,
    DiffusionConfig,
    LatentSpace,
    load_checkpoint_file,
    randn_like,
)
from diffusion.checkpoint import CheckpointError, config_from_checkpoint
from diffusion.data import training_captions
from diffusion.images import check_image_range
from diffusion.scheduler import check_strength
from nets import (
    AdvancedUNet,
    TextConditionedDenoiser,
    TextEncoder,
    build_text_encoder,
    prepacked_for_cpu_inference,
)

from .images import check_pil_channels, from_pil, open_image, to_pil
from .inputs import (
    check_generator,
    check_negative_prompt,
    check_seed,
    config_differences,
    eval_mode,
    parse_device,
    prompt_list,
)
from .samplers import check_sampler, guided_model_fn, sample

DEFAULT_STRENGTH = 0.8  # image-to-image: the guide's generate_variations example


def decode_latents(latents: torch.Tensor, latent_space: LatentSpace | None = None) -> torch.Tensor:
    """Model space -> images in [0, 1]: (x + 1) / 2, clamped, after decoding with
    `latent_space` (the autoencoder and its scale) when given; in pixel space the latents are
    the images."""
    images = latent_space.decode(latents) if latent_space is not None else latents
    return ((images.float() + 1) / 2).clamp(0, 1)


class AdvancedDiffusionPipeline:
    """Generation from `(config, unet, text_encoder, scheduler)`; missing parts are built from
    the config (untrained). `from_checkpoint(path)` loads what `train.py` saved.

    The modules it builds are in eval mode. A unet or text encoder passed in keeps its mode:
    generation switches them to eval mode for its own duration only (see `eval_mode`).
    latent_space: the diffusion.LatentSpace of a latent diffusion model; a config with
    `autoencoder` set needs one (from_checkpoint and from_trainer pass it).
    """

    def __init__(self, config: DiffusionConfig, unet=None, text_encoder=None,
                 scheduler: AdvancedScheduler | None = None, device=None,
                 latent_space: LatentSpace | None = None):
        if not isinstance(config, DiffusionConfig):
            raise TypeError(f"config must be a DiffusionConfig; got {type(config).__name__}")
        config.validate()
        if config.autoencoder is not None and latent_space is None:
            raise ValueError(f"the config has autoencoder={config.autoencoder!r}: pass "
                             "latent_space (the autoencoder with the latent scale it was "
                             "trained with), or load the pipeline with from_checkpoint")
        if latent_space is not None:
            latent_space.check_matches(config)
        differences = config_differences(config, unet, text_encoder, scheduler)
        if differences:
            raise ValueError("the unet, text_encoder or scheduler was built with another "
                             "config than the pipeline's: " + "; ".join(differences)
                             + "; pass the config they were built with")
        self.config = config
        self.unet = unet if unet is not None else AdvancedUNet(config).eval()
        self.text_encoder = text_encoder if text_encoder is not None else \
            build_text_encoder(config, lambda: training_captions(config)).eval()
        self.scheduler = scheduler or AdvancedScheduler(config)
        self.device = parse_device(device) if device is not None else \
            next(self.unet.parameters()).device
        self.unet.to(self.device)
        self.text_encoder.to(self.device)
        self.latent_space = (latent_space.with_own_switches().to(self.device)
                             if latent_space is not None else None)
        self._cpu_offload = False
        self._batched_guidance = True
        self._said = set()
        if config.use_attention_slicing:
            self.enable_attention_slicing()
        if config.use_vae_slicing and self.latent_space is not None:
            self.enable_vae_slicing()
        if config.use_xformers:
            self.enable_xformers_memory_efficient_attention()

    @classmethod
    def from_trainer(cls, trainer) -> "AdvancedDiffusionPipeline":
        """A pipeline over an AdvancedDiffusionTrainer's modules, on its device, with the weights
        they hold when it is called (inside `trainer.ema_weights()`: the EMA's)."""
        return cls(trainer.config, trainer.model, trainer.text_encoder, trainer.noise_scheduler,
                   device=trainer.device, latent_space=trainer.latent_space)

    @classmethod
    def from_checkpoint(cls, path: str | Path, use_ema: bool = True, device=None):
        """Load a train.py checkpoint (weights_only); with use_ema, the EMA weights.
        device: 'cpu', 'cuda' or 'cuda:N' (ValueError when this machine lacks it)."""
        if device is not None:
            device = parse_device(device)
        state = load_checkpoint_file(path)
        config = config_from_checkpoint(state, path)
        if config.stage == "autoencoder":
            raise CheckpointError(f"{path} is an autoencoder checkpoint (stage='autoencoder'); "
                                  "a pipeline needs a diffusion checkpoint (score an "
                                  "autoencoder with python -m sampling.evaluate --checkpoint "
                                  "AE.pt --data-dir D)")
        latent_space = None
        if config.autoencoder is not None:
            if state.get("latent") is None:
                raise CheckpointError(f"{path}: the config names autoencoder="
                                      f"{config.autoencoder!r} but the checkpoint holds no "
                                      "latent space")
            latent_space = LatentSpace.from_checkpoint_state(state["latent"], path)
        unet = AdvancedUNet(config).eval()
        unet.load_state_dict(state["model"])
        text_encoder = TextEncoder.from_state_dict(config, state["text_encoder"]).eval()
        if use_ema and state.get("ema") is None:
            warnings.warn(f"{path}: the checkpoint has no EMA weights (trained with "
                          f"use_ema=false); using the trained weights", stacklevel=2)
        elif use_ema:
            # The EMA covers the trainable parameters (named as in TextConditionedDenoiser);
            # frozen ones, e.g. an unconditional UNet's text encoder, keep the loaded weights.
            params = dict(TextConditionedDenoiser(unet, text_encoder).named_parameters())
            shadow = state["ema"]["shadow"]
            unknown = sorted(shadow.keys() - params.keys())
            if unknown:
                raise CheckpointError(f"{path}: the EMA holds parameters this model lacks, "
                                      f"e.g. {unknown[:3]}")
            with torch.no_grad():
                for name, value in shadow.items():
                    params[name].copy_(value)
        return cls(config, unet, text_encoder, device=device, latent_space=latent_space)

    # ---- image space ----

    @property
    def latent_factor(self) -> int:
        """Image pixels per latent pixel along each side: the autoencoder's f, 1 in pixel space."""
        return self.latent_space.downsampling_factor if self.latent_space else 1

    @property
    def image_size(self) -> int:
        """Default height and width of the images: sample_size times latent_factor."""
        return self.config.sample_size * self.latent_factor

    @property
    def image_channels(self) -> int:
        return self.latent_space.image_channels if self.latent_space else self.config.in_channels

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, in_channels, h, w) -> images (B, image_channels, h f, w f) in [0, 1]."""
        return decode_latents(latents, self.latent_space)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> model space: the scaled posterior mean (latent diffusion), or
        the images themselves."""
        if self.latent_space is None:
            return images
        return self.latent_space.encode(images.to(self.device), sample=False)

    # ---- memory toggles ----

    def _say_once(self, key: str, message: str, stacklevel: int = 3) -> None:
        """Warn once per pipeline; stacklevel 3 names the caller of the method calling this."""
        if key not in self._said:
            self._said.add(key)
            warnings.warn(message, stacklevel=stacklevel)

    def enable_attention_slicing(self, slice_size="auto") -> None:
        """Compute attention in slices of queries to cap memory (the same numbers as unsliced
        up to float rounding)."""
        self.unet.enable_attention_slicing(slice_size)

    def _autoencoder(self, toggle: str):
        """The latent space's autoencoder, or None with a note (pixel space has none)."""
        if self.latent_space is None:
            self._say_once(toggle, f"{toggle}: this pipeline works in pixel space (no VAE), so "
                                   "there is nothing to slice or tile; nothing changed", 4)
            return None
        return self.latent_space.autoencoder

    def enable_vae_slicing(self) -> None:
        """Decode (and encode) a batch one image at a time: the same images, less memory.
        Pixel space has no VAE: says so and changes nothing."""
        autoencoder = self._autoencoder("enable_vae_slicing")
        if autoencoder is not None:
            autoencoder.enable_slicing()

    def enable_vae_tiling(self, tile_size: int | None = None, overlap: int | None = None) -> None:
        """Decode and encode in overlapping tiles of tile_size pixels (default: the training
        image size) blended linearly over `overlap` pixels (default: a quarter tile), so a
        large image never passes through the autoencoder whole (nets.autoencoder.tiled_apply).
        Pixel space has no VAE: says so and changes nothing."""
        autoencoder = self._autoencoder("enable_vae_tiling")
        if autoencoder is not None:
            tile_size = self.image_size if tile_size is None else tile_size
            autoencoder.enable_tiling(tile_size, tile_size // 4 if overlap is None else overlap)

    def enable_model_cpu_offload(self) -> None:
        """Keep the text encoder and UNet on the CPU and move each to the accelerator only
        while it runs. On a CPU-only machine there is nothing to offload; says so."""
        if self.device.type == "cpu":
            self._say_once("offload", "enable_model_cpu_offload: the models already run on the "
                                      "CPU; nothing to offload")
            return
        self._cpu_offload = True
        self.unet.to("cpu")
        self.text_encoder.to("cpu")

    def enable_sequential_guidance(self) -> None:
        """Run the conditional and unconditional forwards one after the other instead of in
        one doubled batch: half the peak activation memory, same images."""
        self._batched_guidance = False

    def enable_xformers_memory_efficient_attention(self) -> None:
        """xformers is not a dependency: this selects PyTorch's memory-efficient SDPA kernel."""
        self.unet.enable_xformers_memory_efficient_attention()

    def _on_device(self, module):
        return module.to(self.device) if self._cpu_offload else module

    def _off_device(self, module):
        if self._cpu_offload:
            module.to("cpu")

    # ---- generation ----

    def _check_size(self, height: int, width: int) -> None:
        factor = self.unet.unet.downsampling_factor * self.latent_factor
        what = "the network's total downsampling" if self.latent_space is None else \
            (f"the autoencoder's f={self.latent_factor} times the UNet's downsampling "
             f"{self.unet.unet.downsampling_factor}, i.e.")
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < factor \
                    or value % factor:
                raise ValueError(f"{name}={value!r} must be a positive multiple of {what} "
                                 f"{factor}")

    def settings(self, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, sampler: str | None = None,
                 eta: float | None = None, guidance_rescale: float | None = None) -> dict:
        """Sampling settings with every None replaced by the config's value, checked by the
        config's own field validation (`DiffusionConfig.with_overrides`), so a per-call value
        is held to the same types and ranges as the config field of the same name (e.g.
        guidance_rescale in [0, 1], eta >= 0, num_inference_steps in [1, T]); TypeError or
        ValueError naming the field otherwise."""
        given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                 "sampler": sampler, "eta": eta, "guidance_rescale": guidance_rescale}
        checked = self.config.with_overrides({k: v for k, v in given.items() if v is not None})
        return {name: getattr(checked, name) for name in given}

    @torch.no_grad()
    def _encode(self, prompts: list[str], negative: list[str]):
        """(context, mask) of the prompts and of the negative prompts, encoded in one batch
        and cut to its longest prompt (trim_padding), so the two have the same length."""
        encoder = self._on_device(self.text_encoder)
        context, mask = encoder.encode(prompts + negative, trim=True)
        self._off_device(encoder)
        context, mask = context.to(self.device), mask.to(self.device)
        n = len(prompts)
        return (context[:n], mask[:n]), (context[n:], mask[n:])

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], *,
                 negative_prompt: str | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, sampler: str | None = None,
                 eta: float | None = None, init_images: torch.Tensor | None = None,
                 strength: float = 1.0, guidance_rescale: float | None = None,
                 callback=None) -> torch.Tensor:
        """One image per (prompt, seed) -> (B, C, H, W) in [0, 1]. prompts: a list of str;
        seeds: a list of int in [0, 2**63 - 1]; negative_prompt: one str for all, or None.

        Image i draws all its noise, the starting noise and the step noise of the stochastic
        samplers (ddpm, euler_ancestral, ddim with eta > 0), from its own CPU generator seeded
        seeds[i], so it does not depend on the rest of the batch: generating (prompt_i,
        seed_i) alone gives the same image (up to float rounding of batched kernels).
        Settings left None come from the config (see `settings`). height and width are in
        image pixels (default image_size); a latent model samples (height / f, width / f)
        latents. init_images: (B, image_channels, height, width) in [-1, 1] for image-to-image
        (SDEdit, Meng et al. 2022): the images (their latents) are noised to the first of the
        `strength` fraction of timesteps that remain and denoised from there.
        """
        cfg = self.config
        strength = check_strength(strength)
        if init_images is None and strength != 1:
            raise ValueError(f"strength={strength} is for image-to-image; pass init_images "
                             f"(or leave strength at 1)")
        prompts = prompt_list(prompts, "prompts", one_allowed=False)
        if len(prompts) == 0:
            raise ValueError("prompts is empty; pass at least one prompt (and one seed each)")
        if not isinstance(seeds, (list, tuple)):
            raise TypeError(f"seeds must be a list of int; got {type(seeds).__name__}")
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        for i, seed in enumerate(seeds):
            check_seed(seed, name=f"seeds[{i}]")
        check_negative_prompt(negative_prompt)
        height = self.image_size if height is None else height
        width = self.image_size if width is None else width
        self._check_size(height, width)
        f = self.latent_factor
        shape = (len(prompts), cfg.in_channels, height // f, width // f)
        if init_images is not None:
            init_images = self._check_init_images(
                init_images, (len(prompts), self.image_channels, height, width))
        resolved = self.settings(num_inference_steps, guidance_scale, sampler, eta,
                                 guidance_rescale)
        num_inference_steps = resolved["num_inference_steps"]
        self.scheduler.set_timesteps(num_inference_steps)  # also validates the step count
        sampler = check_sampler(resolved["sampler"])
        generators = [torch.Generator().manual_seed(s) for s in seeds]  # one per image
        x_T = randn_like(torch.empty(shape, device=self.device), generators)
        timesteps = None
        if init_images is not None and strength < 1:
            timesteps = self.scheduler.img2img_timesteps(strength)
            if len(timesteps) == 0:
                return decode_latents(init_images)  # the input images themselves
            x_T = self.scheduler.add_noise(self.encode_images(init_images.to(self.device)),
                                           timesteps[0], noise=x_T)
        # eval mode (dropout off) for this generation only: a caller's modules keep their mode
        with eval_mode(self.unet, self.text_encoder):
            unet = self._on_device(self.unet)

            def denoise(x, t, context=None, mask=None):
                return unet(x, t, context, mask)["sample"].float()

            if self.unet.has_cross_attention:
                cond, uncond = self._encode(prompts, [negative_prompt or ""] * len(prompts))
                model_fn = guided_model_fn(denoise, cond, uncond, resolved["guidance_scale"],
                                           guidance_rescale=resolved["guidance_rescale"],
                                           batched=self._batched_guidance)
            else:  # unconditional: the prompts only label the images, guidance would be a no-op
                self._say_once("unconditional", "this UNet has no cross-attention "
                               "(use_spatial_transformer=False): it is unconditional, so prompts, "
                               "negative_prompt and guidance_scale do not change the images",
                               stacklevel=4)  # generate's caller, past torch.no_grad's wrapper
                model_fn = denoise
            # on the CPU every step reuses the UNet's weights laid out for oneDNN once (nets/cpu.py)
            with prepacked_for_cpu_inference(unet):
                x0 = sample(model_fn, self.scheduler, x_T, sampler=sampler,
                            num_inference_steps=num_inference_steps, eta=resolved["eta"],
                            generator=generators, callback=callback, timesteps=timesteps)
            self._off_device(unet)
            return self.decode_latents(x0)

    @staticmethod
    def _check_init_images(init_images, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """init_images must be one (in_channels, height, width) image per prompt (`shape`),
        floating point, finite and in [-1, 1]; returned as float32."""
        if not isinstance(init_images, torch.Tensor) or not init_images.is_floating_point():
            got = (f"a tensor of dtype {init_images.dtype}"
                   if isinstance(init_images, torch.Tensor) else type(init_images).__name__)
            raise TypeError(f"init_images must be a floating-point tensor of shape {shape} in "
                            f"[-1, 1]; got {got} (scale uint8 images with x / 127.5 - 1)")
        if tuple(init_images.shape) != shape:
            raise ValueError(
                f"init_images has shape {tuple(init_images.shape)}; expected {shape}: one "
                f"(channels={shape[1]}, height={shape[2]}, width={shape[3]}) image per "
                f"prompt, {shape[0]} prompts")
        check_image_range(init_images, "init_images")
        return init_images.float()

    @staticmethod
    def _check_num_images(num_images: int) -> None:
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images={num_images!r} must be a positive int")

    def num_denoising_steps(self, num_inference_steps: int | None = None,
                            strength: float = 1.0) -> int:
        """How many steps (callbacks) `generate` runs: num_inference_steps (default: the
        config's), or in image-to-image the `strength` fraction of them that remain."""
        self.scheduler.set_timesteps(self.settings(num_inference_steps)["num_inference_steps"])
        return len(self.scheduler.img2img_timesteps(strength))

    @staticmethod
    def _seeds(count: int, seed: int | None, generator) -> list[int]:
        """seed, seed + 1, ...; a seed left None is drawn from `generator` (or at random)."""
        check_generator(generator)
        if seed is None:
            generator = generator or torch.Generator().manual_seed(
                int(torch.randint(0, 2**31 - 1, (1,)).item()))
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator,
                                     device=generator.device).item())
        check_seed(seed, count)
        return [seed + i for i in range(count)]

    def generate_image(self, prompt: str | Sequence[str], negative_prompt=None,
                       num_inference_steps: int | None = None,
                       guidance_scale: float | None = None,
                       width: int | None = None, height: int | None = None,
                       num_images: int = 1, seed: int | None = None, generator=None,
                       sampler: str | None = None, eta: float | None = None,
                       guidance_rescale: float | None = None):
        """Text-to-image. Returns a PIL image, or a list when more than one is made.

        prompt: a str or a list of str; negative_prompt: one str (or None) for all of them.
        num_images per prompt. Image i of the batch uses seed + i (seed drawn from
        `generator`, a torch.Generator, or at random, when not given), so a batch equals the
        same images generated one by one. Settings left None come from the config (the
        guide's defaults are 50 steps, guidance 7.5).
        """
        check_pil_channels(self.image_channels)
        prompts = prompt_list(prompt, "prompt", one_allowed=True)
        if not prompts:
            raise ValueError("prompt is an empty list; pass at least one prompt")
        self._check_num_images(num_images)
        prompts = [p for p in prompts for _ in range(num_images)]
        images = self.generate(prompts, self._seeds(len(prompts), seed, generator),
                               negative_prompt=negative_prompt,
                               num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, height=height, width=width,
                               sampler=sampler, eta=eta, guidance_rescale=guidance_rescale)
        pils = [to_pil(image) for image in images]
        return pils[0] if len(pils) == 1 else pils

    def generate_variations(self, image, prompt: str, negative_prompt=None,
                            num_inference_steps: int | None = None,
                            guidance_scale: float | None = None,
                            strength: float = DEFAULT_STRENGTH, num_images: int = 1,
                            seed: int | None = None, generator=None,
                            sampler: str | None = None, eta: float | None = None,
                            width: int | None = None, height: int | None = None,
                            guidance_rescale: float | None = None):
        """Image-to-image (SDEdit). image: a PIL image or a path; it is resized to
        (width, height), by default the model's sample size. strength 0 returns the input,
        strength 1 is plain text-to-image. prompt and negative_prompt: one str each (None for
        no negative prompt); seed and generator as in `generate_image`. Settings left None
        come from the config."""
        check_pil_channels(self.image_channels)
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str; got {type(prompt).__name__}")
        if isinstance(image, (str, Path)):
            image = open_image(image, "image path")
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image or a path; got {type(image).__name__}")
        height = self.image_size if height is None else height
        width = self.image_size if width is None else width
        self._check_size(height, width)
        init = from_pil(image, self.image_channels, size=(width, height))
        self._check_num_images(num_images)
        init = init.expand(num_images, -1, -1, -1)
        images = self.generate([prompt] * num_images, self._seeds(num_images, seed, generator),
                               negative_prompt=negative_prompt,
                               num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, height=height, width=width,
                               sampler=sampler, eta=eta, init_images=init, strength=strength,
                               guidance_rescale=guidance_rescale)
        pils = [to_pil(img) for img in images]
        return pils[0] if len(pils) == 1 else pils
