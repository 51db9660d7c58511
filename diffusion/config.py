"""DiffusionConfig: the one flat dataclass every part of the codebase reads.

Field names and defaults of the guide's `DiffusionConfig` are kept as the guide has them;
the fields after them are ours (docs/design.md lists their names). Each field carries its help
text and its allowed values in the dataclass metadata, so validation, the `--set` parser and
the README's config reference all read the same single source of truth.

Validation happens in two places:
- every assignment (in the constructor or later, `config.snr_gamma = 3.0`) checks the field's
  own type and range, so a typo fails on the line that made it;
- `validate()` checks the fields against each other (e.g. `v_prediction` against
  `prediction_type`). It runs at the end of construction and again whenever a consumer (the
  scheduler, the trainer) is built, because the guide changes fields one at a time
  (`config.v_prediction = True` then `config.prediction_type = "v_prediction"`), and the
  config is only consistent again after the second line.
"""

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .yaml_io import YamlDumper, load_yaml, yaml_problem

BETA_SCHEDULES = ("linear", "quadratic", "scaled_linear", "cosine", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TEXT_POOLINGS = ("mean", "attention", "bag")  # nets.unet.TEXT_POOLINGS (test_config.py checks)
TOKENIZERS = ("byte", "word")  # nets.text_encoder.TOKENIZERS (tests/test_config.py checks)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "euler", "euler_ancestral")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
LOSS_TYPES = ("l2", "l1", "huber")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION_MODES = (True, False, "no", "fp16", "bf16")
DATASETS = ("shapes", "folder")
STAGES = ("diffusion", "autoencoder")
# Largest seed: the signed 64-bit range, which torch's and numpy's seeding accept.
MAX_SEED = 2**63 - 1

def _field(default, help, *, choices=None, low=None, high=None, low_inclusive=True,
           high_inclusive=True):
    """A dataclass field with its help text and allowed values in the metadata."""
    meta = {"help": help, "choices": choices, "low": low, "high": high,
            "low_inclusive": low_inclusive, "high_inclusive": high_inclusive}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return field(default=default, metadata=meta)


def _suggest_unknown_fields(cls):
    """Wrap the dataclass __init__ so an unknown keyword names the closest field, as from_dict,
    --set and attribute assignment do (Python alone says 'unexpected keyword argument').
    functools.wraps keeps the generated signature for inspect and IDEs."""
    dataclass_init = cls.__init__

    @functools.wraps(dataclass_init)
    def __init__(self, *args, **kwargs):
        unknown = [k for k in kwargs if k not in _FIELDS]
        if unknown:
            raise TypeError(f"{cls.__name__} got unknown field(s): " + "; ".join(
                f"{k!r}{_did_you_mean(k)}" for k in unknown))
        dataclass_init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_suggest_unknown_fields
@dataclass
class DiffusionConfig:
    # ---- model architecture (guide) ----
    in_channels: int = _field(3, "Channels of the images the model sees.", low=1)
    out_channels: int = _field(3, "Channels the model predicts.", low=1)
    model_channels: int = _field(128, "Base channel width of the UNet.", low=1)
    num_res_blocks: int = _field(2, "ResBlocks per UNet level.", low=1)
    attention_resolutions: tuple[int, ...] = _field(
        (8, 16), "Feature-map sizes (for an input of sample_size) that get attention.")
    dropout: float = _field(0.1, "Dropout inside ResBlocks.", low=0.0, high=1.0,
                            high_inclusive=False)
    channel_mult: tuple[int, ...] = _field(
        (1, 2, 4, 8), "Channel multiplier per UNet level; its length is the number of levels.")
    num_heads: int = _field(8, "Attention heads.", low=1)
    use_spatial_transformer: bool = _field(
        True, "SpatialTransformer (self + cross-attention to text) instead of plain "
              "self-attention; False makes an unconditional model (prompts and guidance have "
              "no effect, and the trainer freezes the text encoder).")
    transformer_depth: int = _field(1, "BasicTransformerBlocks per SpatialTransformer.", low=1)
    context_dim: int = _field(768, "Width of the text encoder states the UNet attends to.",
                              low=1)
    # ---- diffusion process (guide) ----
    num_train_timesteps: int = _field(1000, "T, the number of training timesteps.", low=2)
    beta_start: float = _field(0.0001, "First beta of the linear/quadratic/sigmoid schedules.",
                               low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    beta_end: float = _field(0.02, "Last beta of the linear/quadratic/sigmoid schedules.",
                             low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    beta_schedule: str = _field("linear", "Noise schedule.", choices=BETA_SCHEDULES)
    prediction_type: str = _field(
        "epsilon", "What the network predicts: noise, velocity or the clean sample.",
        choices=PREDICTION_TYPES)
    # ---- training (guide) ----
    learning_rate: float = _field(1e-4, "Peak AdamW learning rate.", low=0.0,
                                  low_inclusive=False)
    weight_decay: float = _field(0.01, "AdamW weight decay (not applied to biases, norms, "
                                       "embeddings).", low=0.0)
    max_grad_norm: float = _field(1.0, "Gradient clipping norm.", low=0.0, low_inclusive=False)
    mixed_precision: bool | str = _field(
        True, "Autocast: True picks bf16 on CPU and fp16 on CUDA; or 'no', 'fp16', 'bf16'.",
        choices=MIXED_PRECISION_MODES)
    gradient_checkpointing: bool = _field(True, "Recompute activations in the backward pass.")
    use_ema: bool = _field(True, "Keep an exponential moving average of the weights.")
    ema_decay: float = _field(0.9999, "EMA decay (upper bound when ema_warmup is on).",
                              low=0.0, high=1.0)
    # ---- loss (guide) ----
    loss_type: str = _field("l2", "Per-element loss.", choices=LOSS_TYPES)
    snr_gamma: float | None = _field(
        5.0, "min-SNR-gamma loss weighting (Hang et al. 2023); null turns it off.",
        low=0.0, low_inclusive=False)
    v_prediction: bool = _field(
        False, "The guide's switch for v-prediction; must agree with prediction_type.")
    # ---- sampling (guide) ----
    num_inference_steps: int = _field(50, "Sampling steps.", low=1)
    guidance_scale: float = _field(7.5, "Classifier-free guidance scale.", low=0.0)
    eta: float = _field(0.0, "DDIM eta: 0 is deterministic, 1 matches DDPM's variance.",
                        low=0.0)
    guidance_rescale: float = _field(
        0.0, "Guidance rescale phi (Lin et al. 2023); 0 is plain guidance.", low=0.0, high=1.0)
    # ---- memory toggles the guide reads from the config ----
    use_attention_slicing: bool = _field(False, "Compute attention in slices.")
    use_vae_slicing: bool = _field(False, "Decode latents one image at a time.")
    use_memory_efficient_attention: bool = _field(False, "Offload sub-models to the CPU.")
    use_xformers: bool = _field(False, "Select PyTorch's memory-efficient SDPA kernel.")

    # ---- model (ours) ----
    sample_size: int = _field(64, "Image height/width the model is built and trained for.",
                              low=1)
    use_scale_shift_norm: bool = _field(
        True, "Timestep conditioning as GroupNorm scale-shift (else added to features, which "
              "GroupNorm erases at <= 32 channels: a warning says so).")
    pooled_text_conditioning: bool = _field(
        False, "Also add the prompt's mean text state, projected, to the timestep embedding "
        "so every ResBlock sees the prompt (Imagen's pooled embedding).")
    text_pooling: str = _field(
        "mean", "How pooled_text_conditioning pools the prompt's text states: their masked mean, "
        "attention from a learned query (AttentionPool), or 'bag': the first state, to which "
        "the text encoder adds one learned vector per token of the prompt (a lookup per "
        "token, so one differing character or word moves it by a whole vector).",
        choices=TEXT_POOLINGS)
    norm_groups: int = _field(
        32, "Most GroupNorm groups in the UNet (gcd with each width; 32 is guided-diffusion's). "
            "Below 32 x 2 channels, 32 means one or two channels per group, which normalises "
            "away much of each channel's mean over the image.", low=1)
    text_encoder_layers: int = _field(2, "Transformer layers of the text encoder.", low=0)
    text_encoder_width: int = _field(256, "Width of the text encoder.", low=1)
    max_text_length: int = _field(77, "Tokens per prompt, BOS and EOS included.", low=2)
    tokenizer: str = _field(
        "byte", "How prompts become tokens: 'byte' (UTF-8 bytes, no vocabulary) or 'word' (one "
        "token per word of the training captions, saved in the checkpoint; unseen words fall "
        "back to bytes with a warning).", choices=TOKENIZERS)
    text_vocab_size: int = _field(
        8192, "Most words tokenizer='word' keeps (the most frequent of the training captions); "
              "rarer ones are read as bytes.", low=1)
    compile: bool = _field(False, "Wrap the network in torch.compile.")
    # ---- process (ours) ----
    timestep_spacing: str = _field("trailing", "How inference timesteps are picked.",
                                   choices=TIMESTEP_SPACINGS)
    steps_offset: int = _field(0, "Added to every 'leading' inference timestep.", low=0)
    clip_sample: bool = _field(True, "Clip predicted x0 to +-clip_sample_range while sampling.")
    clip_sample_range: float = _field(1.0, "Bound for clip_sample.", low=0.0,
                                      low_inclusive=False)
    thresholding: bool = _field(
        False, "Dynamic thresholding of predicted x0 (Imagen); replaces clip_sample.")
    dynamic_thresholding_ratio: float = _field(
        0.995, "Percentile of |x0| used as the threshold.", low=0.0, high=1.0,
        low_inclusive=False)
    sample_max_value: float = _field(1.0, "Largest threshold dynamic thresholding may use.",
                                     low=1.0)
    variance_type: str = _field("fixed_small", "DDPM reverse variance.", choices=VARIANCE_TYPES)
    rescale_betas_zero_snr: bool = _field(
        False, "Rescale betas so the last timestep has SNR 0 (Lin et al. 2023); "
               "needs v_prediction or sample prediction.")
    sampler: str = _field("ddim", "Sampler used by the pipeline and sample.py.",
                          choices=SAMPLERS)
    # ---- training (ours) ----
    batch_size: int = _field(16, "Images per step (per process under torchrun).", low=1)
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step.", low=1)
    lr_scheduler: str = _field("cosine", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _field(500, "Linear warm-up steps.", low=0)
    max_steps: int = _field(10000, "Optimizer steps of a run.", low=1)
    cfg_dropout: float = _field(0.1, "Fraction of prompts replaced by '' for guidance.",
                                low=0.0, high=1.0)
    noise_offset: float = _field(0.0, "Offset-noise strength (per-channel constant noise).",
                                 low=0.0)
    huber_c: float = _field(0.001, "c of the pseudo-Huber loss.", low=0.0, low_inclusive=False)
    ema_warmup: bool = _field(True, "EMA decay min(ema_decay, (1+n)/(10+n)) after n updates.")
    ema_on_cpu: bool = _field(False, "Keep the EMA weights on the CPU (saves accelerator memory).")
    max_nonfinite_steps: int = _field(
        10, "Consecutive steps with a NaN/Inf loss or gradient before training stops.", low=1)
    seed: int = _field(0, "Seed for weights, data order and noise.", low=0, high=MAX_SEED)
    deterministic: bool = _field(
        False, "Deterministic kernels (torch.use_deterministic_algorithms, process-wide), for "
               "bitwise-repeatable runs and resumes on CUDA, whose default kernels are not; "
               "slower. CPU runs repeat bitwise without it.")
    # ---- data (ours) ----
    dataset: str = _field("shapes", "Training data.", choices=DATASETS)
    data_dir: str | None = _field(None, "Image folder when dataset is 'folder'.")
    random_flip: bool = _field(False, "Random horizontal flips.")
    num_workers: int = _field(0, "DataLoader worker processes.", low=0)
    # ---- latent diffusion (ours; docs/latent.md) ----
    stage: str = _field(
        "diffusion", "What train.py trains: the diffusion UNet (in pixel space, or in latent "
        "space when `autoencoder` is set) or the KL autoencoder of latent diffusion.",
        choices=STAGES)
    autoencoder: str | None = _field(
        None, "Autoencoder checkpoint (stage=autoencoder's last.pt) for latent diffusion: the "
              "UNet then sees latents of sample_size x sample_size with in_channels = the "
              "autoencoder's latent_channels; null: pixel space.")
    latent_scale_images: int = _field(
        256, "Images encoded at the start of a latent run to set the latent scale "
             "(1/std, LDM's scale_by_std).", low=1)
    latent_shift: bool = _field(False, "Also subtract the latents' mean before scaling.")
    latent_channels: int = _field(4, "Channels of the autoencoder's latent.", low=1)
    ae_channels: int = _field(64, "Base channel width of the autoencoder.", low=1)
    ae_channel_mult: tuple[int, ...] = _field(
        (1, 2, 4), "Autoencoder channel multiplier per level; len - 1 stride-2 downsamplings "
                   "(f = 2^(len - 1)).")
    ae_num_res_blocks: int = _field(1, "ResBlocks per autoencoder level.", low=1)
    ae_attention: bool = _field(True, "Self-attention in the autoencoder's middle blocks.")
    ae_norm_groups: int = _field(
        32, "Most GroupNorm groups in the autoencoder (gcd with each width). 32 is LDM's, at "
            "128 channels; a narrow autoencoder wants fewer (one channel per group normalises "
            "away each channel's mean and trains far slower: docs/latent.md).", low=1)
    ae_l1_weight: float = _field(1.0, "Weight of the L1 reconstruction loss.", low=0.0)
    ae_l2_weight: float = _field(0.0, "Weight of the L2 reconstruction loss.", low=0.0)
    ae_ssim_weight: float = _field(0.0, "Weight of the 1 - SSIM loss.", low=0.0)
    ae_kl_weight: float = _field(1e-6, "Weight of the KL term (per image, summed over the "
                                       "latent).", low=0.0)
    ae_gan_weight: float = _field(
        0.0, "Weight of the PatchGAN hinge loss, times LDM's adaptive weight; 0: no "
             "discriminator.", low=0.0)
    ae_gan_start: int = _field(0, "Step at which the discriminator and GAN loss start.", low=0)
    ae_disc_channels: int = _field(64, "Base width of the PatchGAN discriminator.", low=1)
    ae_disc_layers: int = _field(3, "Stride-2 layers of the PatchGAN discriminator.", low=1)
    # ---- run (ours) ----
    output_dir: str = _field("runs/default", "Folder the run writes everything under.")
    log_every: int = _field(10, "Steps between metrics lines.", low=1)
    save_every: int = _field(500, "Steps between checkpoints.", low=1)
    sample_every: int = _field(500, "Steps between sample grids.", low=1)
    eval_every: int = _field(
        0, "Steps between evaluations of the EMA model against the training data (FD, KID, "
           "caption adherence; sampling/reference.py), logged to metrics.jsonl; 0: never.", low=0)
    eval_num_images: int = _field(256, "Images sampled per evaluation.", low=4)
    keep_last: int = _field(3, "Checkpoints kept on disk.", low=1)
    sample_prompts: tuple[str, ...] = _field(
        (), "Prompts of the sample grids; empty: every third shapes caption, or a folder "
            "dataset's first 8 distinct captions.")

    def __setattr__(self, name: str, value: Any) -> None:
        spec = _FIELDS.get(name)
        if spec is None:
            raise AttributeError(f"DiffusionConfig has no field {name!r}{_did_you_mean(name)}")
        object.__setattr__(self, name, _check_field(spec, value))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "DiffusionConfig":
        """Check the fields against each other; raise ValueError naming them."""
        if self.v_prediction and self.prediction_type != "v_prediction":
            raise ValueError(
                f"v_prediction=True contradicts prediction_type={self.prediction_type!r}; "
                "set prediction_type='v_prediction' too (or v_prediction=False)")
        if self.prediction_type == "v_prediction" and not self.v_prediction:
            # prediction_type is the source of truth; the guide's flag follows it.
            object.__setattr__(self, "v_prediction", True)
        if self.beta_schedule != "cosine" and not self.beta_start < self.beta_end:
            raise ValueError(
                f"beta_start={self.beta_start} must be smaller than beta_end={self.beta_end} "
                f"for beta_schedule={self.beta_schedule!r}")
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "rescale_betas_zero_snr=True makes the last timestep pure noise (SNR 0), where "
                "an epsilon prediction cannot recover x0; use prediction_type='v_prediction' "
                "(or 'sample') with it")
        if self.steps_offset and self.timestep_spacing != "leading":
            raise ValueError(
                f"steps_offset={self.steps_offset} only applies to timestep_spacing='leading', "
                f"not {self.timestep_spacing!r}; set steps_offset=0")
        if self.num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={self.num_inference_steps} must be at most "
                f"num_train_timesteps={self.num_train_timesteps}")
        for name in ("attention_resolutions", "channel_mult", "ae_channel_mult"):
            bad = [v for v in getattr(self, name) if v < 1]
            if bad:
                raise ValueError(f"{name}={getattr(self, name)} must hold positive ints")
        for name in ("channel_mult", "ae_channel_mult"):
            if not getattr(self, name):
                raise ValueError(f"{name}=() must have at least one level")
        if self.autoencoder is not None and self.stage == "autoencoder":
            raise ValueError(f"stage='autoencoder' trains an autoencoder and takes no "
                             f"autoencoder checkpoint; got autoencoder={self.autoencoder!r}")
        if self.autoencoder is not None and self.clip_sample:
            raise ValueError("clip_sample=True clips the predicted x0 to +-clip_sample_range, "
                             "which cuts unit-std latents; set clip_sample=False when "
                             f"autoencoder={self.autoencoder!r} is set")
        if self.pooled_text_conditioning and not self.use_spatial_transformer:
            raise ValueError("pooled_text_conditioning=True needs use_spatial_transformer=True "
                             "(a model without text input has no prompt to pool)")
        if self.pooled_text_conditioning and self.text_pooling == "attention" and \
                self.context_dim % self.num_heads:
            raise ValueError(f"text_pooling='attention' pools with num_heads={self.num_heads} "
                             f"heads, which must divide context_dim={self.context_dim}")
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError(f"dataset='folder' needs data_dir (the image folder); got "
                             f"{self.data_dir!r}")
        return self

    # ---- (de)serialisation ----
    def to_dict(self) -> dict:
        """Plain dict of every field; tuples become lists so YAML/JSON stay plain."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "DiffusionConfig":
        """Build from a dict; unknown keys are an error with a did-you-mean suggestion."""
        if not isinstance(data, dict):
            raise TypeError(f"config data must be a mapping of field names; got "
                            f"{type(data).__name__}")
        unknown = [k for k in data if k not in _FIELDS]
        if unknown:
            raise ValueError("unknown config field(s): " + "; ".join(
                f"{k!r}{_did_you_mean(k)}" for k in unknown))
        return cls(**data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.dump(self.to_dict(), Dumper=YamlDumper, sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DiffusionConfig":
        """Build from a YAML file; a syntax error or a duplicate key is a ValueError naming
        the file and the line."""
        try:
            data = load_yaml(Path(path).read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"cannot read config file {str(path)!r}: {yaml_problem(err)}") \
                from None
        if data is None:  # an empty file: the defaults
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of field: value "
                             f"lines; got a {type(data).__name__} ({str(data)[:40]!r})")
        return cls.from_dict(data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> "DiffusionConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def with_overrides(self, overrides: dict) -> "DiffusionConfig":
        """A new config with `overrides` (e.g. from `parse_overrides`) applied and validated.
        prediction_type is the source of truth: overriding it alone sets v_prediction to
        match (a v-prediction config with prediction_type=epsilon is an epsilon config)."""
        data = self.to_dict()
        if "prediction_type" in overrides and "v_prediction" not in overrides:
            data["v_prediction"] = overrides["prediction_type"] == "v_prediction"
        unknown = [k for k in overrides if k not in _FIELDS]
        if unknown:
            raise ValueError("unknown config field(s) in overrides: " + "; ".join(
                f"{k!r}{_did_you_mean(k)}" for k in unknown))
        data.update(overrides)
        return type(self).from_dict(data)


_FIELDS = {f.name: f for f in dataclasses.fields(DiffusionConfig)}


def parse_overrides(pairs: list[str]) -> dict:
    """Parse `--set` style `key=value` strings into a dict.

    Values are YAML scalars or lists: `lr=3e-4`, `use_ema=false`, `channel_mult=[1,2]`; a
    parenthesised tuple `channel_mult=(1,2)` and a bare comma list `channel_mult=1,2` work too.
    """
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {pair!r} must look like key=value")
        if key not in _FIELDS:
            raise ValueError(f"unknown config field {key!r} in override {pair!r}"
                             f"{_did_you_mean(key)}")
        raw = raw.strip()
        if raw.startswith("(") and raw.endswith(")"):
            raw = "[" + raw[1:-1] + "]"
        elif "," in raw and not raw.startswith("["):
            raw = "[" + raw + "]"
        try:
            out[key] = load_yaml(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ValueError(f"cannot parse the value of override {pair!r}: {err}") from None
    return out


# ---- field checking ----

def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list(_FIELDS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    return "None" if tp is type(None) else tp.__name__


def _coerce(value, tp):
    """Return `value` as type `tp`, or raise TypeError; ints are accepted for floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return tuple(_coerce(v, args[0]) for v in value)
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise TypeError


def _check_field(spec: dataclasses.Field, value):
    name, meta = spec.name, spec.metadata
    try:
        value = _coerce(value, spec.type)
    except TypeError:
        raise TypeError(f"{name}={value!r} must be {_describe(spec.type)}") from None
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ValueError(f"{name}={value!r} is not one of {list(meta['choices'])}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = meta["low"], meta["high"]
        too_low = low is not None and (value < low or (value == low and not meta["low_inclusive"]))
        too_high = high is not None and (value > high
                                         or (value == high and not meta["high_inclusive"]))
        if too_low or too_high:
            lo = "" if low is None else f"{low} {'<=' if meta['low_inclusive'] else '<'} "
            hi = "" if high is None else f" {'<=' if meta['high_inclusive'] else '<'} {high}"
            raise ValueError(f"{name}={value!r} is out of range; allowed: {lo}{name}{hi}")
    return value


def config_reference() -> list[tuple[str, str, str]]:
    """(field, default, help) for every field, in order: the README's config table."""
    return [(f.name, repr(_plain(f.default)), f.metadata["help"])
            for f in dataclasses.fields(DiffusionConfig)]
