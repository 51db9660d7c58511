"""Image folders: PNG/JPEG/WebP files under a folder with captions from `metadata.jsonl` or
same-name `.txt` files (`ImageFolderDataset`).

Items are `{"image": (C, H, W) float32 in [-1, 1], "text": str}`.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .images import (
    DECODE_ERRORS,
    HIGH_DEPTH_WHITE,
    resize_center_crop,
    uint8_to_tensor,
    unit_float_image,
    unit_to_tensor,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILE = "metadata.jsonl"
CHANNEL_MODES = {1: "L", 3: "RGB"}  # in_channels -> PIL mode
FLIP_PROBABILITY = 0.5




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
            tensor = uint8_to_tensor(pixels) if pixels.dtype == np.uint8 else \
                unit_to_tensor(pixels, self.in_channels)
            return {"image": tensor, "text": self.captions[candidate]}
        raise RuntimeError(f"none of the {len(self)} images in {str(self.root)!r} could be "
                           "read; see the warnings above")

    def _flips(self, index: int) -> bool:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return bool(rng.random() < FLIP_PROBABILITY)
