"""AdvancedDiffusionTrainer: one optimizer step of text-conditioned diffusion training and the
state it owns (text encoder, optimizer, LR schedule, mixed precision, EMA, RNG, checkpoints).

The loss itself is diffusion/objective.py (`training_losses`); around it a step adds gradient
accumulation, clipping at max_grad_norm, AdamW (optim.py), the LR schedule, the EMA update and
the skipping of non-finite steps.

Timesteps, noise and prompt dropout come from one torch.Generator seeded with config.seed and
saved in checkpoints; under DistributedDataParallel every rank draws the numbers for the whole
global batch and keeps its own slice, so N processes train exactly like one process with the
same global batch when dropout is 0. Dropout masks come from the global torch RNG, seeded per
micro-batch and rank (dropout_seed): independent across ranks, the same again on resume.
"""

import math
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from nets import TextConditionedDenoiser, build_text_encoder

from .checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_save,
    check_same_model,
    config_from_checkpoint,
    load_checkpoint_file,
)
from .config import DiffusionConfig
from .data import training_captions
from .devices import autocast_dtype, use_deterministic_algorithms, world
from .ema import EMAModel
from .images import check_image_range
from .latent import LatentSpace
from .objective import (
    draw_training_noise,
    dropout_seed,
    training_losses,
    validation_timesteps,
)
from .optim import FUSED_ADAMW_DEVICES, get_scheduler, lr_factor, parameter_groups
from .scheduler import AdvancedScheduler

# Seed of the fixed timesteps/noise that make validation losses comparable across runs.
VALIDATION_SEED = 1234
# What load_state_dict reads from a checkpoint, "outer.inner" for nested keys (state_dict
# writes them all); a file without one is not a complete trainer checkpoint.
REQUIRED_CHECKPOINT_KEYS = (
    "step", "config", "model", "text_encoder", "ema", "optimizer", "lr_scheduler",
    "grad_scaler", "rng.generator", "rng.torch", "counters.skipped_steps", "counters.micro_step",
)


class NonFiniteLossError(RuntimeError):
    """Raised after config.max_nonfinite_steps consecutive NaN/Inf steps."""


