"""How much a trained model's text conditioning tells prompts apart, per kind of difference.

    python tests/benchmarks/probe_conditioning.py --checkpoint runs/shapes/last.pt [--images 8]
        [--pair "PROMPT A" "PROMPT B" ... --data-dir FOLDER] [--shape-pairs]

For pairs of prompts that differ in one way (the colour word, the shape word, one character),
prints two measurements as a table and JSON lines:

- `pooled_cos`: cosine similarity of the two prompts' pooled text embeddings, the vector the
  UNet adds to its timestep embedding (`text_pool_proj(unet.pooled_text(states))`: the mean
  or the attention pool, as the config says; absent when the config has
  `pooled_text_conditioning: false`). Near 1 means the global path cannot tell the prompts
  apart.
- `eps_gap[t]`: at timestep t, ||eps(x_t, a) - eps(x_t, b)|| / ||eps(x_t, a) - eps(x_t, "")||
  averaged over noised images of prompt a (shapes images for a shapes caption, a folder's
  images captioned a with --data-dir, else clipped Gaussian noise): how much swapping the
  prompt moves the prediction, relative to dropping it.
  Near 0 means the network ignores the difference at that noise level. At a fixed x_t and t
  the eps, v and x0 outputs are affine in one another with one slope (v = eps / sqrt(abar) -
  c x_t), so the ratio is the same whichever the model predicts, and models of different
  prediction types compare.

With `--shape-pairs` the pairs are every two shapes captions of one colour that differ in the
shape word (6 colours x 6 shape pairs), summarised per shape pair ("circle / cross" shares a
first letter), and each shape word's share of the attention pool (`pool_attention`: the
softmax weight of the pool's query on each token, mean over heads and colours) is printed.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffusion.folder import ImageFolderDataset  # noqa: E402
from diffusion.shapes import SHAPE_COLOURS, SHAPES, ShapesDataset  # noqa: E402
from sampling.pipeline import AdvancedDiffusionPipeline  # noqa: E402

PAIRS = {
    "colour word": [("a red circle", "a green circle"), ("a blue square", "a cyan square"),
                    ("a yellow cross", "a magenta cross"),
                    ("a green triangle", "a blue triangle")],
    "shape word": [("a red circle", "a red square"), ("a blue triangle", "a blue cross"),
                   ("a green circle", "a green cross"), ("a cyan square", "a cyan triangle")],
    "one character": [("a red circle", "a red circlf"), ("a handwritten digit 3",
                                                         "a handwritten digit 4"),
                      ("a photo of a 3", "a photo of a 8")],
}
TIMESTEPS = (900, 700, 500, 300, 100)


def shape_pairs() -> dict:
    """{"circle / cross": [("a red circle", "a red cross"), ...]} for every two shapes."""
    return {f"{a} / {b}": [(f"a {colour} {a}", f"a {colour} {b}") for colour in SHAPE_COLOURS]
            for i, a in enumerate(SHAPES) for b in SHAPES[i + 1:]}


@torch.no_grad()
def pool_attention(unet, text_encoder, prompt: str) -> list[tuple[str, float]]:
    """(token, weight) of the attention pool's query over the prompt's tokens, mean over heads;
    [] for a model without an AttentionPool."""
    pool = unet.text_pool
    if pool is None:
        return []
    ids, mask = text_encoder.tokenizer([prompt])
    states, mask = text_encoder(ids, mask, trim=True)  # (1, L, D)
    attn = pool.attn
    q = attn.to_q(pool.query).view(1, attn.heads, attn.dim_head)  # (1, h, d)
    k = attn.to_kv(states)[..., :attn.heads * attn.dim_head].view(
        1, -1, attn.heads, attn.dim_head)  # (1, L, h, d)
    logits = torch.einsum("bhd,blhd->bhl", q, k) * attn.dim_head ** -0.5
    weights = logits.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1).mean(1)[0]
    tokens = [text_encoder.tokenizer.decode([i]) or ("<bos>", "<eos>")[n > 0]
              for n, i in enumerate(ids[0, :mask.shape[1]].tolist())]
    return [(token, round(w, 3)) for token, w in zip(tokens, weights.tolist())]


def shapes_images(caption: str, count: int, size: int) -> torch.Tensor | None:
    """`count` ShapesDataset images of `caption` at `size`, or None for a non-shapes prompt."""
    dataset = ShapesDataset(size=24 * count, sample_size=size, seed=123)
    images = [item["image"] for item in dataset if item["text"] == caption][:count]
    return torch.stack(images) if images else None


def folder_images(dataset, caption: str, count: int) -> torch.Tensor | None:
    """The first `count` images of an ImageFolderDataset captioned `caption`, or None."""
    picked = [i for i, c in enumerate(dataset.captions) if c == caption][:count]
    return torch.stack([dataset[i]["image"] for i in picked]) if picked else None


@torch.no_grad()
def probe(pipeline, pairs, num_images: int, seed: int = 0, data_dir=None) -> list[dict]:
    unet, text_encoder, scheduler = pipeline.unet.unet, pipeline.text_encoder, pipeline.scheduler
    config = pipeline.config
    shape = (num_images, config.in_channels, config.sample_size, config.sample_size)

    def encode(prompt):
        states, mask = text_encoder.encode([prompt] * num_images)
        return states, mask

    su, mu = encode("")
    folder = ImageFolderDataset(data_dir, config.sample_size, in_channels=config.in_channels) \
        if data_dir else None
    rows = []
    for kind, group in pairs.items():
        for a, b in group:
            (sa, ma), (sb, mb) = encode(a), encode(b)
            row = {"kind": kind, "a": a, "b": b, "pooled_cos": None}
            if unet.text_pool_proj is not None:
                pa = unet.text_pool_proj(unet.pooled_text(sa[:1], ma[:1]))
                pb = unet.text_pool_proj(unet.pooled_text(sb[:1], mb[:1]))
                row["pooled_cos"] = round(torch.cosine_similarity(pa, pb).item(), 4)
            gen = torch.Generator().manual_seed(seed)
            if folder is not None:
                x0 = folder_images(folder, a, num_images)
            else:
                x0 = shapes_images(a, num_images, config.sample_size) if \
                    config.in_channels == 3 else None
            if x0 is None or len(x0) < num_images:
                x0 = torch.randn(shape, generator=gen).clamp(-1, 1)
            for t in TIMESTEPS:
                noise = torch.randn(shape, generator=gen)
                timesteps = torch.full((num_images,), t)
                x_t = scheduler.add_noise(x0, timesteps, noise)
                out_a = unet(x_t, timesteps, sa, ma)
                out_b = unet(x_t, timesteps, sb, mb)
                out_u = unet(x_t, timesteps, su, mu)
                gap = (out_a - out_b).flatten(1).norm(dim=1)
                drop = (out_a - out_u).flatten(1).norm(dim=1).clamp_min(1e-12)
                row[f"eps_gap[{t}]"] = round((gap / drop).mean().item(), 4)
            rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", type=int, default=8, help="noised images per pair")
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"),
                        help="probe these prompts instead of the built-in pairs (repeatable)")
    parser.add_argument("--data-dir", help="image folder whose images of prompt A are noised")
    parser.add_argument("--shape-pairs", action="store_true",
                        help="every two shapes captions that differ in the shape word")
    args = parser.parse_args(argv)
    pairs = {"given": [tuple(pair) for pair in args.pair]} if args.pair else \
        shape_pairs() if args.shape_pairs else PAIRS
    torch.manual_seed(0)
    pipeline = AdvancedDiffusionPipeline.from_checkpoint(args.checkpoint,
                                                         use_ema=not args.no_ema, device="cpu")
    rows = probe(pipeline, pairs, args.images, data_dir=args.data_dir)
    keys = ["pooled_cos"] + [f"eps_gap[{t}]" for t in TIMESTEPS]
    print(f"{'kind':14s} {'prompts':42s} " + " ".join(f"{k:>13s}" for k in keys))
    for row in rows:
        cells = " ".join(f"{'-' if row[k] is None else row[k]:>13}" for k in keys)
        print(f"{row['kind']:14s} {row['a'] + ' / ' + row['b']:42s} {cells}")
    if args.shape_pairs:
        for shape in SHAPES:
            weights = [pool_attention(pipeline.unet.unet, pipeline.text_encoder,
                                      f"a {colour} {shape}") for colour in SHAPE_COLOURS]
            if weights[0]:
                mean = [round(statistics.mean(w[n][1] for w in weights), 3)
                        for n in range(len(weights[0]))]
                print(json.dumps({"pool_attention": f"a <colour> {shape}",
                                  "tokens": [t for t, _ in weights[0]], "weights": mean}))
    for kind in pairs:
        group = [row for row in rows if row["kind"] == kind]
        summary = {"kind": kind, "checkpoint": args.checkpoint}
        for key in keys:
            values = [row[key] for row in group if row[key] is not None]
            summary[key] = round(statistics.median(values), 4) if values else None
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
