"""Does the folder evaluation (sampling/reference.py) measure what it claims? Prints JSON lines.

    python tests/benchmarks/make_patch_folder.py --out data/patches
    python tests/benchmarks/bench_eval.py --data data/patches [--cache-dir DIR] [--seed 0]

On a captioned folder made by make_patch_folder.py (OUT/train: the real images, OUT/test:
images from the same photos that the feature net never sees), for both feature-net objectives
(the caption classifier, and the contrastive one with the captions dropped):
- the feature net's training time (a fresh cache folder, so it trains) and its size;
- the test images scored as they are (an ideal generator: FD and KID at the floor), after a
  Gaussian blur of increasing sigma, after added Gaussian noise of increasing std (in [-1, 1]
  units, clipped), one test image repeated (mode collapse) and ten test images repeated; with
  the floors (held-out half B vs A) and whether FD and KID rise monotonically;
- adherence on the real held-out images, on the test images, on shuffled prompts (classifier);
- the time of `python -m sampling.evaluate --real-dir OUT/train --fake-dir OUT/test` in a new
  process with the net cached (1,000 images at 32 px with the default folder).
Nothing here asserts anything: it is a benchmark, not a test.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffusion import ImageFolderDataset  # noqa: E402
from sampling.reference import RealReference, dataset_images  # noqa: E402

BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0, 3.0)  # pixels
NOISE_STDS = (0.05, 0.1, 0.2, 0.3, 0.5)  # in [-1, 1] units
NOISE_SEED = 1234


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) images, sigma in pixels, reflection padding."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    x = F.pad(images, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


class Uncaptioned(torch.utils.data.Dataset):
    """A dataset's images with every caption "" (the contrastive objective's case)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {"image": self.dataset[index]["image"], "text": ""}


def row(name: str, result: dict, **extra) -> dict:
    keys = ("fd", "fd_floor", "kid", "kid_std", "kid_floor", "adherence", "chance")
    return {"case": name, **extra, **{k: result[k] for k in keys}}


def measure(objective: str, real, test_images, test_prompts, cache_dir: Path, seed: int):
    start = time.perf_counter()
    reference = RealReference.build(real, seed=seed, cache_dir=cache_dir)
    build = time.perf_counter() - start
    net = reference.net
    print(json.dumps({"objective": objective, "train_seconds": round(reference.info[
        "train_seconds"], 1), "build_seconds": round(build, 1), "cached": reference.info[
        "cached"], "num_train": reference.num_train, "num_heldout_a": len(reference.features_a),
        "num_heldout_b": len(reference.features_b), "epochs": reference.settings.epochs,
        "parameters": sum(p.numel() for p in net.parameters()),
        "real_adherence": reference.real_adherence}), flush=True)
    rows = [row("test images as they are", reference.score(test_images, test_prompts))]
    if reference.classes:
        rows.append(row("shuffled prompts", reference.score(test_images, test_prompts,
                                                            shuffle_prompts=True)))
    for sigma in BLUR_SIGMAS:
        rows.append(row("blur", reference.score(gaussian_blur(test_images, sigma),
                                                test_prompts), sigma=sigma))
    generator = torch.Generator().manual_seed(NOISE_SEED)
    for std in NOISE_STDS:
        noise = torch.randn(test_images.shape, generator=generator)
        rows.append(row("noise", reference.score((test_images + std * noise).clamp(-1, 1),
                                                 test_prompts), std=std))
    n = len(test_images)
    rows.append(row("one image repeated", reference.score(
        test_images[:1].expand(n, -1, -1, -1), test_prompts)))
    ten = torch.randperm(n, generator=generator)[:10]
    rows.append(row("ten images repeated", reference.score(
        test_images[ten].repeat(n // 10, 1, 1, 1), test_prompts)))
    for r in rows:
        print(json.dumps({"objective": objective, **r}), flush=True)
    for kind in ("blur", "noise"):
        chain = [rows[0]] + [r for r in rows if r["case"] == kind]
        print(json.dumps({"objective": objective, "monotonic": kind, **{
            metric: all(a[metric] < b[metric] for a, b in zip(chain, chain[1:]))
            for metric in ("fd", "kid")}}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="make_patch_folder.py's --out")
    parser.add_argument("--cache-dir", default=None,
                        help="default: a new temporary folder (the nets train)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="bench-eval-"))
    data = Path(args.data)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "machine": platform.machine(), "load_average": os.getloadavg(),
                      "cache_dir": str(cache_dir)}), flush=True)
    real = ImageFolderDataset(data / "train", 32)
    test = ImageFolderDataset(data / "test", 32)
    test_images, test_prompts = dataset_images(test, range(len(test)))
    measure("classifier", real, test_images, test_prompts, cache_dir, args.seed)
    measure("contrastive", Uncaptioned(real), test_images, None, cache_dir, args.seed)
    command = [sys.executable, "-m", "sampling.evaluate", "--real-dir", str(data / "train"),
               "--fake-dir", str(data / "test"), "--cache-dir", str(cache_dir)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    wall = time.perf_counter() - start
    summary = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    print(json.dumps({"cli": " ".join(command[1:]), "returncode": done.returncode,
                      "wall_seconds": round(wall, 2), "seconds": summary.get("seconds"),
                      "num_fake": summary.get("num_fake"),
                      "cached": summary.get("feature_net", {}).get("cached")}), flush=True)


if __name__ == "__main__":
    main()
