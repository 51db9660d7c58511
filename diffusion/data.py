"""Training data: the embedded shapes task with its adherence checker, and image folders.

Every dataset item is `{"image": (C, H, W) float32 in [-1, 1], "text": str}`; `collate` turns a
list of items into the trainer's batch `{"images": (B, C, H, W), "prompts": list[str]}`.

- `ShapesDataset`: one coloured shape on black, captioned "a {colour} {shape}"; procedural,
  deterministic per (seed, index), no downloads.
- `classify_shape_image` / `shapes_adherence`: a hand-written rule that reads the colour and shape
  back from an image, so generated samples can be scored against their prompts.
- `ImageFolderDataset`: PNG/JPEG/WebP files under a folder with captions from `metadata.jsonl`
  or same-name `.txt` files.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import DATASETS

# ---------------------------------------------------------------------------------------------
# Shapes: the embedded dataset
# ---------------------------------------------------------------------------------------------

# Corners of the RGB cube: every pair differs by a full step in at least one channel.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
# All four are left-right symmetric; the triangle points up (its mass sits low, see the checker).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SHAPES_CHANNELS = 3  # RGB: the colour is half of every caption

MIN_SAMPLE_SIZE = 16  # below this a 2-px cross arm and a triangle stop being recognisable
MIN_SHAPE_FRACTION = 0.4  # shape side, as a fraction of the image side: smallest ...
MAX_SHAPE_FRACTION = 0.75  # ... and largest
SHAPE_MARGIN_PX = 1.0  # empty pixels kept between the shape and the image border
CROSS_ARM_FRACTION = 1 / 3  # arm width of the cross, as a fraction of its side
DEFAULT_IMAGES_PER_CAPTION = 4000  # default ShapesDataset size: 24 captions x 4000 = 96,000


def all_captions() -> list[str]:
    """Every caption ShapesDataset produces, colour-major: "a red circle", "a red square", ..."""
    return [f"a {colour} {shape}" for colour in SHAPE_COLOURS for shape in SHAPES]


def parse_caption(text: str) -> tuple[str, str]:
    """Split a shapes caption: "a red circle" -> ("red", "circle"); case and spacing are free."""
    words = str(text).lower().split()
    if len(words) != 3 or words[0] != "a" or words[1] not in SHAPE_COLOURS \
            or words[2] not in SHAPES:
        raise ValueError(
            f"caption {text!r} is not a shapes caption; allowed: 'a <colour> <shape>' with colour "
            f"in {list(SHAPE_COLOURS)} and shape in {list(SHAPES)}")
    return words[1], words[2]


def _shape_mask(shape: str, size: int, centre: tuple[float, float], side: float) -> np.ndarray:
    """Boolean (size, size) mask of pixels whose centres lie inside `shape`.

    `centre` is (x, y) in pixel units (pixel i covers [i, i+1)); `side` is the bounding-box side.
    """
    coords = np.arange(size) + 0.5
    dx = coords[None, :] - centre[0]  # (1, W)
    dy = coords[:, None] - centre[1]  # (H, 1)
    half = side / 2
    inside_box = (np.abs(dx) <= half) & (np.abs(dy) <= half)  # (H, W)
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return inside_box
    if shape == "triangle":
        # Apex at the top centre, base along the bottom edge: half-width grows linearly downwards.
        depth = dy + half  # 0 at the apex, `side` at the base
        return inside_box & (np.abs(dx) <= depth / 2)
    if shape == "cross":
        arm = side * CROSS_ARM_FRACTION / 2
        return inside_box & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    raise ValueError(f"shape={shape!r} is not one of {list(SHAPES)}")


def draw_shape(colour: str, shape: str, sample_size: int, rng: np.random.Generator) -> np.ndarray:
    """One `colour` `shape` at a random size and position on black: (H, W, 3) uint8."""
    if colour not in SHAPE_COLOURS:
        raise ValueError(f"colour={colour!r} is not one of {list(SHAPE_COLOURS)}")
    side = rng.uniform(MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION) * sample_size
    low, high = side / 2 + SHAPE_MARGIN_PX, sample_size - side / 2 - SHAPE_MARGIN_PX
    centre = (rng.uniform(low, high), rng.uniform(low, high))
    mask = _shape_mask(shape, sample_size, centre, side)
    image = np.zeros((sample_size, sample_size, 3), dtype=np.uint8)
    image[mask] = SHAPE_COLOURS[colour]
    return image


class ShapesDataset(torch.utils.data.Dataset):
    """One coloured shape on a black background, captioned "a {colour} {shape}".

    Item i shows caption `all_captions()[i % 24]` (6 colours x 4 shapes), so every caption
    appears equally often (exactly when `size` is a multiple of 24, else within one); its size
    (40-75% of the side) and position (fully inside, 1 px margin) come from a generator seeded
    with (seed, i): the same seed always gives the same image, and the global RNG is never used.
    Items: {"image": (3, sample_size, sample_size) float32 in [-1, 1], "text": caption}.
    """

    def __init__(self, size: int | None = None, sample_size: int = 32, seed: int = 0):
        self.captions = all_captions()
        if size is None:
            size = DEFAULT_IMAGES_PER_CAPTION * len(self.captions)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size={size!r} must be a positive int (the number of images)")
        if not isinstance(sample_size, int) or sample_size < MIN_SAMPLE_SIZE:
            raise ValueError(f"sample_size={sample_size!r} must be an int >= {MIN_SAMPLE_SIZE} "
                             "for ShapesDataset (smaller shapes are not recognisable)")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative int")
        self.size, self.sample_size, self.seed = size, sample_size, seed

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """No-op, for the trainer's sake: shapes items do not depend on the epoch."""

    def caption(self, index: int) -> str:
        """Caption of item `index` without drawing it."""
        return self.captions[self._check_index(index) % len(self.captions)]

    def _check_index(self, index: int) -> int:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index={index} is out of range for a dataset of {self.size}")
        return index

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        text = self.captions[index % len(self.captions)]
        colour, shape = parse_caption(text)
        rng = np.random.default_rng([self.seed, index])
        pixels = draw_shape(colour, shape, self.sample_size, rng)  # (H, W, 3) uint8
        return {"image": _uint8_to_tensor(pixels), "text": text}


