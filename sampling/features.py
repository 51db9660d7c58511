"""A small feature network trained here on the real images, for the Frechet distance, KID and
caption adherence of sampling/metrics.py: no downloaded network, no pretrained weights.

- `FeatureNet`: a 4x4 stride-2 stem convolution, stride-2 3x3 convolutions (GroupNorm, ReLU)
  down to 4x4, a 1x1 convolution to `feature_dim` channels and a global average pool: the
  features (B, feature_dim), its penultimate layer (like Inception's pool3 features). A linear
  head on top is the caption classifier, or the projection head of the contrastive objective.
- Objectives. Class-like captions (`class_like_captions`: a few distinct captions, each with
  several images) train a caption classifier (cross-entropy); otherwise (no captions, free
  text) the net trains self-supervised with SimCLR's contrastive loss (Chen et al. 2020, NT-Xent
  between two augmented views of each image: integer shifts with reflection, flips, brightness
  and contrast, and for RGB saturation; no resampling, so no blur invariance is learned).
- Deterministic: the weights, the batch order and the augmentations come from `seed` alone (on
  one machine and thread count); the global RNG is left as it was.
- Cached (`load_or_train`): one file per key, a hash of the training images' pixels, their
  labels and every setting (`FeatureNetSettings`, FEATURE_NET_VERSION), under `cache_dir`
  (default `default_cache_dir()`). It holds tensors, numbers and strings only and loads with
  torch.load(weights_only=True); a file that does not load or does not match is retrained with
  a warning, and a folder that cannot be written only costs the retraining next time.
"""

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Part of every cache key: bump it when the architecture or the training changes.
FEATURE_NET_VERSION = 1
OBJECTIVES = ("classifier", "contrastive")
DEFAULT_WIDTH = 32  # stem channels; doubled at each stride-2 level
DEFAULT_FEATURE_DIM = 128
DEFAULT_EPOCHS = {"classifier": 20, "contrastive": 15}  # docs/evaluation.md: 10 -> 20 took
# the held-out accuracy on shapes from 0.69 to 0.97, on photo patches from 0.95 to 0.97
DEFAULT_BATCH_SIZE = 128
DEFAULT_LEARNING_RATE = 3e-3
WEIGHT_DECAY = 5e-4
WARMUP_FRACTION = 0.1  # linear warm-up over this share of the steps, then cosine decay to 0
MIN_TRAIN_STEPS = 100  # small sets train for more epochs, at least this many optimizer steps
FINAL_SIZE = 4  # stride-2 levels continue down to this feature-map size
MAX_CHANNELS = 256
NORM_GROUPS = 8
CONTRASTIVE_TEMPERATURE = 0.2  # NT-Xent temperature tau
PROJECTION_DIM = 64  # SimCLR projection head output
MAX_SHIFT_FRACTION = 0.125  # augmentation: shifts of up to 1/8 of the image side
BRIGHTNESS, CONTRAST, SATURATION = 0.2, 0.3, 0.5  # augmentation strengths ([-1, 1] images)
MAX_CLASSES = 1000  # class-like captions: at most this many distinct ones ...
MIN_IMAGES_PER_CLASS = 3  # ... each on at least this many images
FEATURE_BATCH = 512  # images per forward when extracting features
CACHE_SUBDIR = ("advanced-diffusion", "features")
CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class FeatureNetSettings:
    """Everything that decides a feature net's weights besides its training images.

    objective: "classifier" (num_classes >= 2) or "contrastive" (num_classes 0); channels: 1 or
    3 (any >= 1 works); image_size: the images' side; epochs None: DEFAULT_EPOCHS[objective].
    """

    objective: str
    channels: int
    image_size: int
    num_classes: int = 0
    seed: int = 0
    epochs: int | None = None
    width: int = DEFAULT_WIDTH
    feature_dim: int = DEFAULT_FEATURE_DIM
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = DEFAULT_LEARNING_RATE

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is not one of {list(OBJECTIVES)}")
        if self.objective == "classifier" and self.num_classes < 2:
            raise ValueError(f"num_classes={self.num_classes} must be >= 2 for the classifier")
        if self.objective == "contrastive" and self.num_classes != 0:
            raise ValueError(f"num_classes={self.num_classes} must be 0 for 'contrastive'")
        for name in ("channels", "image_size", "width", "feature_dim", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.epochs is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS[self.objective])
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs={self.epochs!r} must be a positive int")
        if not (isinstance(self.learning_rate, float) and 0 < self.learning_rate < 1):
            raise ValueError(f"learning_rate={self.learning_rate!r} must be a float in (0, 1)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class FeatureNet(nn.Module):
    """(B, channels, H, W) images in [-1, 1] -> features (B, feature_dim) -> head outputs.

    Stem: Conv 4x4 stride 2 (channels -> width), ReLU; then Conv 3x3 stride 2 (doubling the
    channels up to MAX_CHANNELS), GroupNorm, ReLU while the map is larger than FINAL_SIZE; a 1x1
    Conv to feature_dim, GroupNorm, ReLU; global average pool -> `features`. `head` is
    Linear(feature_dim, num_outputs), or None for num_outputs=0.
    """

    def __init__(self, channels: int, image_size: int, width: int = DEFAULT_WIDTH,
                 feature_dim: int = DEFAULT_FEATURE_DIM, num_outputs: int = 0):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.ReLU()]
        size, c = max(image_size // 2, 1), width
        while size > FINAL_SIZE:
            out = min(2 * c, MAX_CHANNELS)
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1),
                       nn.GroupNorm(math.gcd(NORM_GROUPS, out), out), nn.ReLU()]
            size, c = (size + 1) // 2, out
        layers += [nn.Conv2d(c, feature_dim, 1), nn.GroupNorm(math.gcd(NORM_GROUPS, feature_dim),
                                                              feature_dim), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, num_outputs) if num_outputs else None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def build_net(settings: FeatureNetSettings) -> nn.Module:
    """The untrained net of `settings`, initialised from settings.seed (global RNG untouched).
    The contrastive objective's head is SimCLR's projection MLP."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = FeatureNet(settings.channels, settings.image_size, settings.width,
                         settings.feature_dim, settings.num_classes)
        if settings.objective == "contrastive":
            net.head = nn.Sequential(nn.Linear(settings.feature_dim, settings.feature_dim),
                                     nn.ReLU(), nn.Linear(settings.feature_dim, PROJECTION_DIM))
    return net


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

def class_like_captions(captions: list[str]) -> list[str] | None:
    """The sorted distinct captions when they are class-like, else None: 2 to MAX_CLASSES
    distinct non-empty captions, each on at least MIN_IMAGES_PER_CLASS images."""
    counts = Counter(captions)
    if "" in counts or not 2 <= len(counts) <= MAX_CLASSES \
            or min(counts.values()) < MIN_IMAGES_PER_CLASS:
        return None
    return sorted(counts)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random view of each (B, C, H, W) image in [-1, 1]: an integer shift of up to
    MAX_SHIFT_FRACTION of the side (reflection padding), a flip with probability 1/2, brightness
    and contrast jitter and, for 3 channels, saturation jitter; pixels are copied, never
    resampled."""
    b, c, h, w = images.shape
    pad = max(1, round(MAX_SHIFT_FRACTION * min(h, w)))
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect" if min(h, w) > pad else
                   "replicate")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, c, h, w + 2 * pad)
    view = padded.gather(2, rows)  # (B, C, H, W + 2 pad)
    flip = torch.rand(b, generator=generator) < 0.5
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :].expand(b, c, h, w)
    view = view.gather(3, cols)
    mean = view.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + CONTRAST * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    brightness = BRIGHTNESS * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    view = (view - mean) * contrast + mean + brightness
    if c == 3:
        grey = view.mean(dim=1, keepdim=True)
        saturation = 1 + SATURATION * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
        view = grey + (view - grey) * saturation
    return view.clamp(-1, 1)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor,
                 temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020, eq. 1) for (B, P) projections of two views:
    each of the 2B views must pick its partner among the 2B - 1 others by cosine similarity /
    temperature (cross-entropy), averaged."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2B, P)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(logits, partner)


