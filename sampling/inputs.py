"""The checks of AdvancedDiffusionPipeline's inputs (devices, seeds, prompts, generators, modules
built with another config) and `eval_mode`, which it runs generation in."""

from contextlib import contextmanager

import torch

from diffusion import DiffusionConfig
from diffusion.checkpoint import MODEL_FIELDS
from diffusion.config import MAX_SEED
from nets import TextEncoder


def parse_device(name: str | torch.device) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' (or a torch.device) -> torch.device; ValueError naming what
    is allowed."""
    if isinstance(name, torch.device):
        name = str(name)
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: this machine has no CUDA GPU; use 'cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: only 'cpu' and 'cuda' are supported")
    return device


def check_seed(seed, count: int = 1, name: str = "seed") -> None:
    """The seed of `count` images, image i using seed + i: an int with 0 <= seed and
    seed + count - 1 <= MAX_SEED (the DiffusionConfig seed field's range); TypeError or
    ValueError naming `name` and the value otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}={seed!r} must be int")
    high = MAX_SEED - (count - 1)
    if not 0 <= seed <= high:
        each = f" (image i of {count} uses {name} + i, at most 2**63 - 1)" if count > 1 else ""
        raise ValueError(f"{name}={seed!r} is out of range; allowed: 0 <= {name} <= {high}"
                         f"{each}")


def prompt_list(prompt, name: str, *, one_allowed: bool) -> list[str]:
    """`prompt` as a list of str: a list or tuple of str, or (one_allowed) a single str;
    TypeError naming `name` otherwise."""
    if one_allowed and isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)):
        bad = [p for p in prompt if not isinstance(p, str)]
        if not bad:
            return list(prompt)
        got = f"a {type(prompt).__name__} holding {type(bad[0]).__name__} {bad[0]!r}"
    else:
        got = type(prompt).__name__
    allowed = "a str or a list of str" if one_allowed else "a list of str"
    raise TypeError(f"{name} must be {allowed}; got {got}")


def check_negative_prompt(negative_prompt) -> None:
    """One negative prompt (the unconditional branch of every image) or None."""
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise TypeError(f"negative_prompt must be a str or None (one negative prompt for the "
                        f"whole batch); got {type(negative_prompt).__name__}")


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got "
                        f"{type(generator).__name__}")


# The fields a scheduler must share with the model it samples: the noise schedule and what the
# network predicts. Its sampling settings (spacing, clipping, sampler) may differ on purpose.
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                   "prediction_type", "rescale_betas_zero_snr")


def config_differences(config: DiffusionConfig, unet, text_encoder, scheduler) -> list[str]:
    """The fields on which the modules were built differently from `config`: the UNet's
    MODEL_FIELDS and the scheduler's SCHEDULE_FIELDS (AdvancedUNet and AdvancedScheduler keep
    their configs), the text encoder's sizes and tokenizer (TextEncoder.sizes), and whether
    it writes the summary that text_pooling="bag" reads."""
    built = {}
    for module, part, names in (("unet", unet, MODEL_FIELDS),
                                ("scheduler", scheduler, SCHEDULE_FIELDS)):
        if isinstance(getattr(part, "config", None), DiffusionConfig):
            built[module] = {name: getattr(part.config, name) for name in names}
    differences = []
    if isinstance(text_encoder, TextEncoder):
        built["text_encoder"] = text_encoder.sizes()
        if text_encoder.has_summary != (config.text_pooling == "bag"):
            differences.append(f"text_pooling: text_encoder has_summary="
                               f"{text_encoder.has_summary} vs config {config.text_pooling!r} "
                               "(only 'bag' reads the summary)")
    return [f"{name}: {module} {value!r} vs config {getattr(config, name)!r}"
            for module, fields in built.items() for name, value in fields.items()
            if value != getattr(config, name)] + differences


@contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Run the block with `modules` in eval mode (dropout off), then give every submodule back
    the mode it had before, also when the block raises: modules the caller passed in (the
    trainer's, drawing a sample grid mid-training) come back as they went in."""
    before = [(module, [m.training for m in module.modules()]) for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, modes in before:
            for m, training in zip(module.modules(), modes):  # parents before their children
                if m.training != training:
                    m.train(training)
