"""Sample images from a train.py checkpoint.

    python sample.py --checkpoint runs/shapes/last.pt --prompt "a red circle" --out out.png
                     [--negative-prompt TEXT] [--num-images 1] [--steps N]
                     [--sampler ddim|ddpm|dpmsolver++|euler|euler_ancestral]
                     [--guidance-scale G] [--guidance-rescale PHI] [--eta ETA] [--seed 0]
                     [--no-ema] [--device cuda|cpu]
                     [--init-image in.png [--strength 0.8]]

--steps, --sampler, --guidance-scale, --guidance-rescale and --eta default to the checkpoint
config's values. OUT ending in .png is a grid with the prompt under each image; anything else is
a folder of one PNG per image plus metadata.jsonl ({"file_name", "text", "seed", ...} per line,
the convention the trainer's image-folder dataset reads). Image i draws all its noise from
seed + i alone, so the seed in metadata.jsonl remakes that image whatever the rest of the batch
was.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from diffusion.progress import Progress
from nets import keep_freed_memory
from sampling import SAMPLERS, AdvancedDiffusionPipeline, cli, from_pil, make_grid, to_pil
from sampling.pipeline import DEFAULT_STRENGTH, check_seed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--num-images", type=cli.positive_int, default=1, help="default: 1")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"num_inference_steps ({cli.FROM_CONFIG})")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help=cli.FROM_CONFIG)
    parser.add_argument("--guidance-scale", type=float, default=None, help=cli.FROM_CONFIG)
    parser.add_argument("--guidance-rescale", type=float, default=None,
                        help=f"guidance rescale phi in [0, 1] (Lin et al. 2023; {cli.FROM_CONFIG})")
    parser.add_argument("--eta", type=float, default=None, help=f"DDIM's eta ({cli.FROM_CONFIG})")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i uses seed + i, each in [0, 2**63 - 1] (default: 0)")
    cli.add_device_argument(parser)
    parser.add_argument("--no-ema", action="store_true", help="use the trained, not EMA, weights")
    parser.add_argument("--init-image", help="image-to-image: the starting image")
    parser.add_argument("--strength", type=float, default=None,
                        help="with --init-image: the fraction of the steps run from it, in "
                             f"[0, 1] (default: {DEFAULT_STRENGTH})")
    parser.add_argument("--out", required=True, help="a .png grid, or a folder")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()
    out = Path(args.out)
    grid = out.suffix.lower() == ".png"  # else a folder of PNGs plus metadata.jsonl
    prompts = [args.prompt] * args.num_images
    seeds = [args.seed + i for i in range(args.num_images)]
    with cli.exit_on_error("sample.py"):  # ValueError (CheckpointError too): one line
        # 1. the checks that need no checkpoint, before it loads
        check_seed(args.seed, args.num_images)
        if args.strength is not None and not args.init_image:
            raise ValueError(f"--strength {args.strength} is for image-to-image; it needs "
                             f"--init-image")
        cli.check_output_path(out, "--out", folder=not grid)
        init_image = cli.open_image(args.init_image, "--init-image") if args.init_image else None

        # 2. the pipeline, and the settings: the checkpoint config's where a flag is left out
        pipeline = AdvancedDiffusionPipeline.from_checkpoint(
            args.checkpoint, use_ema=not args.no_ema, device=args.device)
        settings = {"negative_prompt": args.negative_prompt,
                    **pipeline.settings(args.steps, args.guidance_scale, args.sampler, args.eta,
                                        args.guidance_rescale)}
        init, strength = None, 1.0
        if init_image is not None:
            size = (pipeline.image_size,) * 2
            init = from_pil(init_image, pipeline.image_channels, size)
            init = init.expand(args.num_images, -1, -1, -1)
            strength = DEFAULT_STRENGTH if args.strength is None else args.strength
        steps = pipeline.num_denoising_steps(settings["num_inference_steps"], strength)
        cli.make_folder(out.parent if grid else out, "--out")  # fails now, not after sampling

        # 3. generate: a bar on a terminal, plain lines in a log file
        with Progress(total=steps, desc="sampling") as progress:
            images = pipeline.generate(prompts, seeds, init_images=init, strength=strength,
                                       callback=lambda i, t, x: progress.update(1), **settings)

    # 4. save: a grid with the prompt under each image, or one PNG per image plus metadata
    with cli.exit_on_error("sample.py", OSError, f"cannot write --out {args.out!r}"):  # full disk
        if grid:
            make_grid(images, prompts).save(out)
        else:
            with open(out / "metadata.jsonl", "w") as f:
                for i, (image, seed) in enumerate(zip(images, seeds)):
                    name = f"{i:04d}.png"
                    to_pil(image).save(out / name)
                    f.write(json.dumps({"file_name": name, "text": args.prompt, "seed": seed,
                                        "checkpoint": str(args.checkpoint),
                                        "init_image": args.init_image,
                                        "strength": strength, **settings}) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