def _uint8_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (H, W) uint8 -> (C, H, W) float32 in [-1, 1]."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    image = torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # (C, H, W), writable
    return image.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# The shapes checker
# ---------------------------------------------------------------------------------------------

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
    or shape None), accuracies `colour`, `shape`, `both`, and `chance_colour` (1/6),
    `chance_shape` (1/4), `chance_both` (1/24): what guessing uniformly scores.
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
    for image, (colour, shape) in zip(images, targets):
        got_colour, got_shape = classify_shape_image(image)
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
    }


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
CHANNEL_MODES = {1: "L", 3: "RGB"}  # in_channels -> PIL mode
# Greyscale PIL modes with more than 8 bits per pixel -> the value that means white. PIL's
# convert("L"/"RGB") clips these at 255 instead of scaling them, so a 16-bit PNG's mid-grey
# (32768) would load as white; they are scaled to [0, 1] floats instead. Pillow opens 16-bit
# greyscale PNGs as "I;16" (older versions: "I", which holds the same 0..65535 values); "F" is
# taken to hold [0, 1]. (16-bit RGB(A) PNGs open as 8-bit "RGB"/"RGBA", correctly scaled.)
HIGH_DEPTH_WHITE: dict[str, float] = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535,
                                      "I;16N": 65535, "I": 65535, "F": 1.0}
FLIP_PROBABILITY = 0.5
# What a broken file can raise while PIL decodes it (truncated, garbage, hostile sizes).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error,
                 Image.DecompressionBombError)


