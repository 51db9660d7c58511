"""Decode a large latent grid with the autoencoder whole and in tiles: time, peak memory, and
how far the tiled image is from the untiled one. Prints one JSON line per mode and a summary.

    python tests/benchmarks/bench_vae_tiling.py --checkpoint runs/shapes_autoencoder/last.pt
        [--size 512] [--tile 64] [--overlap 16] [--repeats 3] [--threads 2]

Each mode runs in its own process, so its peak resident memory (ru_maxrss, measured before and
after the decodes) is its own. The latent decoded is the posterior mean of a mosaic of held-out
shapes images at the autoencoder's training size (8 x 8 of them for 512 px), so both decodes
are also scored against the mosaic itself (PSNR). Without --checkpoint an untrained
autoencoder of configs/shapes_autoencoder.yaml's size is used (the timings hold, the images
mean nothing).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from diffusion import DiffusionConfig, ShapesDataset, load_checkpoint_file  # noqa: E402
from diffusion.latent import autoencoder_from_state  # noqa: E402
from losses import psnr  # noqa: E402
from nets import AutoencoderKL  # noqa: E402


def load_autoencoder(checkpoint: str | None) -> AutoencoderKL:
    if checkpoint:
        return autoencoder_from_state(load_checkpoint_file(checkpoint), checkpoint)[0]
    config = DiffusionConfig.from_yaml(ROOT / "configs" / "shapes_autoencoder.yaml")
    torch.manual_seed(0)
    return AutoencoderKL.from_config(config).eval()


MOSAIC_SEED = 2_000_003  # held-out shapes: not the training seed


def shapes_mosaic(size: int, tile: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: held-out shapes images of side `tile` side by side."""
    data = ShapesDataset(sample_size=tile, seed=MOSAIC_SEED)
    n = size // tile
    rows = [torch.cat([data[r * n + c]["image"] for c in range(n)], dim=2) for r in range(n)]
    return torch.cat(rows, dim=1)[None]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def run_mode(args) -> dict:
    """One mode in this process: time the decodes, report the peak memory they added."""
    torch.set_num_threads(args.threads)
    ae = load_autoencoder(args.checkpoint)
    mosaic = shapes_mosaic(args.size, args.tile)
    ae.enable_tiling(args.tile, args.overlap)  # the encode is tiled in both modes
    z = ae.encode(mosaic).mean
    ae.disable_tiling()
    if args.mode == "tiled":
        ae.enable_tiling(args.tile, args.overlap)
    before = peak_rss_mib()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        image = ae.decode(z)
        times.append(time.perf_counter() - start)
    torch.save({"image": image, "mosaic": mosaic}, args.out)
    return {"mode": args.mode, "size": args.size, "tile": args.tile, "overlap": args.overlap,
            "seconds_median": sorted(times)[len(times) // 2], "seconds": times,
            "peak_rss_added_mib": peak_rss_mib() - before, "threads": args.threads,
            "torch": torch.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=("whole", "tiled"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    results, images = {}, {}
    for mode in ("whole", "tiled"):
        out = Path(f"/tmp/bench_vae_tiling_{mode}.pt")
        command = [sys.executable, __file__, "--mode", mode, "--out", str(out)] + sys.argv[1:]
        line = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(line.splitlines()[-1])
        images[mode] = torch.load(out)
        print(json.dumps(results[mode]))
    whole, tiled = images["whole"]["image"].clamp(-1, 1), images["tiled"]["image"].clamp(-1, 1)
    mosaic = images["whole"]["mosaic"]
    print(json.dumps({
        "whole_vs_mosaic_psnr_db": psnr(whole, mosaic).item(),
        "tiled_vs_mosaic_psnr_db": psnr(tiled, mosaic).item(),
        "tiled_vs_whole_max_abs": (tiled - whole).abs().max().item(),
        "tiled_vs_whole_psnr_db": psnr(tiled, whole).item(),
        "memory_ratio": results["tiled"]["peak_rss_added_mib"]
        / max(results["whole"]["peak_rss_added_mib"], 1e-9),
        "time_ratio": results["tiled"]["seconds_median"] / results["whole"]["seconds_median"],
        "checkpoint": args.checkpoint}))


if __name__ == "__main__":
    main()
