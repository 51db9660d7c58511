"""Images out of (and into) the pipeline: (C, H, W) tensors in [0, 1] <-> PIL images, captioned
grids, and opening an image file with a one-line error.

Reading decoded images into model-space tensors (bit depths, ranges) is diffusion/images.py;
this module adds the PIL side the pipeline and the scripts need.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusion.images import DECODE_ERRORS, HIGH_DEPTH_WHITE, unit_float_image, unit_to_tensor

CAPTION_HEIGHT = 12  # pixels of caption text under each grid cell
GRID_PAD = 2
CAPTION_WIDTH = 96  # room for about 16 characters of the default PIL font
PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # channels -> PIL mode


def check_pil_channels(channels: int) -> None:
    """PIL images have 1 to 4 channels (L, LA, RGB, RGBA); ValueError naming in_channels."""
    if channels not in PIL_MODES:
        raise ValueError(f"in_channels={channels} images cannot be PIL images (allowed: 1 to "
                         f"4 channels, {'/'.join(PIL_MODES.values())}); use "
                         f"AdvancedDiffusionPipeline.generate for tensors")


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] -> a PIL image: L, LA, RGB or RGBA for 1 to 4 channels."""
    check_pil_channels(image.shape[0])
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array,
                           mode=PIL_MODES[array.shape[2]])


def from_pil(image: Image.Image, channels: int,
             size: tuple[int, int] | None = None) -> torch.Tensor:
    """A PIL image -> (1, channels, H, W) in [-1, 1], converted to L, LA, RGB or RGBA, and
    resized (bicubic) to size = (width, height) when given. High bit depth greyscale (16-bit
    PNGs, mode F in [0, 1]) is scaled to full precision, as the training data is (convert()
    would clip it at 255: white); an alpha channel is then 1."""
    check_pil_channels(channels)
    if image.mode in HIGH_DEPTH_WHITE:
        image = unit_float_image(image)  # mode F in [0, 1], resized in float below
    if size is not None and image.size != size:
        image = image.resize(size, Image.BICUBIC)
    if image.mode == "F":
        colour = 1 if channels < 3 else 3
        grey = unit_to_tensor(np.asarray(image, dtype=np.float32), colour)  # (colour, H, W)
        alpha = torch.ones(channels - colour, *grey.shape[1:])  # opaque
        return torch.cat([grey, alpha]).unsqueeze(0)
    image = image.convert(PIL_MODES[channels])
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = x.reshape(image.height, image.width, channels).permute(2, 0, 1)  # (C, H, W)
    return (x.float() / 255 * 2 - 1).unsqueeze(0)


def make_grid(images: torch.Tensor, captions: Sequence[str] | None = None,
              columns: int | None = None, scale: int = 2) -> Image.Image:
    """A grid of (B, C, H, W) images in [0, 1], each upscaled by `scale`, with its caption
    written under it."""
    B = images.shape[0]
    columns = columns or min(B, 8)
    rows = -(-B // columns)
    h, w = images.shape[2] * scale, images.shape[3] * scale
    text_h = CAPTION_HEIGHT if captions else 0
    cell_h = h + text_h + GRID_PAD
    cell_w = max(w, CAPTION_WIDTH if captions else w) + GRID_PAD
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(B):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        grid.paste(to_pil(images[i]).convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        if captions:
            draw.text((x, y + h), str(captions[i])[:24], fill="black")
    return grid


def open_image(path: str | Path, name: str) -> Image.Image:
    """Open and decode an image file; ValueError naming `name` and the path when it is missing,
    a folder, or not an image PIL can read. The pipeline's `generate_variations` takes a path
    through it, and the scripts' image arguments (sample.py's --init-image) too."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{name} {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder, not an image file")
    image = None
    try:
        image = Image.open(path)
        image.load()  # which closes the file of a single-frame image
    except DECODE_ERRORS as err:  # UnidentifiedImageError, broken chunks (SyntaxError), ...
        if image is not None:
            image.close()
        raise ValueError(f"{name} {str(path)!r} cannot be read as an image: {err}") from None
    return image