def read_caption_file(path: Path) -> str:
    """A caption file's text: UTF-8, a leading byte-order mark dropped (Windows editors write
    one); ValueError naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"caption file {str(path)!r} is not UTF-8 text ({err.reason} at byte "
                         f"{err.start}); save it as UTF-8") from None


def _read_metadata(path: Path, root: Path) -> dict[Path, str]:
    """metadata.jsonl -> {image path: caption}; ValueError naming the line for any bad line."""
    captions: dict[Path, str] = {}
    first_line: dict[Path, int] = {}
    for number, line in enumerate(read_caption_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err.msg}): {line[:80]!r}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
                or not isinstance(entry.get("text"), str):
            raise ValueError(f"{where} must be an object with string 'file_name' and 'text'; "
                             f"got {line[:80]!r}")
        relative = Path(os.path.normpath(entry["file_name"]))  # "sub/../a.png" is "a.png"
        if relative.is_absolute() or relative.parts[0] == "..":
            raise ValueError(f"{where} names file_name={entry['file_name']!r}, which is not "
                             f"inside the folder; use a path relative to {root}")
        image = root / relative
        if image.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{where} names file_name={entry['file_name']!r}, which is not an "
                             f"image; allowed extensions: {list(IMAGE_EXTENSIONS)}")
        if not image.is_file():
            raise ValueError(f"{where} names file_name={entry['file_name']!r}, but {image} "
                             "does not exist")
        if image in first_line:
            raise ValueError(f"{where} repeats file_name={entry['file_name']!r} "
                             f"(first on line {first_line[image]})")
        first_line[image] = number
        captions[image] = entry["text"]
    return captions


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from a folder with captions, resized and centre-cropped to `sample_size`.

    Files: every .png/.jpg/.jpeg/.webp under `root`, recursively, in sorted path order.
    Captions, per image: its line in `root/metadata.jsonl` (`{"file_name": path relative to
    root, "text": caption}` per line, extra keys ignored: what sample.py writes), else a
    same-name `.txt` next to it (stripped), else "" (trained as the unconditional prompt; one
    warning says how many images had no caption). A bad metadata line (invalid JSON, missing
    keys, a file that does not exist, a repeat) is a ValueError naming the line.
    Pixels: EXIF orientation applied, converted to RGB (in_channels=3; alpha dropped) or L
    (in_channels=1), shorter side resized to `sample_size` (bicubic), centre crop.
    High-bit-depth greyscale (16-bit PNGs; PIL modes in HIGH_DEPTH_WHITE) is scaled, not
    clipped: 0 -> -1, 65535 -> +1, at full precision, repeated over RGB for in_channels=3. A file
    whose values lie outside its mode's range is skipped like an unreadable one.
    Flips: with `random_flip`, item i of epoch e is mirrored with probability 1/2 decided by
    (seed, e, i) alone; call `set_epoch(e)` each epoch (the global RNG is never used).
    Unreadable files: a file PIL cannot decode is skipped with one warning, counted in
    `num_skipped` (and listed in `skipped`), and the next readable file in order is returned in
    its place, so an epoch never stops; only when no file at all is readable is it an error.
    With DataLoader workers each worker keeps its own count.
    Items: {"image": (in_channels, sample_size, sample_size) float32 in [-1, 1], "text": str}.
    """

    def __init__(self, root: str | Path, sample_size: int, random_flip: bool = False,
                 seed: int = 0, in_channels: int = 3):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root={str(root)!r} is not a folder; need a folder of images")
        if not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"sample_size={sample_size!r} must be a positive int")
        if in_channels not in CHANNEL_MODES:
            raise ValueError(f"in_channels={in_channels!r} is not one of {list(CHANNEL_MODES)} "
                             "(1: greyscale, 3: RGB)")
        self.root, self.sample_size, self.random_flip = root, sample_size, bool(random_flip)
        self.seed, self.mode, self.epoch = seed, CHANNEL_MODES[in_channels], 0
        self.in_channels = in_channels
        self.paths = sorted((p for p in root.rglob("*")
                             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                            key=lambda p: p.relative_to(root).as_posix())
        if not self.paths:
            raise ValueError(f"no images in {str(root)!r}; expected files ending in "
                             f"{list(IMAGE_EXTENSIONS)} (searched recursively)")
        metadata = root / METADATA_FILE
        from_metadata = _read_metadata(metadata, root) if metadata.is_file() else {}
        self.captions, uncaptioned = [], 0
        for path in self.paths:
            text_file = path.with_suffix(".txt")
            if path in from_metadata:
                self.captions.append(from_metadata[path])
            elif text_file.is_file():
                self.captions.append(read_caption_file(text_file).strip())
            else:
                self.captions.append("")
                uncaptioned += 1
        if uncaptioned:
            warnings.warn(f"{uncaptioned} of {len(self.paths)} images in {str(root)!r} have no "
                          f"caption (no {METADATA_FILE} line, no .txt); they get the empty "
                          "prompt ''", stacklevel=2)
        self.skipped: list[Path] = []
        self._bad: set[int] = set()

    @property
    def num_skipped(self) -> int:
        """How many unreadable files this dataset (this process) has skipped so far."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose flips `__getitem__` draws."""
        self.epoch = int(epoch)

    def load(self, path: Path) -> Image.Image:
        """Decode, orient, convert, resize the shorter side and centre-crop one file.

        Returns mode L/RGB (self.mode), or mode F in [0, 1] for high-bit-depth greyscale.
        """
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in HIGH_DEPTH_WHITE:
                image = unit_float_image(image)
            else:
                if "transparency" in image.info:  # palette transparency must pass through RGBA
                    image = image.convert("RGBA")
                image = image.convert(self.mode)
        return resize_center_crop(image, self.sample_size)

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index={index} is out of range for a dataset of {len(self)}")
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._bad:
                continue
            try:
                image = self.load(self.paths[candidate])
            except DECODE_ERRORS as err:
                self._bad.add(candidate)
                self.skipped.append(self.paths[candidate])
                warnings.warn(f"skipping unreadable image {self.paths[candidate]} "
                              f"({type(err).__name__}: {err})", stacklevel=2)
                continue
            if image.mode == "F":
                pixels = np.asarray(image, dtype=np.float32)  # (H, W)
            else:
                pixels = np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
            if self.random_flip and self._flips(index):
                pixels = pixels[:, ::-1]
            tensor = _uint8_to_tensor(pixels) if pixels.dtype == np.uint8 else \
                unit_to_tensor(pixels, self.in_channels)
            return {"image": tensor, "text": self.captions[candidate]}
        raise RuntimeError(f"none of the {len(self)} images in {str(self.root)!r} could be "
                           "read; see the warnings above")

    def _flips(self, index: int) -> bool:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return bool(rng.random() < FLIP_PROBABILITY)


def unit_float_image(image: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image (a HIGH_DEPTH_WHITE mode) -> mode F scaled to [0, 1].

    ValueError when a value is NaN or lies outside [0, white] (e.g. a 32-bit "I" image beyond
    16 bits).
    """
    white = HIGH_DEPTH_WHITE[image.mode]
    values = np.asarray(image).astype(np.float64)  # (H, W)
    low, high = float(values.min()), float(values.max())
    if not (0 <= low and high <= white):  # NaN fails both comparisons
        raise ValueError(f"mode {image.mode!r} pixel values must lie in [0, {white:g}]; got "
                         f"values in [{low:g}, {high:g}]")
    return Image.fromarray((values / white).astype(np.float32))  # mode F


def unit_to_tensor(pixels: np.ndarray, channels: int) -> torch.Tensor:
    """(H, W) greyscale float in [0, 1] (a `unit_float_image`'s pixels) -> (channels, H, W)
    float32 in [-1, 1], clipped first: a bicubic resize may overshoot [0, 1] a little."""
    image = torch.from_numpy(np.clip(pixels, 0.0, 1.0, dtype=np.float32))  # (H, W), a copy
    return (image * 2.0 - 1.0).expand(channels, *image.shape).contiguous()  # (C, H, W)


def resize_center_crop(image: Image.Image, sample_size: int) -> Image.Image:
    """Resize so the shorter side is `sample_size` (bicubic), then crop the centre square."""
    width, height = image.size
    scale = sample_size / min(width, height)
    new_size = (max(sample_size, round(width * scale)), max(sample_size, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left = (new_size[0] - sample_size) // 2
    top = (new_size[1] - sample_size) // 2
    return image.crop((left, top, left + sample_size, top + sample_size))


# ---------------------------------------------------------------------------------------------
# Batches and construction from the config
# ---------------------------------------------------------------------------------------------

def collate(batch: Sequence[dict]) -> dict:
    """Items -> the trainer's batch {"images": (B, C, H, W), "prompts": list of B str}."""
    if len(batch) == 0:
        raise ValueError("batch is empty; collate needs at least one item")
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) != 1:
        raise ValueError(f"batch images differ in shape: {sorted(shapes)}; every item must be "
                         "(C, H, W) with the same C, H, W")
    return {"images": torch.stack([item["image"] for item in batch]),
            "prompts": [item["text"] for item in batch]}


def build_dataset(config) -> ShapesDataset | ImageFolderDataset:
    """The dataset `config.dataset` names: "shapes" or "folder" (reading `config.data_dir`).

    Uses `sample_size`, `seed`, `in_channels` and, for folders, `random_flip` (shapes are all
    left-right symmetric at uniform positions, so a flip would add nothing there).
    """
    if config.dataset == "shapes":
        if config.in_channels != SHAPES_CHANNELS:
            raise ValueError(f"dataset='shapes' draws RGB images; in_channels="
                             f"{config.in_channels} must be {SHAPES_CHANNELS}")
        return ShapesDataset(sample_size=config.sample_size, seed=config.seed)
    if config.dataset == "folder":
        if not config.data_dir or not Path(config.data_dir).is_dir():
            raise ValueError(f"dataset='folder' needs data_dir (the image folder); "
                             f"got data_dir={config.data_dir!r}, which is not a folder")
        return ImageFolderDataset(config.data_dir, config.sample_size,
                                  random_flip=config.random_flip, seed=config.seed,
                                  in_channels=config.in_channels)
    raise ValueError(f"dataset={config.dataset!r} is not one of {list(DATASETS)}")
