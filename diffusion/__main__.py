"""`python -m diffusion`: a one-minute demo of the scheduler with no network and no training.

Data are a two-mode Gaussian mixture per pixel, whose exact denoiser is closed form
(diffusion/oracle.py). DDPM and DDIM driven by it should give back the data's statistics;
the printout shows how close each sampler gets, and how DDIM's error falls with steps.
"""

import argparse
import time

from .config import DiffusionConfig
from .oracle import GaussianMixture, sample_exact
from .scheduler import AdvancedScheduler

MIXTURE = GaussianMixture(weights=(0.3, 0.7), means=(-0.6, 0.5), stds=(0.1, 0.2))


def run(sampler: str, steps: int, num_samples: int, prediction_type: str, seed: int):
    config = DiffusionConfig(prediction_type=prediction_type, clip_sample=False)
    scheduler = AdvancedScheduler(config, sampler=sampler)
    scheduler.set_timesteps(steps)
    x = sample_exact(scheduler, MIXTURE, num_samples, seed=seed)
    return x.mean().item(), x.std().item(), (x > 0).double().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m diffusion",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=20_000,
                        help="samples per sampler (an int >= 1)")
    parser.add_argument("--prediction-type", default="epsilon",
                        choices=["epsilon", "v_prediction", "sample"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num-samples {args.num_samples} must be an int >= 1")
    print(f"data: mixture {MIXTURE}; mean {MIXTURE.mean():.4f}, std {MIXTURE.std():.4f}, "
          f"weight of the positive mode {MIXTURE.weights[1]:.4f}")
    print(f"{'sampler':<8}{'steps':>6}{'mean':>9}{'std':>9}{'weight':>9}{'seconds':>9}")
    for sampler, steps in [("ddim", 10), ("ddim", 25), ("ddim", 100), ("ddpm", 1000)]:
        start = time.perf_counter()
        mean, std, weight = run(sampler, steps, args.num_samples, args.prediction_type,
                                args.seed)
        print(f"{sampler:<8}{steps:>6}{mean:>9.4f}{std:>9.4f}{weight:>9.4f}"
              f"{time.perf_counter() - start:>9.2f}")


if __name__ == "__main__":
    main()