def _learning_rate(step: int, total: int, peak: float) -> float:
    warmup = max(1, round(WARMUP_FRACTION * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_feature_net(images: torch.Tensor, labels: torch.Tensor | None,
                      settings: FeatureNetSettings) -> nn.Module:
    """Train the net of `settings` on (N, C, H, W) images in [-1, 1] (float32, CPU), with (N,)
    int64 labels in [0, num_classes) for the classifier (None for contrastive). AdamW, linear
    warm-up then cosine decay, settings.epochs passes over shuffled batches (more for small
    sets: at least MIN_TRAIN_STEPS steps); everything random is drawn from generators seeded
    settings.seed. Returns the net in eval mode."""
    _check_images(images, settings)
    if settings.objective == "classifier":
        if labels is None or labels.shape != (images.shape[0],):
            raise ValueError("labels must be an (N,) int64 tensor for the classifier; got "
                             f"{None if labels is None else tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= settings.num_classes:
            raise ValueError(f"labels must lie in [0, {settings.num_classes})")
    with torch.enable_grad():  # also when called under no_grad, e.g. from evaluate_pipeline
        return _train(net=build_net(settings), images=images, labels=labels, settings=settings)


def _train(net: nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
           settings: FeatureNetSettings) -> nn.Module:
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate,
                                  weight_decay=WEIGHT_DECAY)
    n = images.shape[0]
    batch = min(settings.batch_size, n)
    per_epoch = max(1, n // batch)  # the incomplete last batch is dropped
    total = max(per_epoch * settings.epochs, MIN_TRAIN_STEPS)
    net.train()
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=generator)
        index = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        x = images[index]
        if settings.objective == "classifier":
            loss = F.cross_entropy(net(x), labels[index])
        else:
            loss = nt_xent_loss(net(augment(x, generator)), net(augment(x, generator)))
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, total, settings.learning_rate)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


def _check_images(images: torch.Tensor, settings: FeatureNetSettings) -> None:
    expected = (settings.channels, settings.image_size, settings.image_size)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 \
            or tuple(images.shape[1:]) != expected:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be (N, {', '.join(map(str, expected))}) for these "
                         f"settings; got {shape}")