class AdvancedDiffusionTrainer:
    """Owns the text encoder, optimizer, LR schedule, mixed precision, EMA and RNG state.

    model: an AdvancedUNet (anything with its forward signature and `.unet`).
    text_encoder: built from the config when None; trained jointly with the UNet.
    distributed: wrap the models in DistributedDataParallel (torch.distributed must be
    initialised, e.g. by torchrun); the config's batch_size is then per process.
    """

    def __init__(self, model: nn.Module, config: DiffusionConfig,
                 text_encoder: nn.Module | None = None, *, device=None,
                 distributed: bool = False):
        if not isinstance(config, DiffusionConfig):
            raise TypeError(f"config must be a DiffusionConfig; got {type(config).__name__}")
        config.validate()
        self.config = config
        if config.deterministic:
            use_deterministic_algorithms()
        self.device = torch.device(device) if device is not None else \
            next(model.parameters()).device
        self.model = model.to(self.device)
        self._build_networks(text_encoder)
        self.rank, self.world_size = world()
        self.net = self.denoiser
        if distributed:
            if not dist.is_initialized():
                raise RuntimeError("distributed=True needs torch.distributed initialised "
                                   "(run under torchrun)")
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.denoiser, device_ids=ids)
        self.noise_scheduler = AdvancedScheduler(config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self._fused_adamw = True if self.device.type in FUSED_ADAMW_DEVICES else None
        self.optimizer = torch.optim.AdamW(parameter_groups(self.denoiser, config.weight_decay),
                                           lr=config.learning_rate, fused=self._fused_adamw)
        self.lr_scheduler = get_scheduler(config.lr_scheduler, self.optimizer,
                                          config.lr_warmup_steps, config.max_steps)
        self.amp_dtype = autocast_dtype(config.mixed_precision, self.device)
        use_scaler = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.ema = self._new_ema() if config.use_ema else None
        self.global_step = 0          # optimizer updates made
        self.skipped_steps = 0        # updates skipped for a NaN/Inf loss or gradient
        self._consecutive_skips = 0
        self._micro_step = 0
        self._window_nonfinite = False
        self._window_losses = []      # this accumulation window's micro-batch losses (floats)

    def _build_networks(self, text_encoder: nn.Module | None) -> None:
        """Set `denoiser`, the module the optimizer trains and the EMA averages: here the UNet
        with its text encoder, and the frozen autoencoder of latent diffusion
        (`latent_space`, None in pixel space; its scale is set by `fit_latent_scale`)."""
        if text_encoder is None:
            text_encoder = build_text_encoder(self.config, lambda: training_captions(self.config))
        self.text_encoder = text_encoder.to(self.device)
        self.tokenizer = self.text_encoder.tokenizer
        self.denoiser = TextConditionedDenoiser(self.model, self.text_encoder)
        if not self.denoiser.uses_text:  # unused by an unconditional UNet: no grads, no DDP sync
            self.text_encoder.requires_grad_(False)
        if self.config.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
        self.latent_space = None
        if self.config.autoencoder is not None:
            self.latent_space = LatentSpace.from_checkpoint(self.config.autoencoder)
            self.latent_space.check_matches(self.config)
            self.latent_space.to(self.device)

    @property
    def image_channels(self) -> int:
        """Channels of the training images (the autoencoder's in latent diffusion)."""
        return self.latent_space.image_channels if self.latent_space else self.config.in_channels

    @property
    def image_size(self) -> int:
        """Side of the training images: sample_size, times f in latent diffusion."""
        f = self.latent_space.downsampling_factor if self.latent_space else 1
        return self.config.sample_size * f

    def fit_latent_scale(self, dataset) -> dict | None:
        """Latent diffusion: set the latent scale (and shift) from the first
        latent_scale_images items of `dataset` (LDM's scale_by_std), unless a resumed
        checkpoint already set it. Returns the fit's numbers, or None when nothing was done."""
        if self.latent_space is None or self.latent_space.scale is not None:
            return None
        n = min(self.config.latent_scale_images, len(dataset))
        images = torch.stack([dataset[i]["image"] for i in range(n)])
        check_image_range(images, "the training images")
        return self.latent_space.fit(images, shift=self.config.latent_shift)

    def to_model_space(self, images: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """What the UNet is trained on: the images, or their scaled latents, a posterior
        sample whose noise comes from `generator` (the trainer's own by default), drawn for
        the global batch and sliced per rank like the diffusion noise."""
        if self.latent_space is None:
            return images
        B, _, H, W = images.shape
        f = self.latent_space.downsampling_factor
        shape = (B * self.world_size, self.latent_space.latent_channels, H // f, W // f)
        noise = torch.randn(shape, generator=generator or self.generator)
        return self.latent_space.encode(images, noise=noise[self.rank::self.world_size].to(
            images.device))

    def _new_ema(self) -> EMAModel:
        """An EMA of the denoiser's current weights, with the config's decay settings."""
        cfg = self.config
        return EMAModel(self.denoiser, cfg.ema_decay, warmup=cfg.ema_warmup,
                        device=torch.device("cpu") if cfg.ema_on_cpu else None)

    # ---- one step ----

    def _check_batch(self, batch) -> tuple[torch.Tensor, list]:
        if not isinstance(batch, dict) or "images" not in batch or "prompts" not in batch:
            got = (f"a dict with keys {sorted(map(str, batch))}" if isinstance(batch, dict)
                   else type(batch).__name__)
            raise ValueError("batch must be a dict with 'images' (B, C, H, W) in [-1, 1] and "
                             f"'prompts' (list of B strings); got {got}")
        images, prompts = batch["images"], batch["prompts"]
        if isinstance(prompts, str):
            prompts = [prompts]
        c = self.image_channels
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"batch['images'] must be a (B, {c}, H, W) tensor; got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"batch has {images.shape[0]} images but {len(prompts)} prompts")
        check_image_range(images, "batch['images']")
        return images, list(prompts)

    def _global_draws(self, shape: torch.Size):
        """This rank's timesteps, noise and prompt-dropout mask (objective.draw_training_noise)."""
        return draw_training_noise(self.generator, shape, self.config,
                                   world_size=self.world_size, rank=self.rank)

    def _forward_loss(self, images, prompts, timesteps, noise) -> torch.Tensor:
        """objective.training_losses for a batch: the per-sample loss (B,)."""
        input_ids, mask = self.tokenizer(prompts)

        def model(x_t, t):
            with self.autocast():
                return self.net(x_t, t, input_ids.to(self.device), mask.to(self.device))

        return training_losses(model, self.noise_scheduler, images, timesteps.to(self.device),
                               noise, self.config)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def accumulating(self) -> bool:
        """Whether micro-batches of an unfinished accumulation window hold gradients."""
        return self._micro_step % self.config.gradient_accumulation_steps != 0

    def train_step(self, batch: dict) -> dict:
        """One micro-batch; an optimizer update every gradient_accumulation_steps calls.

        batch: {"images": (B, C, H, W) in [-1, 1], "prompts": list of B str}.
        Returns loss (the mean over this accumulation window's micro-batches so far; when the
        step updates, over the whole window and, under DDP, over all ranks: the loss of the
        update's global batch), learning_rate, grad_norm (nan between updates), step, updated,
        skipped_steps.
        """
        images, prompts = self._check_batch(batch)
        images = self.to_model_space(images.to(self.device, torch.float32))
        timesteps, noise, drop = self._global_draws(images.shape)
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        accumulation = self.config.gradient_accumulation_steps
        update_now = (self._micro_step + 1) % accumulation == 0
        sync = self.net is self.denoiser or update_now
        cuda = range(torch.cuda.device_count()) if self.device.type == "cuda" else []
        # the global RNG (dropout's) is put back afterwards: the step does not consume it
        with torch.random.fork_rng(devices=cuda), (nullcontext() if sync else self.net.no_sync()):
            torch.manual_seed(dropout_seed(self.config.seed, self._micro_step, self.rank))
            loss = self._forward_loss(images, prompts, timesteps, noise).mean()
            finite = self._all_ranks_finite(loss)
            if finite:
                scaled = loss / accumulation
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            else:
                self._window_nonfinite = True
        self._micro_step += 1
        self._window_losses.append(loss.item())
        window_loss = sum(self._window_losses) / len(self._window_losses)
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm, updated = float("nan"), False
        if update_now:
            if self.net is not self.denoiser:
                total = torch.tensor(window_loss, device=self.device)
                dist.all_reduce(total)
                window_loss = total.item() / self.world_size
            self._window_losses = []
            grad_norm, updated = self._optimizer_step()
        return {"loss": window_loss, "learning_rate": lr, "grad_norm": grad_norm,
                "step": self.global_step, "updated": updated,
                "skipped_steps": self.skipped_steps}

    def _all_ranks_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (all ranks must agree to skip a backward,
        or DistributedDataParallel's gradient all-reduce would wait forever)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.net is not self.denoiser:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    def _optimizer_step(self) -> tuple[float, bool]:
        cfg = self.config
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        loss_nonfinite, self._window_nonfinite = self._window_nonfinite, False
        if loss_nonfinite or not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler:  # unscale_ above must be closed by an update, or the next one fails
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            self.skipped_steps += 1
            # Under fp16 the scaled gradients overflow while the GradScaler's scale settles
            # (it starts at 2**16 and halves on each overflow): expected skips, which count
            # toward max_nonfinite_steps only once the scale is below 1, where an overflow
            # means the gradients themselves are not finite.
            if self.scaler and not loss_nonfinite and self.scaler.get_scale() >= 1:
                return grad_norm, False
            self._consecutive_skips += 1
            if self._consecutive_skips >= cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"the loss or gradient was NaN/Inf for {self._consecutive_skips} consecutive "
                    f"steps (at step {self.global_step}); try a lower learning_rate (now "
                    f"{cfg.learning_rate}), a smaller max_grad_norm, mixed_precision='no', and "
                    "check the data for NaN or badly scaled images")
            return grad_norm, False
        if self.scaler:
            self.scaler.step(self.optimizer)  # the gradients are finite: it steps
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.denoiser)
        self._consecutive_skips = 0
        self.global_step += 1
        return grad_norm, True

    # ---- evaluation ----

    def ema_weights(self):
        """Context manager: the EMA weights inside, the trained weights (bitwise) after."""
        return self.ema.average_parameters(self.denoiser) if self.ema else nullcontext()

    @torch.no_grad()
    def validate(self, dataloader, max_batches: int | None = None) -> dict:
        """Mean loss over `dataloader` at fixed timesteps and noise (batch b uses seed
        VALIDATION_SEED + b and the stratified `validation_timesteps`), so numbers compare
        across runs and checkpoints. No prompt dropout. Returns {"val_loss", "num_batches"}."""
        was_training = self.denoiser.training
        self.denoiser.eval()
        T, total, count, batches = self.config.num_train_timesteps, 0.0, 0, 0
        try:
            for b, batch in enumerate(dataloader):
                if max_batches is not None and b >= max_batches:
                    break
                images, prompts = self._check_batch(batch)
                g = torch.Generator().manual_seed(VALIDATION_SEED + b)
                images = self.to_model_space(images.to(self.device, torch.float32), g)
                B = images.shape[0]
                timesteps = validation_timesteps(b, B, T)
                noise = torch.randn(images.shape, generator=g)
                loss = self._forward_loss(images.to(self.device, torch.float32), prompts,
                                          timesteps.to(self.device), noise.to(self.device))
                total, count, batches = total + loss.sum().item(), count + B, batches + 1
        finally:
            self.denoiser.train(was_training)
        if count == 0:
            raise ValueError("validate() got an empty dataloader")
        return {"val_loss": total / count, "num_batches": batches}

    # ---- checkpoints ----

    def state_dict(self, extra: dict | None = None) -> dict:
        """Everything needed to resume bit-exactly: plain tensors, numbers, strings, dicts.
        Saved inside an accumulation window, it holds the window's gradients too (one process
        only: under DDP each rank's gradients differ until the window's all-reduce)."""
        window = None
        if self.accumulating:
            if self.net is not self.denoiser:
                raise ValueError(
                    f"cannot save a checkpoint in the middle of an accumulation window under "
                    f"DDP (micro-step {self._micro_step}, gradient_accumulation_steps "
                    f"{self.config.gradient_accumulation_steps}): save after an update")
            window = {"gradients": {name: p.grad.clone()
                                    for name, p in self.denoiser.named_parameters()
                                    if p.grad is not None},
                      "losses": list(self._window_losses),
                      "nonfinite": self._window_nonfinite}
        rng = {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.global_step,
            "config": self.config.to_dict(),
            **self._network_states(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": rng,
            "counters": {"skipped_steps": self.skipped_steps, "micro_step": self._micro_step,
                         "consecutive_skips": self._consecutive_skips},
            "accumulation_window": window,
            "extra": extra or {},
        }

    def _network_states(self) -> dict:
        """The networks' entries of a checkpoint: the UNet ("model"), the text encoder and, in
        latent diffusion, the latent space (autoencoder config and weights, scale, shift)."""
        states = {"model": self.model.state_dict(),
                  "text_encoder": self.text_encoder.state_dict()}
        if self.latent_space is not None:
            states["latent"] = self.latent_space.state_dict_for_checkpoint()
        return states

    def _load_network_states(self, state: dict) -> None:
        """Load what `_network_states` wrote. A latent run resumes with the autoencoder and
        scale it was trained with (stored in the checkpoint), whatever the file at
        config.autoencoder now holds."""
        if (self.latent_space is None) != (state.get("latent") is None):
            raise ValueError("cannot resume: the checkpoint is a " + (
                "pixel-space" if state.get("latent") is None else "latent") + " diffusion run "
                f"and the config has autoencoder={self.config.autoencoder!r}")
        self.model.load_state_dict(state["model"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        if self.latent_space is not None:
            self.latent_space = LatentSpace.from_checkpoint_state(state["latent"]).to(self.device)

    def load_state_dict(self, state: dict) -> dict:
        """Restore from `state_dict()` output; returns its `extra` (e.g. the data position).

        The optimizer's learning rate and weight decay and the EMA's decay and warm-up come from
        this trainer's config, not the checkpoint's (they are the ones config.yaml records), so
        a run can resume with a new learning_rate or ema_decay; with an unchanged config the
        resume is bit-exact. A checkpoint saved without an EMA (use_ema=False) resumed with
        use_ema=True starts the EMA from the loaded weights, with a warning."""
        _check_complete(state)
        saved = config_from_checkpoint(state)
        check_same_model(saved, self.config)
        accumulation = self.config.gradient_accumulation_steps
        if state.get("accumulation_window") is not None \
                and saved.gradient_accumulation_steps != accumulation:
            raise ValueError(
                f"the checkpoint was saved inside an accumulation window of "
                f"gradient_accumulation_steps={saved.gradient_accumulation_steps}; resume it "
                f"with that value (got {accumulation})")
        self._load_network_states(state)
        if self.ema is not None and state["ema"] is None:
            warnings.warn(f"the checkpoint (step {int(state['step'])}) has no EMA weights (it was "
                          "saved with use_ema=False): the EMA starts from the loaded weights",
                          stacklevel=2)
            self.ema = self._new_ema()
        elif self.ema is not None:
            self.ema.load_state_dict(state["ema"])  # shadow weights and update count
            self.ema.decay, self.ema.warmup = self.config.ema_decay, self.config.ema_warmup
        self.optimizer.load_state_dict(state["optimizer"])
        fresh_groups = parameter_groups(self.denoiser, self.config.weight_decay)
        for group, fresh in zip(self.optimizer.param_groups, fresh_groups):
            group["fused"] = self._fused_adamw  # the saving run's kernel choice: use this device's
            group["weight_decay"] = fresh["weight_decay"]
            group["initial_lr"] = self.config.learning_rate
        schedule = self.lr_scheduler
        schedule.load_state_dict(state["lr_scheduler"])
        schedule.base_lrs = [self.config.learning_rate] * len(fresh_groups)
        for group, factor in zip(self.optimizer.param_groups, schedule.lr_lambdas):
            group["lr"] = self.config.learning_rate * factor(schedule.last_epoch)
        cfg, step = self.config, schedule.last_epoch
        if (saved.max_steps, saved.lr_warmup_steps) != (cfg.max_steps, cfg.lr_warmup_steps) \
                and cfg.lr_scheduler == saved.lr_scheduler:
            before = saved.learning_rate * lr_factor(step, saved.lr_scheduler,
                                                      saved.lr_warmup_steps, saved.max_steps)
            after = self.optimizer.param_groups[0]["lr"]  # the stretched schedule's, just set
            if after != before:
                warnings.warn(f"the {cfg.lr_scheduler} LR schedule now spans max_steps="
                              f"{cfg.max_steps} (warm-up {cfg.lr_warmup_steps}) instead of "
                              f"{saved.max_steps} ({saved.lr_warmup_steps}): at step {step} the "
                              f"LR moves from {before:.3g} to {after:.3g}", stacklevel=2)
        if self.scaler is not None and state["grad_scaler"] is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.global_step = int(state["step"])
        self.skipped_steps = int(state["counters"]["skipped_steps"])
        self._micro_step = int(state["counters"]["micro_step"])
        # absent from checkpoints written before it was saved: those count from 0 again
        self._consecutive_skips = int(state["counters"].get("consecutive_skips", 0))
        window = state.get("accumulation_window")
        self.optimizer.zero_grad(set_to_none=True)
        if window is not None:
            for name, p in self.denoiser.named_parameters():
                if name in window["gradients"]:
                    p.grad = window["gradients"][name].to(p.device, p.dtype)
            self._window_losses = [float(loss) for loss in window["losses"]]
            self._window_nonfinite = bool(window["nonfinite"])
        else:
            self._window_losses, self._window_nonfinite = [], False
            if self._micro_step % accumulation:  # saved with another gradient_accumulation_steps
                self._micro_step += accumulation - self._micro_step % accumulation  # full window
        return state.get("extra", {})

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write one checkpoint file atomically (see diffusion/checkpoint.py)."""
        return atomic_save({"format_version": FORMAT_VERSION, **self.state_dict(extra)}, path)

    def load_checkpoint(self, path: str | Path) -> dict:
        """Resume from a checkpoint file (weights_only load); returns its `extra`."""
        return self.load_state_dict(load_checkpoint_file(path))


def _check_complete(state: dict) -> None:
    """Raise CheckpointError naming the REQUIRED_CHECKPOINT_KEYS `state` lacks, before anything
    is loaded (a KeyError half-way would leave the trainer half-restored)."""
    missing = []
    for path in REQUIRED_CHECKPOINT_KEYS:
        node = state
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                missing.append(path)
                break
            node = node[key]
    if missing:
        raise CheckpointError(f"the checkpoint is missing {missing}: it is not a complete "
                              f"trainer checkpoint (it holds {sorted(map(str, state))})")


