"""Evaluating images against any set of real images: the Frechet distance, KID and caption
adherence of sampling/metrics.py in the feature space of a net trained on the real images
(sampling/features.py), each beside its floor.

The real images (at most `max_images`, a seeded subset) are split by the seed into a training
part, on which the feature net trains, and a held-out part (`holdout`, 40% by default), cut in
two halves A and B. Generated images are compared with half A; the floors are the same metrics
between half B (as many images as were generated, when B has that many) and A, so a
generator that draws exactly like the data sits at the floor, up to sampling noise. Caption
adherence (class-like captions only) is the caption classifier's accuracy on the generated
images against the prompts they were drawn for, beside chance (the share of the most frequent
prompt) and beside its accuracy on the held-out real images.

`RealReference.build(dataset)` prepares all that once; `score(images, prompts)` scores a set;
`evaluate_pipeline(pipeline, dataset, num_images=N)` samples N images with prompts drawn as in
the data and scores them (the training loop's entry point); `compare_folders` reads two folders.
"""

import copy
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.data import derived_seed
from diffusion.folder import IMAGE_EXTENSIONS, ImageFolderDataset
from diffusion.images import HIGH_DEPTH_WHITE

from .features import (
    FeatureNetSettings,
    class_like_captions,
    extract_features,
    load_or_train,
    predict_classes,
)
from .metrics import (
    chance_accuracy,
    classifier_accuracy,
    frechet_distance_features,
    kernel_inception_distance,
)

MAX_REAL_IMAGES = 5000  # a larger dataset is subsampled (seeded) to this many real images
HOLDOUT_FRACTION = 0.4  # share of the real images held out from the feature net's training
MIN_REAL_IMAGES = 16  # needs a training part and two held-out halves of >= 4
MIN_HELDOUT = 8
MIN_FAKE_IMAGES = 4  # KID needs two subsets of two
MAX_DEFAULT_IMAGE_SIZE = 64  # compare_folders' default size: the real images' side, capped here
GREY_MODES = {"1", "L", "LA", *HIGH_DEPTH_WHITE}
DEFAULT_SAMPLE_BATCH = 48
# derived_seed tags: each random choice gets its own stream of the one seed
SUBSET_TAG, SPLIT_TAG, PROMPT_TAG, SHUFFLE_TAG, KID_TAG = 1, 2, 3, 4, 5


def dataset_images(dataset, indices) -> tuple[torch.Tensor, list[str]]:
    """Items `indices` of a dataset of {"image": (C, H, W) in [-1, 1], "text"} items ->
    ((N, C, H, W) float32, N captions). An ImageFolderDataset is read without its random
    flips (they change with the epoch, which would change the feature net's cache key)."""
    if getattr(dataset, "random_flip", False):
        dataset = copy.copy(dataset)
        dataset.random_flip = False
    items = [dataset[int(i)] for i in indices]
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"the dataset's images must all be (C, H, W) of one shape; got "
                         f"{sorted(shapes)}")
    return (torch.stack([item["image"] for item in items]).float(),
            [str(item["text"]) for item in items])


