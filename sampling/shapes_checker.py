"""The shapes checker: a hand-written rule that reads the colour and shape back from an image of
the shapes dataset, so generated samples can be scored against their prompts
(`shapes_adherence`, used by `python -m sampling.evaluate`).
"""

import math
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from diffusion.shapes import CROSS_ARM_FRACTION, SHAPE_COLOURS, SHAPES, parse_caption

FOREGROUND_THRESHOLD = 0.5  # a pixel is foreground when its brightest channel (in [0, 1]) is above
COLOUR_TOLERANCE = 0.4  # < half the 1.0 between palette colours, so a match is unambiguous
MIN_SIDE_FRACTION = 0.2  # blobs smaller than this fraction of the image side are not a shape
MAX_AREA_FRACTION = 0.7  # a blob covering more of the image than this is background, not a shape
MAX_ASPECT = 1.5  # every drawn shape has a square bounding box
# The ideal shapes in (fill ratio of the bounding box, share of pixels in its upper half).
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (math.pi / 4, 0.5),
    "square": (1.0, 0.5),
    "triangle": (0.5, 0.25),
    "cross": (1 - (1 - CROSS_ARM_FRACTION) ** 2, 0.5),
}


def _to_unit_rgb(image) -> np.ndarray:
    """A (3, H, W) tensor in [-1, 1] or a PIL image -> (H, W, 3) float64 in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be a (3, H, W) tensor in [-1, 1] (colour needs RGB); "
                             f"got shape {tuple(image.shape)}")
        pixels = image.detach().to("cpu", torch.float64).clamp(-1, 1).permute(1, 2, 0)
        return (pixels.numpy() + 1.0) / 2.0
    raise TypeError(f"image must be a (3, H, W) torch.Tensor or a PIL.Image; "
                    f"got {type(image).__name__}")


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean (H, W) mask, as a mask (all False if none)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        queue, count = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            count += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if count > best_size:
            best_label, best_size = label, count
    return labels == best_label if best_size else np.zeros_like(mask)


def shape_features(image) -> dict | None:
    """The measurements the checker decides on, or None when there is no foreground.

    image: (3, H, W) tensor in [-1, 1] or a PIL image. Foreground is the largest 4-connected
    region of pixels whose brightest channel is above FOREGROUND_THRESHOLD. Returns `colour_rgb`
    (its mean RGB divided by its largest channel, so brightness does not matter), `side_fraction`
    (longest bounding-box side / image side), `area_fraction` (of the image), `aspect`,
    `fill` (area / bounding-box area) and `upper_share` (share of its pixels in the upper half
    of the bounding box; a half-way row counts half).
    """
    rgb = _to_unit_rgb(image)  # (H, W, 3)
    blob = _largest_component(rgb.max(axis=2) > FOREGROUND_THRESHOLD)  # (H, W)
    area = int(blob.sum())
    if area == 0:
        return None
    rows, cols = np.nonzero(blob)
    height = rows.max() - rows.min() + 1
    width = cols.max() - cols.min() + 1
    mean_rgb = rgb[blob].mean(axis=0)  # (3,)
    # Pixel centres relative to the bounding box's middle line: < 0 above, 0 on it.
    offset = rows + 0.5 - (rows.min() + height / 2)
    upper = (offset < 0).sum() + 0.5 * (offset == 0).sum()
    return {
        "colour_rgb": mean_rgb / mean_rgb.max(),
        "side_fraction": max(height, width) / max(rgb.shape[:2]),
        "area_fraction": area / blob.size,
        "aspect": max(height, width) / min(height, width),
        "fill": area / (height * width),
        "upper_share": upper / area,
    }


def classify_shape_image(image) -> tuple[str | None, str | None]:
    """Read (colour, shape) back from one image; None where the rule finds no answer.

    image: (3, H, W) tensor in [-1, 1] or a PIL image. The rule (measurements: `shape_features`):
    - no foreground -> (None, None);
    - colour: the palette colour nearest the blob's brightness-normalised mean RGB, or None when
      it is farther than COLOUR_TOLERANCE (grey, white, orange, mixed noise);
    - shape: None when the blob is too small (side < MIN_SIDE_FRACTION of the image), too large
      (area > MAX_AREA_FRACTION: a bright background or noise) or elongated (aspect > MAX_ASPECT);
      otherwise the nearest SHAPE_PROTOTYPES entry in (fill, upper_share): a square fills its box,
      a circle pi/4 of it, a cross 5/9, and an upward triangle 1/2 with only 1/4 of it up top.
    """
    features = shape_features(image)
    if features is None:
        return None, None
    palette = {name: np.asarray(rgb) / 255.0 for name, rgb in SHAPE_COLOURS.items()}
    distances = {name: np.linalg.norm(features["colour_rgb"] - rgb)
                 for name, rgb in palette.items()}
    colour = min(distances, key=distances.get)
    if distances[colour] > COLOUR_TOLERANCE:
        colour = None
    if (features["side_fraction"] < MIN_SIDE_FRACTION
            or features["area_fraction"] > MAX_AREA_FRACTION
            or features["aspect"] > MAX_ASPECT):
        return colour, None
    point = np.array([features["fill"], features["upper_share"]])
    shape = min(SHAPE_PROTOTYPES,
                key=lambda name: np.linalg.norm(point - np.asarray(SHAPE_PROTOTYPES[name])))
    return colour, shape


def shapes_adherence(images, prompts: Sequence[str]) -> dict:
    """How many images show their prompt's colour and shape, with chance levels beside.

    images: (B, 3, H, W) tensor in [-1, 1] or a list of B PIL images (or (3, H, W) tensors);
    prompts: B shapes captions. An image the checker cannot read (None) counts as wrong.
    Returns counts `n`, `colour_correct`, `shape_correct`, `both_correct`, `unreadable` (colour
    or shape None), accuracies `colour`, `shape`, `both`, `chance_colour` (1/6),
    `chance_shape` (1/4), `chance_both` (1/24): what guessing uniformly scores, and
    `shape_confusion`: {prompted shape: {shape read (or "none"): count}}.
    """
    if isinstance(images, torch.Tensor) and images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of captions, not one string")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; "
                         "they must pair up one to one")
    if len(prompts) == 0:
        raise ValueError("images and prompts are empty; need at least one pair")
    targets = [parse_caption(p) for p in prompts]
    colour_ok = shape_ok = both_ok = unreadable = 0
    confusion = {shape: dict.fromkeys((*SHAPES, "none"), 0) for shape in SHAPES}
    for image, (colour, shape) in zip(images, targets):
        got_colour, got_shape = classify_shape_image(image)
        confusion[shape][got_shape or "none"] += 1
        colour_ok += got_colour == colour
        shape_ok += got_shape == shape
        both_ok += got_colour == colour and got_shape == shape
        unreadable += got_colour is None or got_shape is None
    n = len(prompts)
    return {
        "n": n,
        "colour": colour_ok / n,
        "shape": shape_ok / n,
        "both": both_ok / n,
        "colour_correct": colour_ok,
        "shape_correct": shape_ok,
        "both_correct": both_ok,
        "unreadable": unreadable,
        "chance_colour": 1 / len(SHAPE_COLOURS),
        "chance_shape": 1 / len(SHAPES),
        "chance_both": 1 / (len(SHAPE_COLOURS) * len(SHAPES)),
        "shape_confusion": confusion,
    }
