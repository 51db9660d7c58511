"""Prompt adherence of a shapes model: sample every caption the ShapesDataset can produce with
several seeds, and let the shapes checker say how many images show the prompted colour and
shape.

    python -m sampling.evaluate --checkpoint runs/shapes/last.pt [--seeds 10] [--steps N]
        [--guidance-scale G] [--sampler S] [--shuffle-prompts] [--untrained] [--grid out.png]
        [--grid-seeds N] [--device cuda|cpu] [--cache-dir DIR]

--steps, --guidance-scale and --sampler default to the checkpoint config's values.

Prints a table (measured next to chance) and one JSON line. Two controls make sure the
checker cannot be satisfied by anything: `--untrained` samples a freshly initialised model of
the same configuration, and `--shuffle-prompts` scores the images against a permutation of
the prompts they were drawn for; both should sit near chance. Beside the checker it prints the
Frechet distance and KID of the same images against the ShapesDataset (with floors) and the
feature net's own caption adherence (`net_adherence`), as for any folder below.

Any image folder (sampling/reference.py: Frechet distance, KID and caption adherence in the
feature space of a small net trained on the real images, each beside its floor):

    python -m sampling.evaluate --real-dir REAL --fake-dir FAKE [--image-size S] [--seed N]
        [--cache-dir DIR] [--shuffle-prompts]
    python -m sampling.evaluate --checkpoint C --data-dir REAL [--num-images 1000] [--seed N]
        [--cache-dir DIR] [--steps N] [--guidance-scale G] [--sampler S] [--untrained] ...

An autoencoder checkpoint (stage=autoencoder) gets its reconstruction PSNR and SSIM instead
(sampling/reconstruction.py), on held-out shapes images or on --data-dir's images:

    python -m sampling.evaluate --checkpoint runs/shapes_autoencoder/last.pt [--data-dir D]
        [--num-images N]

The first compares two folders (FAKE's captions, from its metadata.jsonl as sample.py writes
it, are the prompts); the second samples --num-images images with prompts drawn as often as
the real captions are, image i from seed --seed + i. Both print a table and one JSON line
("fd", "kid", "kid_std", "adherence", "chance", "fd_floor", "kid_floor", "real_adherence",
...; adherence and chance are null unless the real captions are class-like).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffusion import SHAPES, ImageFolderDataset, ShapesDataset, all_captions
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
from .reconstruction import (
    evaluate_autoencoder,
    format_reconstruction_table,
    is_autoencoder_checkpoint,
)
from .reference import compare_folders, evaluate_pipeline, real_reference
from .shapes_checker import shapes_adherence

PROG = "evaluate"  # errors end the script as one line: "evaluate: message"

SHUFFLE_SEED = 12345
DEFAULT_SEEDS = 10  # shapes mode: images per caption
DEFAULT_NUM_IMAGES = 1000  # --checkpoint with --data-dir: images sampled


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
    confusion = result["shape_confusion"]
    read_as = list(next(iter(confusion.values())))
    lines += ["", "shape prompted (rows) and read (columns):",
              f"{'':<10}" + "".join(f"{name:>10}" for name in read_as)]
    lines += [f"{shape:<10}" + "".join(f"{counts[name]:>10}" for name in read_as)
              for shape, counts in confusion.items()]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--seeds", type=positive_int, default=None,
                        help=f"images per caption (default: {DEFAULT_SEEDS})")
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
    folders = parser.add_argument_group("any image folder (FD, KID, caption adherence)")
    folders.add_argument("--real-dir", help="the real images, compared with --fake-dir")
    folders.add_argument("--fake-dir", help="the images to score (captions: the prompts)")
    folders.add_argument("--data-dir", help="the real images, compared with --checkpoint's "
                         "samples")
    folders.add_argument("--num-images", type=positive_int, default=None,
                         help=f"images sampled with --data-dir (default: {DEFAULT_NUM_IMAGES})")
    folders.add_argument("--image-size", type=positive_int, default=None,
                         help="--real-dir: side the images are read at (default: the first "
                         "real image's shorter side, at most 64)")
    folders.add_argument("--seed", type=int, default=None,
                         help="feature net, data split, prompts and image seeds (default: 0)")
    folders.add_argument("--cache-dir", default=None,
                         help="feature net cache (default: $XDG_CACHE_HOME/advanced-diffusion/"
                         "features, else ~/.cache/...)")
    return parser.parse_args(argv)


# what the shapes mode adds from the feature net beside the checker's adherence
SHAPES_DISTANCE_KEYS = ("fd", "fd_floor", "kid", "kid_std", "kid_floor", "real_adherence")


def shapes_distances(config, images: torch.Tensor, prompts: list[str], cache_dir) -> dict:
    """FD, KID (with floors) and the feature net's caption adherence of shapes samples (images
    in [0, 1]) against the ShapesDataset the config trains on (sampling/reference.py), at the
    images' own size (a latent model's are sample_size x f)."""
    real = ShapesDataset(sample_size=images.shape[-1], seed=config.seed)
    return real_reference(real, cache_dir=cache_dir).score(images * 2 - 1, prompts)


def check_grid(grid: str | None) -> None:
    """--grid, before anything is sampled: a .png file that can be written."""
    if grid is None:
        return
    if Path(grid).suffix.lower() != ".png":
        raise ValueError(f"--grid {grid!r} must end in .png")
    check_output_path(grid, "--grid")


# flags of one mode only: (flag, attribute), each refused in the modes it does not belong to
SHAPES_ONLY = (("--seeds", "seeds"), ("--grid", "grid"), ("--grid-seeds", "grid_seeds"))
FOLDERS_ONLY = (("--num-images", "num_images"), ("--image-size", "image_size"),
                ("--seed", "seed"))
SAMPLING_ONLY = (("--steps", "steps"), ("--guidance-scale", "guidance_scale"),
                 ("--sampler", "sampler"), ("--no-ema", "no_ema"), ("--untrained", "untrained"))


def evaluation_mode(args) -> str:
    """"shapes", "folders" (--real-dir, --fake-dir) or "checkpoint" (--checkpoint, --data-dir)
    from the flags given; ValueError naming the flag for a combination that means nothing."""
    def given(pairs):
        return [flag for flag, name in pairs
                if getattr(args, name) is not None and getattr(args, name) is not False]

    if args.fake_dir and not args.real_dir:
        raise ValueError("--fake-dir needs --real-dir (the real images to compare with)")
    if args.real_dir:
        if not args.fake_dir:
            raise ValueError("--real-dir needs --fake-dir (the images to score); to sample "
                             "from a checkpoint use --checkpoint C --data-dir REAL")
        if args.checkpoint or args.data_dir:
            raise ValueError("--real-dir and --fake-dir compare two folders and take no "
                             "--checkpoint or --data-dir; to sample from a checkpoint use "
                             "--checkpoint C --data-dir REAL")
        mode, refused = "folders", SHAPES_ONLY + SAMPLING_ONLY + FOLDERS_ONLY[:1]
    elif args.data_dir:
        if not args.checkpoint:
            raise ValueError("--data-dir needs --checkpoint (the model to sample from); to "
                             "compare two folders use --real-dir and --fake-dir")
        mode, refused = "checkpoint", SHAPES_ONLY + FOLDERS_ONLY[1:2]
    elif args.checkpoint:
        mode, refused = "shapes", FOLDERS_ONLY
    else:
        raise ValueError("give --checkpoint C (shapes adherence; with --data-dir REAL: FD, KID "
                         "and adherence against REAL) or --real-dir REAL --fake-dir FAKE")
    for flag in given(refused):
        raise ValueError(f"{flag} does not apply here ({mode} evaluation); see --help")
    for flag, folder in (("--real-dir", args.real_dir), ("--fake-dir", args.fake_dir),
                         ("--data-dir", args.data_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"{flag} {folder!r} is not a folder")
    return mode


def format_metrics_table(result: dict) -> str:
    """The folder evaluation's table: each metric beside its floor, adherence beside chance."""
    lines = [f"{'metric':<12}{'measured':>12}{'floor':>12}"]
    lines += [f"{name:<12}{result[name]:>12.4g}{result[floor]:>12.4g}"
              for name, floor in (("fd", "fd_floor"), ("kid", "kid_floor"),
                                  ("kid_std", "kid_floor_std"))]
    if result["adherence"] is None:
        lines.append(f"{'adherence':<12}{'n/a':>12}  (the captions are not class-like, or the "
                     "images have no prompts)")
    else:
        lines.append(f"{'adherence':<12}{result['adherence']:>12.3f}  (chance "
                     f"{result['chance']:.3f}, real held-out images "
                     f"{result['real_adherence']:.3f})")
    if result["num_fake"] > result["num_real_floor"]:
        lines.append(f"(floors from {result['num_real_floor']} real images against "
                     f"{result['num_fake']} scored ones: FD's sample-size bias makes them "
                     "higher than matched floors)")
    return "\n".join(lines)