class RealReference:
    """The real side of an evaluation: the trained feature net, the held-out halves' features
    and labels, and the real captions (for drawing prompts). Build with `RealReference.build`."""

    def __init__(self, net, settings: FeatureNetSettings, classes: list[str] | None,
                 captions: list[str], features_a: torch.Tensor, features_b: torch.Tensor,
                 real_adherence: float | None, info: dict, seed: int, num_train: int):
        self.net, self.settings, self.classes, self.captions = net, settings, classes, captions
        self.features_a, self.features_b = features_a, features_b
        self.real_adherence, self.info, self.seed, self.num_train = \
            real_adherence, info, seed, num_train

    @classmethod
    def build(cls, dataset, *, seed: int = 0, cache_dir: str | Path | None = None,
              max_images: int = MAX_REAL_IMAGES, holdout: float = HOLDOUT_FRACTION,
              epochs: int | None = None, width: int | None = None) -> "RealReference":
        """Read (at most max_images of) the dataset, split it, train or load the feature net
        (cached under cache_dir, see features.load_or_train) and embed the held-out images."""
        if not 0 < holdout < 1:
            raise ValueError(f"holdout={holdout!r} must lie in (0, 1)")
        n_total = len(dataset)
        if n_total < MIN_REAL_IMAGES:
            raise ValueError(f"the real dataset has {n_total} images; need at least "
                             f"{MIN_REAL_IMAGES}")
        indices = torch.arange(n_total)
        if n_total > max_images:
            pick = torch.Generator().manual_seed(derived_seed(seed, SUBSET_TAG))
            indices = torch.randperm(n_total, generator=pick)[:max_images].sort().values
        images, captions = dataset_images(dataset, indices.tolist())
        n = len(captions)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            derived_seed(seed, SPLIT_TAG)))
        n_held = max(MIN_HELDOUT, round(holdout * n))
        held, train = order[:n_held], order[n_held:]
        classes = class_like_captions(captions)
        labels = None
        if classes is not None:
            index = {c: i for i, c in enumerate(classes)}
            labels = torch.tensor([index[c] for c in captions])
        channels, size = images.shape[1], images.shape[2]
        extra = {k: v for k, v in (("epochs", epochs), ("width", width)) if v is not None}
        settings = FeatureNetSettings(
            objective="classifier" if classes else "contrastive", channels=channels,
            image_size=size, num_classes=len(classes) if classes else 0, seed=seed, **extra)
        net, info = load_or_train(images[train], None if labels is None else labels[train],
                                  classes, settings, cache_dir)
        held_features = extract_features(net, images[held])
        half = n_held // 2
        real_adherence = None
        if classes is not None:
            real_adherence = classifier_accuracy(predict_classes(net, images[held]),
                                                 labels[held])
        return cls(net, settings, classes, captions, held_features[:half],
                   held_features[half:], real_adherence, info, seed, len(train))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        s = self.settings
        return s.channels, s.image_size, s.image_size

    def _prepare(self, images: torch.Tensor, minimum: int = MIN_FAKE_IMAGES) -> torch.Tensor:
        """(N, C, h, w) in [-1, 1], N >= minimum -> (N, C, H, W) at the real images' size
        (bilinear, antialiased, when it differs)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 \
                or images.shape[1] != self.settings.channels:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else \
                type(images).__name__
            raise ValueError(f"images must be (N, {self.settings.channels}, H, W) like the real "
                             f"images; got {shape}")
        if images.shape[0] < minimum:
            raise ValueError(f"got {images.shape[0]} images; need at least {minimum}")
        images = images.detach().to("cpu", torch.float32)
        size = self.settings.image_size
        if images.shape[2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear",
                                   align_corners=False, antialias=True).clamp(-1, 1)
        return images

    def score(self, images: torch.Tensor, prompts: list[str] | None = None, *,
              shuffle_prompts: bool = False) -> dict:
        """Metrics of (N, C, H, W) images in [-1, 1] (N >= 4) against held-out half A, with
        floors (half B vs A). prompts: the caption each image was drawn for (None or "" when
        unknown); with shuffle_prompts they are permuted first (a control: adherence should
        fall to chance). Returns the keys of the evaluation's JSON line."""
        images = self._prepare(images)
        fake = extract_features(self.net, images)
        n = fake.shape[0]
        b = self.features_b[:min(n, len(self.features_b))]
        kid_seed = derived_seed(self.seed, KID_TAG)
        kid, kid_std = kernel_inception_distance(fake, self.features_a, seed=kid_seed)
        kid_floor, kid_floor_std = kernel_inception_distance(b, self.features_a, seed=kid_seed)
        result = {
            "fd": frechet_distance_features(fake, self.features_a),
            "fd_floor": frechet_distance_features(b, self.features_a),
            "kid": kid, "kid_std": kid_std, "kid_floor": kid_floor,
            "kid_floor_std": kid_floor_std,
            **self.adherence(images, prompts, shuffle_prompts=shuffle_prompts),
            "real_adherence": self.real_adherence,
            "num_classes": len(self.classes) if self.classes else None,
            "num_fake": n, "num_real": len(self.features_a), "num_real_floor": len(b),
            "num_real_train": self.num_train, "shuffle_prompts": shuffle_prompts,
            "feature_net": {**self.settings.to_dict(), "cached": self.info["cached"],
                            "train_seconds": round(self.info["train_seconds"], 2),
                            "cache_file": self.info["path"]},
        }
        return result

    def adherence(self, images: torch.Tensor, prompts: list[str] | None, *,
                  shuffle_prompts: bool = False) -> dict:
        """{"adherence", "chance", "adherence_images"}: the classifier's accuracy on the images
        whose prompt is one of the real captions, and the share of the most frequent of those
        prompts; None (0 images) when the captions are not class-like or no prompt is one."""
        none = {"adherence": None, "chance": None, "adherence_images": 0}
        if self.classes is None or prompts is None:
            return none
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        prompts = list(prompts)
        if shuffle_prompts:
            order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(
                derived_seed(self.seed, SHUFFLE_TAG)))
            prompts = [prompts[i] for i in order.tolist()]
        index = {c: i for i, c in enumerate(self.classes)}
        known = [i for i, p in enumerate(prompts) if p in index]
        if not known:
            return none
        target = torch.tensor([index[prompts[i]] for i in known])
        predicted = predict_classes(self.net, self._prepare(images, minimum=1)[known])
        return {"adherence": classifier_accuracy(predicted, target),
                "chance": chance_accuracy(target), "adherence_images": len(known)}


