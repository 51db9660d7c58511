"""Reading images into model space: decoded PIL images -> (C, H, W) float32 tensors in [-1, 1].

Used by the folder dataset and by the pipeline's image-to-image input; the way back (tensors to
PIL images, grids) is sampling/images.py.
"""

import struct

import numpy as np
import torch
from PIL import Image

# Greyscale PIL modes with more than 8 bits per pixel -> the value that means white. PIL's
# convert("L"/"RGB") clips these at 255 instead of scaling them, so a 16-bit PNG's mid-grey
# (32768) would load as white; they are scaled to [0, 1] floats instead. Pillow opens 16-bit
# greyscale PNGs as "I;16" (older versions: "I", which holds the same 0..65535 values); "F" is
# taken to hold [0, 1]. (16-bit RGB(A) PNGs open as 8-bit "RGB"/"RGBA", correctly scaled.)
HIGH_DEPTH_WHITE: dict[str, float] = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535,
                                      "I;16N": 65535, "I": 65535, "F": 1.0}
# What a broken file can raise while PIL decodes it (truncated, garbage, hostile sizes).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error,
                 Image.DecompressionBombError)
# Images outside [-1 - tol, 1 + tol] are rejected: a [0, 255] or [0, 1] batch is a bug.
IMAGE_RANGE_TOLERANCE = 1e-3


def uint8_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (H, W) uint8 -> (C, H, W) float32 in [-1, 1]."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    image = torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # (C, H, W), writable
    return image.float() / 127.5 - 1.0



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


def check_image_range(images: torch.Tensor, name: str) -> None:
    """Images in model space: finite and in [-1, 1] (up to IMAGE_RANGE_TOLERANCE); ValueError
    naming `name` and the range received otherwise."""
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or Inf")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1 - IMAGE_RANGE_TOLERANCE or hi > 1 + IMAGE_RANGE_TOLERANCE:
        raise ValueError(f"{name} must lie in [-1, 1]; got values in [{lo:.3g}, {hi:.3g}] "
                         f"(scale [0, 1] images with x * 2 - 1)")