def folder_main(args, mode: str) -> int:
    """--real-dir / --fake-dir, or --checkpoint with --data-dir: table and JSON line."""
    seed = args.seed or 0
    with exit_on_error(PROG):  # bad folders, checkpoints, settings: one line
        if mode == "folders":
            result = compare_folders(args.real_dir, args.fake_dir, image_size=args.image_size,
                                     seed=seed, cache_dir=args.cache_dir,
                                     shuffle_prompts=args.shuffle_prompts)
            summary = {"real_dir": args.real_dir, "fake_dir": args.fake_dir}
        else:
            pipeline = AdvancedDiffusionPipeline.from_checkpoint(
                args.checkpoint, use_ema=not args.no_ema, device=args.device)
            config = pipeline.config
            if args.untrained:
                torch.manual_seed(config.seed)
                pipeline = AdvancedDiffusionPipeline(config, device=args.device,
                                                     latent_space=pipeline.latent_space)
            settings = pipeline.settings(args.steps, args.guidance_scale, args.sampler)
            real = ImageFolderDataset(args.data_dir, pipeline.image_size,
                                      in_channels=pipeline.image_channels)
            result = evaluate_pipeline(pipeline, real, num_images=args.num_images or
                                       DEFAULT_NUM_IMAGES, seed=seed, cache_dir=args.cache_dir,
                                       batch_size=args.batch_size,
                                       shuffle_prompts=args.shuffle_prompts, **settings)
            summary = {"checkpoint": str(args.checkpoint), "data_dir": args.data_dir,
                       "untrained": args.untrained, "ema": not args.no_ema, **settings}
    print(format_metrics_table(result))
    print(json.dumps({**result, **summary, "seed": seed}))
    return 0


