"""The class-conditional baseline for a captioned folder: the same UNet, data, steps, batch,
optimiser, EMA and sampler as `python train.py --config C --set ...`, but the text encoder is
replaced by a lookup table with one learned vector per distinct caption (and one for the empty
prompt of classifier-free guidance), so prompts are told apart perfectly from the first step.
It measures how much the text conditioning costs against a model that never has to read.

    python tests/benchmarks/bench_class_baseline.py --config configs/shapes.yaml \
        --set dataset=folder data_dir=TRAIN sample_size=16 ... --eval-dir TEST \
        [--seeds 0 1 2] [--num-images 500] [--threads N]
    python tests/benchmarks/bench_class_baseline.py --config configs/shapes.yaml --seeds 0 1 2

Each seed trains in this process (the loop of train.py, without files) and is scored like
`python -m sampling.evaluate --checkpoint C --data-dir TEST --num-images N` (FD, KID and caption
adherence in a feature net trained on TEST), or, for the shapes (no --eval-dir), like
`python -m sampling.evaluate --checkpoint C` (the shapes checker's colour and shape adherence of
10 seeds per caption) with the config's sampler and again with DDIM-20. Prints one JSON line
per seed and a summary line with min / median / max, in the format of bench_recipe.py.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_recipe import spread  # noqa: E402

from diffusion import DiffusionConfig, parse_overrides  # noqa: E402
from diffusion.data import GlobalBatchSampler, build_dataset, collate  # noqa: E402
from diffusion.folder import ImageFolderDataset  # noqa: E402
from diffusion.trainer import AdvancedDiffusionTrainer  # noqa: E402
from nets import AdvancedUNet, TextEncoder  # noqa: E402
from sampling import AdvancedDiffusionPipeline  # noqa: E402
from sampling.evaluate import DEFAULT_SEEDS, sample_all_captions  # noqa: E402
from sampling.reference import evaluate_pipeline  # noqa: E402
from sampling.shapes_checker import shapes_adherence  # noqa: E402

SCORES = ("adherence", "fd", "kid", "colour", "shape", "ddim20_colour", "ddim20_shape")


class CaptionTokenizer:
    """prompts -> ((B, 1) int64 caption index, 0 for "" or an unknown caption; (B, 1) True)."""

    def __init__(self, captions: list[str], kind: str):
        self.index = {caption: i + 1 for i, caption in enumerate(captions)}
        self.kind = kind  # the config's tokenizer, which this one stands in for

    def state_dict(self) -> dict:
        return {"kind": self.kind}

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = torch.tensor([[self.index.get(p, 0)] for p in prompts], dtype=torch.int64)
        return ids, torch.ones_like(ids, dtype=torch.bool)


class CaptionLookup(TextEncoder):
    """A TextEncoder in interface (tokenizer, encode, forward) that is a class embedding:
    the caption's learned vector as a one-token context. The transformer the parent builds is
    never run; it only keeps the pipeline's config checks satisfied."""

    def __init__(self, config, captions: list[str]):
        super().__init__(context_dim=config.context_dim, width=config.text_encoder_width,
                         num_layers=config.text_encoder_layers,
                         max_length=config.max_text_length)
        self.tokenizer = CaptionTokenizer(captions, config.tokenizer)
        self.table = nn.Embedding(len(captions) + 1, config.context_dim)
        nn.init.normal_(self.table.weight)  # unit scale, like the text encoder's LayerNormed states
        self.requires_grad_(False)
        self.table.requires_grad_(True)

    def forward(self, input_ids, attention_mask=None, trim: bool = False):
        return self.table(input_ids.to(self.table.weight.device)), input_ids >= 0


def score_shapes(pipeline) -> dict:
    """The shapes checker's colour and shape adherence, 10 seeds per caption, with the
    config's sampler and with DDIM-20 (sampling.evaluate's shapes mode)."""
    result = {}
    for prefix, settings in (("", pipeline.settings(None, None, None)),
                             ("ddim20_", pipeline.settings(20, None, "ddim"))):
        images, prompts = sample_all_captions(pipeline, DEFAULT_SEEDS, **settings)
        scores = shapes_adherence(images * 2 - 1, prompts)
        result.update({prefix + key: scores[key] for key in ("colour", "shape",
                                                             "shape_confusion")})
    return result


def train_and_score(config, eval_dir: str | None, num_images: int) -> dict:
    dataset = build_dataset(config)
    captions = sorted({c for c in dataset.captions if c})
    if eval_dir is None and config.dataset != "shapes":
        raise ValueError(f"--eval-dir is needed for dataset={config.dataset!r}; only the "
                         "shapes are scored without one")
    batches = GlobalBatchSampler(len(dataset), config.batch_size, seed=config.seed)
    torch.manual_seed(config.seed)
    model = AdvancedUNet(config)
    trainer = AdvancedDiffusionTrainer(model, config, text_encoder=CaptionLookup(config,
                                                                                 captions))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         generator=torch.Generator())
    start, epoch = time.perf_counter(), 0
    while trainer.global_step < config.max_steps:
        batches.set_position(epoch, 0)
        for batch in loader:
            trainer.train_step(batch)
            if trainer.global_step >= config.max_steps:
                break
        epoch += 1
    train_seconds = time.perf_counter() - start
    with trainer.ema_weights():
        pipeline = AdvancedDiffusionPipeline.from_trainer(trainer)
        if eval_dir is None:
            result = score_shapes(pipeline)
        else:
            real = ImageFolderDataset(eval_dir, config.sample_size,
                                      in_channels=config.in_channels)
            result = evaluate_pipeline(pipeline, real, num_images=num_images, seed=0,
                                       **pipeline.settings(None, None, None))
    return {"seed": config.seed, "train_s": round(train_seconds, 1),
            "steps_s": round(config.max_steps / train_seconds, 3),
            **{key: result[key] for key in (*SCORES, "shape_confusion",
                                            "ddim20_shape_confusion") if key in result}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, key=value")
    parser.add_argument("--eval-dir", default=None,
                        help="real images scored against (folders); none for the shapes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = DiffusionConfig.from_yaml(args.config).with_overrides(parse_overrides(args.set))
    rows = []
    for seed in args.seeds:
        row = {"config": args.config, "set": args.set, "baseline": "caption lookup",
               **train_and_score(base.with_overrides({"seed": seed}), args.eval_dir,
                                 args.num_images)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = {"config": args.config, "set": args.set, "baseline": "caption lookup",
               "summary": True, "runs": len(rows),
               **spread(rows, ("train_s", "steps_s", *SCORES))}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