@torch.no_grad()
def extract_features(net: FeatureNet, images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> (N, feature_dim) float64 features (the net's
    penultimate layer), FEATURE_BATCH images per forward, on the CPU."""
    return _batched(net.features, images)


@torch.no_grad()
def predict_classes(net: FeatureNet, images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N,) int64 classes the caption classifier picks."""
    return _batched(net, images).argmax(dim=1)


def _batched(function, images: torch.Tensor) -> torch.Tensor:
    images = images.detach().to("cpu", torch.float32)
    out = [function(images[i:i + FEATURE_BATCH]) for i in range(0, len(images), FEATURE_BATCH)]
    return torch.cat(out).double()


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/advanced-diffusion/features, else ~/.cache/advanced-diffusion/features."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root).joinpath(*CACHE_SUBDIR)


def cache_key(images: torch.Tensor, labels: torch.Tensor | None, classes: list[str] | None,
              settings: FeatureNetSettings) -> str:
    """sha256 (hex) of FEATURE_NET_VERSION, the settings, the class names, the labels and the
    training images' float32 pixels: any changed pixel, label or setting is another net."""
    digest = hashlib.sha256()
    head = {"version": FEATURE_NET_VERSION, "settings": settings.to_dict(),
            "classes": classes, "shape": list(images.shape)}
    digest.update(json.dumps(head, sort_keys=True).encode())
    if labels is not None:
        digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_or_train(images: torch.Tensor, labels: torch.Tensor | None, classes: list[str] | None,
                  settings: FeatureNetSettings, cache_dir: str | Path | None = None
                  ) -> tuple[nn.Module, dict]:
    """The trained net for these training images and settings: loaded from
    `cache_dir/<key>.pt` when that file holds it, else trained and saved there.

    Returns (net in eval mode, info): info has "key", "path", "cached" (True: loaded, not
    trained) and "train_seconds" (of the training, whenever it ran). A file that fails to load
    or holds another key or settings is retrained with a warning; a cache folder that cannot
    be made or written gives a warning, and the net is still returned."""
    key = cache_key(images, labels, classes, settings)
    path = Path(default_cache_dir() if cache_dir is None else cache_dir) / f"{key}.pt"
    info = {"key": key, "path": str(path)}
    if path.is_file():
        net = _load(path, key, settings)
        if net is not None:
            return net, {**info, "cached": True, "train_seconds": net.train_seconds}
    start = time.perf_counter()
    net = train_feature_net(images, labels, settings)
    seconds = time.perf_counter() - start
    _save(path, key, settings, classes, net, seconds)
    net.train_seconds = seconds
    return net, {**info, "cached": False, "train_seconds": seconds}


def _load(path: Path, key: str, settings: FeatureNetSettings) -> nn.Module | None:
    """The net in the cache file, or None (with a warning) when it is unreadable or not this
    key's."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT \
                or state.get("key") != key or state.get("settings") != settings.to_dict():
            raise ValueError("it holds another format, key or settings")
        net = build_net(settings)
        net.load_state_dict(state["state_dict"])
        net.train_seconds = float(state["train_seconds"])
        return net.eval()
    except Exception as err:  # any damage: a truncated zip, garbage, missing tensors, ...
        warnings.warn(f"feature net cache file {path} cannot be used ({type(err).__name__}: "
                      f"{str(err)[:200]}); training the net again", stacklevel=3)
        return None


def _save(path: Path, key: str, settings: FeatureNetSettings, classes: list[str] | None,
          net: nn.Module, seconds: float) -> None:
    """Write the cache file atomically (temp file, rename); warn when that is impossible."""
    state = {"format": CACHE_FORMAT, "key": key, "settings": settings.to_dict(),
             "classes": classes or [], "train_seconds": float(seconds),
             "state_dict": net.state_dict()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(state, file)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    except OSError as err:
        warnings.warn(f"cannot write the feature net cache file {path} ({err.strerror or err}); "
                      "the next evaluation trains the net again", stacklevel=3)
