"""The embedded shapes dataset: one coloured shape on black, captioned "a {colour} {shape}";
procedural, deterministic per (seed, index), no downloads. Its adherence checker, which reads the
colour and shape back from an image, is sampling/shapes_checker.py.

Items are `{"image": (3, H, W) float32 in [-1, 1], "text": str}`.
"""

import numpy as np
import torch

from .images import uint8_to_tensor

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
        return {"image": uint8_to_tensor(pixels), "text": text}
