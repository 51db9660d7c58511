"""EMAModel: an exponential moving average of a model's parameters (Polyak & Juditsky 1992).

After each optimizer step, shadow <- d * shadow + (1 - d) * param. With warm-up (on by default)
d = min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not dominated by the
initialisation: with the guide's decay 0.9999 and no warm-up, a run of a few thousand steps
would sample from weights that are still mostly the random init.

The shadow weights live apart from the model. To sample or evaluate with them use
`with ema.average_parameters(model): ...`, which stores the trained weights, copies the
average in, and puts the trained weights back (bitwise) on exit, even after an exception, so
training can never silently continue from EMA weights.
"""

from contextlib import contextmanager

import torch
from torch import nn

# Warm-up constants of the decay schedule min(decay, (1 + n) / (10 + n)).
WARMUP_NUMERATOR_OFFSET = 1.0
WARMUP_DENOMINATOR_OFFSET = 10.0


class EMAModel:
    """EMA of `model`'s trainable parameters, kept in float32 on `device` (default: the
    parameters' device; pass "cpu" to save accelerator memory)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True,
                 device: torch.device | None = None):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
            raise ValueError(f"decay={decay!r} must be a number in [0, 1]")
        self.decay = float(decay)
        self.warmup = warmup
        self.device = device
        self.num_updates = 0
        self.shadow = {name: p.detach().to(device=device or p.device, dtype=torch.float32,
                                           copy=True)
                       for name, p in model.named_parameters() if p.requires_grad}
        self._stored: dict | None = None

    def current_decay(self) -> float:
        """The decay the next `step` uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (WARMUP_NUMERATOR_OFFSET + n) / (WARMUP_DENOMINATOR_OFFSET + n))

    def _params(self, model: nn.Module) -> dict:
        params = {name: p for name, p in model.named_parameters() if name in self.shadow}
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())[:5]
            raise ValueError(f"model does not match the EMA's parameters; missing e.g. {missing}")
        return params

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * param, then count the update."""
        d = self.current_decay()
        for name, p in self._params(model).items():
            shadow = self.shadow[name]
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), 1 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (overwrites its parameters)."""
        for name, p in self._params(model).items():
            p.copy_(self.shadow[name])

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of `model`'s current weights for `restore`."""
        self._stored = {name: p.detach().clone() for name, p in self._params(model).items()}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the weights saved by `store`, bitwise."""
        if self._stored is None:
            raise RuntimeError("restore() called without a matching store()")
        for name, p in self._params(model).items():
            p.copy_(self._stored[name])
        self._stored = None

    @contextmanager
    def average_parameters(self, model: nn.Module):
        """Use the EMA weights inside the `with` block; the trained weights come back after."""
        self.store(model)
        try:
            self.copy_to(model)
            yield model
        finally:
            self.restore(model)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved, ours = state["shadow"], self.shadow
        missing, unexpected = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
        wrong = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(ours[k].shape)}"
                 for k in ours.keys() & saved.keys() if saved[k].shape != ours[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"EMA state does not match this model's parameters: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}, shape "
                             f"mismatches {sorted(wrong)[:5]} (first 5 of each)")
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
