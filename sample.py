"""Sample images from a train.py checkpoint.

    python sample.py --checkpoint runs/shapes/last.pt --prompt "a red circle" --out out.png
                     [--negative-prompt TEXT] [--num-images 8] [--steps 50]
                     [--sampler ddim|ddpm|dpmsolver++|euler|euler_ancestral]
                     [--guidance-scale 7.5] [--guidance-rescale 0] [--eta 0] [--seed 0]
                     [--no-ema]
                     [--init-image in.png --strength 0.8]

OUT ending in .png is a grid with the prompt under each image; anything else is a folder of
one PNG per image plus metadata.jsonl ({"file_name", "text", "seed", ...} per line, the
convention the trainer's image-folder dataset reads). Image i draws all its noise from seed + i
alone, so the seed in metadata.jsonl remakes that image whatever the rest of the batch was.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from diffusion.config import positive_int
from nets import keep_freed_memory
from sampling import SAMPLERS, AdvancedDiffusionPipeline, from_pil, make_grid, to_pil
from sampling.pipeline import add_device_argument


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--num-images", type=positive_int, default=1)
    parser.add_argument("--steps", type=int, default=None,
                        help="default: the checkpoint config's num_inference_steps")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--guidance-rescale", type=float, default=None,
                        help="guidance rescale phi in [0, 1] (Lin et al. 2023)")
    parser.add_argument("--eta", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    parser.add_argument("--no-ema", action="store_true", help="use the trained, not EMA, weights")
    parser.add_argument("--init-image", help="image-to-image: the starting image")
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--out", required=True, help="a .png grid, or a folder")
    return parser.parse_args(argv)


def generate(args, prompts: list[str], seeds: list[int]):
    """(images (B, C, H, W) in [0, 1], settings, strength); ValueError (CheckpointError
    included) for anything the arguments got wrong."""
    pipeline = AdvancedDiffusionPipeline.from_checkpoint(
        args.checkpoint, use_ema=not args.no_ema, device=args.device)
    config = pipeline.config
    settings = {"negative_prompt": args.negative_prompt,
                **pipeline.settings(args.steps, args.guidance_scale, args.sampler, args.eta,
                                    args.guidance_rescale)}
    init, strength = None, 1.0
    if args.init_image:
        if not Path(args.init_image).exists():
            raise ValueError(f"--init-image {args.init_image!r} does not exist")
        size = (config.sample_size, config.sample_size)
        init = from_pil(Image.open(args.init_image).resize(size, Image.BICUBIC),
                        config.in_channels).expand(args.num_images, -1, -1, -1)
        strength = args.strength
    with tqdm(total=settings["num_inference_steps"], desc="sampling") as bar:
        images = pipeline.generate(prompts, seeds, init_images=init, strength=strength,
                                   callback=lambda i, t, x: bar.update(1), **settings)
    return images, settings, strength


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()
    prompts = [args.prompt] * args.num_images
    seeds = [args.seed + i for i in range(args.num_images)]
    try:
        images, settings, strength = generate(args, prompts, seeds)
    except ValueError as err:  # CheckpointError is one too
        sys.exit(f"sample.py: {err}")
    out = Path(args.out)
    if out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, prompts).save(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
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