def draw_prompts(captions: list[str], num_images: int, seed: int = 0) -> list[str]:
    """num_images captions drawn with replacement from the real ones, so each comes with its
    frequency in the data (seeded)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, PROMPT_TAG))
    picks = torch.randint(len(captions), (num_images,), generator=generator)
    return [captions[i] for i in picks.tolist()]


# One reference per (dataset object, settings) in this process, so a training loop that
# evaluates every few steps reads the real images and trains / loads the net once.
_REFERENCES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def real_reference(dataset, *, seed: int = 0, cache_dir=None, **build_kwargs) -> RealReference:
    """`RealReference.build(dataset, ...)`, kept for the dataset object's lifetime: the images
    of one dataset object are read once per process."""
    key = (seed, None if cache_dir is None else str(cache_dir),
           tuple(sorted(build_kwargs.items())))
    try:
        per_dataset = _REFERENCES.setdefault(dataset, {})
    except TypeError:  # not weak-referenceable (e.g. a list): build every time
        return RealReference.build(dataset, seed=seed, cache_dir=cache_dir, **build_kwargs)
    if key not in per_dataset:
        per_dataset[key] = RealReference.build(dataset, seed=seed, cache_dir=cache_dir,
                                               **build_kwargs)
    return per_dataset[key]


@torch.no_grad()
def evaluate_pipeline(pipeline, real_dataset, *, num_images: int, seed: int = 0,
                      cache_dir: str | Path | None = None,
                      batch_size: int = DEFAULT_SAMPLE_BATCH, shuffle_prompts: bool = False,
                      **generate_kwargs) -> dict:
    """Sample num_images images with prompts drawn as in real_dataset (its captions'
    frequencies, `draw_prompts`; image i from seed + i) and score them against it
    (`RealReference.score`). generate_kwargs go to `pipeline.generate` (num_inference_steps,
    guidance_scale, sampler, ...). The global RNG and the modules' train/eval modes are left as
    they were. Adds "seconds" (all of it) and "sampling_seconds" to the result."""
    start = time.perf_counter()
    if isinstance(num_images, bool) or not isinstance(num_images, int) \
            or num_images < MIN_FAKE_IMAGES:
        raise ValueError(f"num_images={num_images!r} must be an int >= {MIN_FAKE_IMAGES}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    reference = real_reference(real_dataset, seed=seed, cache_dir=cache_dir)
    channels = pipeline.image_channels
    if channels != reference.settings.channels:
        raise ValueError(f"the pipeline makes in_channels={channels} images but the real images "
                         f"have {reference.settings.channels} channels")
    prompts = draw_prompts(reference.captions, num_images, seed)
    sampling_start = time.perf_counter()
    images = torch.cat([
        pipeline.generate(prompts[i:i + batch_size],
                          list(range(seed + i, seed + min(i + batch_size, num_images))),
                          **generate_kwargs).cpu()
        for i in range(0, num_images, batch_size)])
    sampling_seconds = time.perf_counter() - sampling_start
    result = reference.score(images * 2 - 1, prompts, shuffle_prompts=shuffle_prompts)
    return {**result, "sampling_seconds": round(sampling_seconds, 2),
            "seconds": round(time.perf_counter() - start, 2)}


def folder_image_format(folder: str | Path) -> tuple[int, int]:
    """(side, channels) of a folder's first image in sorted order: its shorter side capped at
    MAX_DEFAULT_IMAGE_SIZE, and 1 for greyscale modes, else 3."""
    folder = Path(folder)
    paths = sorted((p for p in folder.rglob("*") if p.is_file()
                    and p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not paths:
        raise ValueError(f"no images in {str(folder)!r}; expected files ending in "
                         f"{list(IMAGE_EXTENSIONS)} (searched recursively)")
    with Image.open(paths[0]) as image:
        return min(min(image.size), MAX_DEFAULT_IMAGE_SIZE), 1 if image.mode in GREY_MODES else 3


def compare_folders(real_dir: str | Path, fake_dir: str | Path, *, image_size: int | None = None,
                    seed: int = 0, cache_dir: str | Path | None = None,
                    shuffle_prompts: bool = False, **build_kwargs) -> dict:
    """Score the images of fake_dir (captions, when it has them, from its metadata.jsonl or
    .txt files: the prompts) against the real images of real_dir, both read at image_size
    (default: `folder_image_format(real_dir)`) with real_dir's channels."""
    start = time.perf_counter()
    size, channels = folder_image_format(real_dir)
    size = image_size or size
    with warnings.catch_warnings():  # uncaptioned images are fine here: adherence is then null
        warnings.filterwarnings("ignore", message=".*have no caption")
        real = ImageFolderDataset(real_dir, size, in_channels=channels)
        fake = ImageFolderDataset(fake_dir, size, in_channels=channels)
    reference = real_reference(real, seed=seed, cache_dir=cache_dir, **build_kwargs)
    images, prompts = dataset_images(fake, range(len(fake)))
    result = reference.score(images, prompts, shuffle_prompts=shuffle_prompts)
    return {**result, "seconds": round(time.perf_counter() - start, 2)}
