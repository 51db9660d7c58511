"""Prompt adherence of a shapes model: sample every caption the ShapesDataset can produce with
several seeds, and let the shapes checker say how many images show the prompted colour and
shape.

    python -m sampling.evaluate --checkpoint runs/shapes/last.pt [--seeds 10] [--steps N]
        [--guidance-scale G] [--sampler S] [--shuffle-prompts] [--untrained] [--grid out.png]
        [--grid-seeds N] [--device cuda|cpu]

--steps, --guidance-scale and --sampler default to the checkpoint config's values.

Prints a table (measured next to chance) and one JSON line. Two controls make sure the
checker cannot be satisfied by anything: `--untrained` samples a freshly initialised model of
the same configuration, and `--shuffle-prompts` scores the images against a permutation of
the prompts they were drawn for; both should sit near chance.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffusion import SHAPES, all_captions
from nets import keep_freed_memory

from .cli import (
    FROM_CONFIG,
    add_device_argument,
    check_output_path,
    exit_on_error,
    make_folder,
    positive_int,
)
from .images import make_grid
from .pipeline import AdvancedDiffusionPipeline
from .shapes_checker import shapes_adherence

PROG = "evaluate"  # errors end the script as one line: "evaluate: message"

SHUFFLE_SEED = 12345


@torch.no_grad()
def sample_all_captions(pipeline: AdvancedDiffusionPipeline, seeds_per_caption: int, *,
                        batch_size: int = 48, **generate_kwargs):
    """Images in [0, 1] for every caption x seeds 0..seeds_per_caption-1:
    ((N, C, H, W), prompts). Each image's noise comes from its own seed alone (see
    AdvancedDiffusionPipeline.generate), so batch_size changes speed, not the images."""
    prompts = [c for c in all_captions() for _ in range(seeds_per_caption)]
    seeds = [s for _ in all_captions() for s in range(seeds_per_caption)]
    images = [pipeline.generate(prompts[i:i + batch_size], seeds[i:i + batch_size],
                                **generate_kwargs)
              for i in range(0, len(prompts), batch_size)]
    return torch.cat(images), prompts


def shuffled(prompts: list[str]) -> list[str]:
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    return [prompts[i] for i in order.tolist()]


def format_table(result: dict) -> str:
    rows = [("colour", "colour", "chance_colour"), ("shape", "shape", "chance_shape"),
            ("both", "both", "chance_both")]
    lines = [f"{'adherence':<10}{'measured':>10}{'chance':>10}"]
    lines += [f"{name:<10}{result[key]:>10.3f}{result[chance]:>10.3f}"
              for name, key, chance in rows]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--seeds", type=positive_int, default=10,
                        help="images per caption (default: 10)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"num_inference_steps ({FROM_CONFIG})")
    parser.add_argument("--guidance-scale", type=float, default=None, help=FROM_CONFIG)
    parser.add_argument("--sampler", default=None, help=FROM_CONFIG)
    parser.add_argument("--batch-size", type=positive_int, default=48,
                        help="images per forward; changes speed, not the images (default: 48)")
    add_device_argument(parser)
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--shuffle-prompts", action="store_true",
                        help="control: score against shuffled prompts")
    parser.add_argument("--untrained", action="store_true",
                        help="control: a freshly initialised model of the same config")
    parser.add_argument("--grid", help="also save the images as a grid, a .png file")
    parser.add_argument("--grid-seeds", type=positive_int, default=None,
                        help="put only seeds 0..N-1 of each caption in the grid (default: all)")
    return parser.parse_args(argv)


def check_grid(grid: str | None) -> None:
    """--grid, before anything is sampled: a .png file that can be written."""
    if grid is None:
        return
    if Path(grid).suffix.lower() != ".png":
        raise ValueError(f"--grid {grid!r} must end in .png")
    check_output_path(grid, "--grid")


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()
    with exit_on_error(PROG):  # ValueError, CheckpointError included
        check_grid(args.grid)
        pipeline = AdvancedDiffusionPipeline.from_checkpoint(
            args.checkpoint, use_ema=not args.no_ema, device=args.device)
    config = pipeline.config
    if config.in_channels != 3:  # before sampling: the checker reads colour
        sys.exit(f"{PROG}: the shapes checker scores RGB images; {args.checkpoint} holds a "
                 f"model of in_channels={config.in_channels}")
    if config.dataset != "shapes":
        print(f"{PROG}: warning: {args.checkpoint} was trained on dataset="
              f"{config.dataset!r}; the score measures the shapes captions only",
              file=sys.stderr)
    if args.untrained:
        torch.manual_seed(config.seed)
        pipeline = AdvancedDiffusionPipeline(config, device=args.device)
    start = time.perf_counter()
    with exit_on_error(PROG):  # e.g. --sampler heun, --steps 0: one line, not a traceback
        settings = pipeline.settings(args.steps, args.guidance_scale, args.sampler)
        if args.grid:
            make_folder(Path(args.grid).parent, "--grid")
        images, prompts = sample_all_captions(pipeline, args.seeds, batch_size=args.batch_size,
                                              **settings)
    seconds = time.perf_counter() - start
    scored = shuffled(prompts) if args.shuffle_prompts else prompts
    result = shapes_adherence(images * 2 - 1, scored)  # the checker reads [-1, 1]
    print(format_table(result))
    summary = {"checkpoint": str(args.checkpoint), "images": len(prompts),
               "seeds_per_caption": args.seeds, "shuffle_prompts": args.shuffle_prompts,
               "untrained": args.untrained, "ema": not args.no_ema, **settings,
               "sampling_seconds": round(seconds, 1),
               **{k: v for k, v in result.items() if isinstance(v, (int, float))}}
    print(json.dumps(summary))
    if args.grid:
        keep = min(args.grid_seeds or args.seeds, args.seeds)  # the grid shows scored images
        picked = [i for i in range(len(prompts)) if i % args.seeds < keep]  # caption-major
        grid = make_grid(images[picked], [prompts[i] for i in picked], columns=keep * len(SHAPES))
        with exit_on_error(PROG, OSError, f"cannot write --grid {args.grid!r}"):  # full disk
            grid.save(args.grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
