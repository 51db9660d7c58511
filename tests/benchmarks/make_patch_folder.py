"""A captioned image folder of photo patches for measuring the evaluation (bench_eval.py): 32x32
crops of ten photos that scikit-image ships in its wheel (skimage/data/), captioned
"a photo of <name>" (or, with --captions numbers, "a photo of class <0-9>"), at random
positions and scales, with a fixed seed; a train part (the
real images) and a test part (images the feature net never sees, standing in for generated
ones). Nothing is downloaded; scikit-image is needed for this script only (`pip install
scikit-image`), not by the project.

    python tests/benchmarks/make_patch_folder.py --out data/patches [--train-per-photo 300]
        [--test-per-photo 100] [--size 32] [--seed 0] [--captions names|numbers]

writes OUT/train/ and OUT/test/, each with PNGs and a metadata.jsonl
({"file_name", "text"} per line, the format diffusion/folder.py reads).
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
          "grass.png", "gravel.png", "hubble_deep_field.jpg", "rocket.jpg")
MIN_CROP, MAX_CROP = 48, 160  # side of the square cut from the photo, in its pixels


def photo_folder() -> Path:
    try:
        import skimage
    except ImportError:
        raise SystemExit("make_patch_folder.py: needs scikit-image for its photos "
                         "(pip install scikit-image)") from None
    return Path(skimage.__file__).parent / "data"


def patches(photo: Image.Image, count: int, size: int, rng: np.random.Generator):
    """`count` size x size RGB crops of `photo`: a random side in [MIN_CROP, MAX_CROP] (at most
    the photo's shorter side), a random position, resized with a box filter."""
    width, height = photo.size
    for _ in range(count):
        side = int(rng.integers(MIN_CROP, min(MAX_CROP, width, height) + 1))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        yield crop.resize((size, size), Image.Resampling.BOX)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-per-photo", type=int, default=300)
    parser.add_argument("--test-per-photo", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions", choices=("names", "numbers"), default="names",
                        help="'a photo of astronaut' (prompts differ in a word) or 'a photo "
                             "of class 0' (prompts differ in one character)")
    args = parser.parse_args(argv)
    source, out = photo_folder(), Path(args.out)
    rng = np.random.default_rng(args.seed)
    lines = {"train": [], "test": []}
    for number, photo_name in enumerate(PHOTOS):
        name = photo_name.split(".")[0].replace("_", " ")
        caption = f"a photo of {name}" if args.captions == "names" else \
            f"a photo of class {number}"
        with Image.open(source / photo_name) as photo:
            photo = photo.convert("RGB")
            for part, count in (("train", args.train_per_photo), ("test", args.test_per_photo)):
                folder = out / part
                folder.mkdir(parents=True, exist_ok=True)
                for i, patch in enumerate(patches(photo, count, args.size, rng)):
                    file_name = f"{photo_name.split('.')[0]}_{i:04d}.png"
                    patch.save(folder / file_name)
                    lines[part].append({"file_name": file_name, "text": caption})
    for part, entries in lines.items():
        with open(out / part / "metadata.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(entry) + "\n" for entry in entries)
    print(json.dumps({"out": str(out), "train": len(lines["train"]), "test": len(lines["test"]),
                      "photos": len(PHOTOS), "size": args.size, "seed": args.seed}))


if __name__ == "__main__":
    main()
