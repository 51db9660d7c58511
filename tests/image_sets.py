"""Small labelled image sets for the evaluation tests (tests/test_metrics.py): four classes of
a bright square in one quadrant, as tensors, a dataset, or a folder of PNGs with captions."""

import json

import torch
from PIL import Image

QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


def blob_images(n, seed, channels=1, size=16):
    """n images of a bright square in one of four quadrants over noise, in [-1, 1], with the
    captions "a blob at <quadrant>" (class i % 4 for image i)."""
    g = torch.Generator().manual_seed(seed)
    images = -0.6 + 0.3 * torch.rand(n, channels, size, size, generator=g)
    half = size // 2
    for i in range(n):
        side = int(torch.randint(3, half, (1,), generator=g))
        top = int(torch.randint(0, half - side + 1, (1,), generator=g)) + half * ((i % 4) // 2)
        left = int(torch.randint(0, half - side + 1, (1,), generator=g)) + half * (i % 2)
        images[i, :, top:top + side, left:left + side] = 0.8
    return images, [f"a blob at {QUADRANTS[i % 4]}" for i in range(n)]


class BlobDataset(torch.utils.data.Dataset):
    def __init__(self, n, seed=0, channels=1):
        self.images, self.captions = blob_images(n, seed, channels)

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, index):
        return {"image": self.images[index], "text": self.captions[index]}


def write_folder(folder, images, captions=None):
    """PNGs of (N, 1, H, W) images in [-1, 1], with a metadata.jsonl when captions are given."""
    folder.mkdir(parents=True)
    lines = []
    for i, image in enumerate(images):
        pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
        if captions is not None:
            lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": captions[i]}))
    if captions is not None:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
