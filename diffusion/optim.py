"""The optimiser's pieces: AdamW parameter groups (which weights decay) and the learning-rate
schedules (`get_scheduler`: constant, constant_with_warmup, linear, cosine)."""

import math
import warnings
from functools import partial

import torch
from torch import nn

from .config import LR_SCHEDULERS

# Modules whose weights get weight decay; everything else (biases, norm scales, embeddings,
# free-standing parameters such as position embeddings) is exempt, whatever its name.
DECAYED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Devices where AdamW runs its fused kernel. On the CPU PyTorch's default is a Python loop over
# the parameters, which for the small models trained here costs about as much as the rest of
# the optimizer step (clipping, EMA) together; fused, the step takes half as long. Elsewhere
# PyTorch's default stays (foreach on CUDA).
FUSED_ADAMW_DEVICES = ("cpu",)


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for Linear/Conv weights only (by module type, not by name)."""
    decay, no_decay, seen = [], [], set()
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if isinstance(mod, DECAYED_MODULES) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, name: str, warmup: int, total: int) -> float:
    if name != "constant" and warmup > 0 and step < warmup:
        return step / warmup  # linear warm-up from 0
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    if name == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine (Loshchilov & Hutter 2017)


def get_scheduler(name: str, optimizer: torch.optim.Optimizer, num_warmup_steps: int = 0,
                  num_training_steps: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """LR schedule by name: constant, constant_with_warmup, linear or cosine.

    Warm-up rises linearly from 0 to the optimizer's lr over num_warmup_steps; linear and
    cosine then decay to 0 at num_training_steps. Call `.step()` after each optimizer step.
    A warm-up as long as the run is a warning, not an error: the LR never reaches its peak and
    never decays, which is a mistake in a real run but fine in a few-step smoke test.
    """
    if name not in LR_SCHEDULERS:
        raise ValueError(f"lr scheduler name={name!r} is not one of {list(LR_SCHEDULERS)}")
    for arg, value, low in (("num_warmup_steps", num_warmup_steps, 0),
                            ("num_training_steps", num_training_steps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg}={value!r} must be an int >= {low}")
    if name != "constant" and num_warmup_steps >= num_training_steps:
        peak = (num_training_steps - 1) / num_warmup_steps
        warnings.warn(
            f"num_warmup_steps={num_warmup_steps} >= num_training_steps={num_training_steps} "
            f"(the config's lr_warmup_steps and max_steps): the {name!r} schedule's warm-up "
            f"never ends, so the learning rate reaches at most {peak:.0%} of its peak and never "
            "decays; lower the warm-up or train longer", stacklevel=2)
    factor = partial(lr_factor, name=name, warmup=num_warmup_steps, total=num_training_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
