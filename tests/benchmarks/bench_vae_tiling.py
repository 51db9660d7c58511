"""Decode a large latent grid with the autoencoder whole and in tiles: time, peak memory, and
how far the tiled image is from the untiled one. Prints one JSON line per mode and a summary.

    python tests/benchmarks/bench_vae_tiling.py --checkpoint runs/shapes_autoencoder/last.pt
        [--size 512] [--tile 64] [--overlap 16] [--repeats 3] [--threads 2]

Each mode runs in its own process, so its peak resident memory (ru_maxrss, measured before and
after the decodes) is its own. Without --checkpoint an untrained autoencoder of
configs/shapes_autoencoder.yaml's size is used (the timings hold, the images mean nothing).
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

from diffusion import DiffusionConfig, load_checkpoint_file  # noqa: E402
from diffusion.latent import autoencoder_from_state  # noqa: E402
from losses import psnr  # noqa: E402
from nets import AutoencoderKL  # noqa: E402


def load_autoencoder(checkpoint: str | None) -> AutoencoderKL:
    if checkpoint:
        return autoencoder_from_state(load_checkpoint_file(checkpoint), checkpoint)[0]
    config = DiffusionConfig.from_yaml(ROOT / "configs" / "shapes_autoencoder.yaml")
    torch.manual_seed(0)
    return AutoencoderKL.from_config(config).eval()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def run_mode(args) -> dict:
    """One mode in this process: time the decodes, report the peak memory they added."""
    torch.set_num_threads(args.threads)
    ae = load_autoencoder(args.checkpoint)
    f = ae.downsampling_factor
    z = torch.randn(1, ae.latent_channels, args.size // f, args.size // f,
                    generator=torch.Generator().manual_seed(0))
    if args.mode == "tiled":
        ae.enable_tiling(args.tile, args.overlap)
    before = peak_rss_mib()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        image = ae.decode(z)
        times.append(time.perf_counter() - start)
    torch.save(image, args.out)
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
    whole, tiled = images["whole"].clamp(-1, 1), images["tiled"].clamp(-1, 1)
    print(json.dumps({
        "tiled_vs_whole_max_abs": (tiled - whole).abs().max().item(),
        "tiled_vs_whole_psnr_db": psnr(tiled, whole).item(),
        "memory_ratio": results["tiled"]["peak_rss_added_mib"]
        / max(results["whole"]["peak_rss_added_mib"], 1e-9),
        "time_ratio": results["tiled"]["seconds_median"] / results["whole"]["seconds_median"],
        "checkpoint": args.checkpoint}))


if __name__ == "__main__":
    main()
