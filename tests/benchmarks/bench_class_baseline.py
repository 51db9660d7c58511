"""The class-conditional baseline for a captioned folder: the same UNet, data, steps, batch,
optimiser, EMA and sampler as `python train.py --config C --set ...`, but the text encoder is
replaced by a lookup table with one learned vector per distinct caption (and one for the empty
prompt of classifier-free guidance), so prompts are told apart perfectly from the first step.
It measures how much the text conditioning costs against a model that never has to read.

    python tests/benchmarks/bench_class_baseline.py --config configs/shapes.yaml \
        --set dataset=folder data_dir=TRAIN sample_size=16 ... --eval-dir TEST \
        [--seeds 0 1 2] [--num-images 500] [--threads N]

Each seed trains in this process (the loop of train.py, without files) and is scored like
`python -m sampling.evaluate --checkpoint C --data-dir TEST --num-images N` (FD, KID and caption
adherence in a feature net trained on TEST). Prints one JSON line per seed and a summary line
with min / median / max, in the format of bench_recipe.py.
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
from sampling.reference import evaluate_pipeline  # noqa: E402

SCORES = ("adherence", "fd", "kid")


class CaptionTokenizer:
    """prompts -> ((B, 1) int64 caption index, 0 for "" or an unknown caption; (B, 1) True)."""

    def __init__(self, captions: list[str]):
        self.index = {caption: i + 1 for i, caption in enumerate(captions)}

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
        self.tokenizer = CaptionTokenizer(captions)
        self.table = nn.Embedding(len(captions) + 1, config.context_dim)
        nn.init.normal_(self.table.weight)  # unit scale, like the text encoder's LayerNormed states
        self.requires_grad_(False)
        self.table.requires_grad_(True)

    def forward(self, input_ids, attention_mask=None):
        return self.table(input_ids.to(self.table.weight.device)), input_ids >= 0


def train_and_score(config, eval_dir: str, num_images: int) -> dict:
    dataset = build_dataset(config)
    captions = sorted({c for c in dataset.captions if c})
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
    real = ImageFolderDataset(eval_dir, config.sample_size, in_channels=config.in_channels)
    with trainer.ema_weights():
        pipeline = AdvancedDiffusionPipeline.from_trainer(trainer)
        result = evaluate_pipeline(pipeline, real, num_images=num_images, seed=0,
                                   **pipeline.settings(None, None, None))
    return {"seed": config.seed, "train_s": round(train_seconds, 1),
            "steps_s": round(config.max_steps / train_seconds, 3),
            **{key: result[key] for key in SCORES if result.get(key) is not None}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, key=value")
    parser.add_argument("--eval-dir", required=True, help="real images scored against")
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