def autoencoder_main(args) -> int:
    """--checkpoint AE.pt [--data-dir D] [--num-images N]: reconstruction PSNR and SSIM."""
    refused = [flag for flag, name in SHAPES_ONLY + SAMPLING_ONLY + FOLDERS_ONLY[1:]
               + (("--cache-dir", "cache_dir"),)
               if getattr(args, name) is not None and getattr(args, name) is not False]
    for flag in refused:
        sys.exit(f"{PROG}: {flag} does not apply to an autoencoder checkpoint (reconstruction "
                 "evaluation); see --help")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        sys.exit(f"{PROG}: --data-dir {args.data_dir!r} is not a folder")
    with exit_on_error(PROG):
        result = evaluate_autoencoder(args.checkpoint, args.data_dir, args.num_images,
                                      args.batch_size, args.device)
    print(format_reconstruction_table(result))
    print(json.dumps({"checkpoint": str(args.checkpoint), **result}))
    return 0


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()
    with exit_on_error(PROG):
        if args.checkpoint and not args.real_dir and Path(args.checkpoint).is_file() \
                and is_autoencoder_checkpoint(args.checkpoint):
            return autoencoder_main(args)
        mode = evaluation_mode(args)
    if mode != "shapes":
        return folder_main(args, mode)
    args.seeds = args.seeds or DEFAULT_SEEDS
    with exit_on_error(PROG):  # ValueError, CheckpointError included
        check_grid(args.grid)
        pipeline = AdvancedDiffusionPipeline.from_checkpoint(
            args.checkpoint, use_ema=not args.no_ema, device=args.device)
    config = pipeline.config
    if pipeline.image_channels != 3:  # before sampling: the checker reads colour
        sys.exit(f"{PROG}: the shapes checker scores RGB images; {args.checkpoint} holds a "
                 f"model of {pipeline.image_channels}-channel images")
    if config.dataset != "shapes":
        print(f"{PROG}: warning: {args.checkpoint} was trained on dataset="
              f"{config.dataset!r}; the score measures the shapes captions only",
              file=sys.stderr)
    if args.untrained:
        torch.manual_seed(config.seed)
        pipeline = AdvancedDiffusionPipeline(config, device=args.device,
                                             latent_space=pipeline.latent_space)
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
    with exit_on_error(PROG, OSError, "cannot use --cache-dir"):
        distances = shapes_distances(config, images, scored, args.cache_dir)
    print(format_metrics_table(distances))
    summary = {"checkpoint": str(args.checkpoint), "images": len(prompts),
               "seeds_per_caption": args.seeds, "shuffle_prompts": args.shuffle_prompts,
               "untrained": args.untrained, "ema": not args.no_ema, **settings,
               "sampling_seconds": round(seconds, 1),
               **{k: v for k, v in result.items() if isinstance(v, (int, float))},
               **{k: distances[k] for k in SHAPES_DISTANCE_KEYS},
               "net_adherence": distances["adherence"],
               "shape_confusion": result["shape_confusion"]}
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
