"""Train a text-conditioned diffusion model.

    python train.py --config configs/shapes.yaml [--set key=value ...] [--resume auto|PATH]
                    [--max-steps N]
    torchrun --nproc_per_node=N train.py --config ...   (DistributedDataParallel; batch_size is
                                                         per process, the global batch is N x it)

Everything goes under config.output_dir: config.yaml (the resolved config), metrics.jsonl,
checkpoints/ and last.pt, samples/step_XXXXXXXX.png. Ctrl-C or SIGTERM saves a checkpoint and
exits 0. Parsing, composition, progress and files only: the math lives in the packages.
"""

import argparse
import sys

import torch
import torch.distributed as dist

from diffusion import DiffusionConfig, build_trainer, parse_overrides
from diffusion.data import GlobalBatchSampler, build_dataset, collate, default_sample_prompts
from diffusion.progress import Progress
from diffusion.run import StopFlag, TrainingRun, setup_distributed
from nets import keep_freed_memory
from sampling.training_views import evaluate_during_training, sample_grid


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file of DiffusionConfig fields")
    parser.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                        help="override config fields (YAML values); may be repeated")
    parser.add_argument("--resume", help="'auto' (newest loadable checkpoint in output_dir) "
                                         "or a checkpoint path")
    parser.add_argument("--max-steps", type=int, help="shortcut for --set max_steps=N")
    return parser.parse_args(argv)


def load_config(args) -> DiffusionConfig:
    overrides = parse_overrides([pair for group in args.set for pair in group])
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    return DiffusionConfig.from_yaml(args.config).with_overrides(overrides)


def setup(args):
    """Config, data, model, trainer and run folder; ValueError / OSError / RuntimeError for
    anything the user got wrong (a bad config or --set, a missing data_dir, a folder where no
    image decodes, a model the config cannot build, an unusable checkpoint), before any file is
    written."""
    config = load_config(args)
    rank, world, device = setup_distributed()
    torch.manual_seed(config.seed)  # same initial weights on every rank
    trainer = build_trainer(config, device=device, distributed=world > 1)
    dataset = build_dataset(config, trainer.image_size, trainer.image_channels)
    batches = GlobalBatchSampler(len(dataset), config.batch_size, world_size=world, rank=rank,
                                 seed=config.seed)
    dataset[0]  # a folder where no image decodes fails here
    run = TrainingRun(config, trainer, batches, len(dataset), resume=args.resume,
                      is_main=rank == 0)
    fit = trainer.fit_latent_scale(dataset)  # latent diffusion, fresh run: LDM's scale_by_std
    if fit and run.is_main:
        print("latent scale {scale:.4f}, shift {shift:.4f} (latent std {std:.4f}, mean "
              "{mean:.4f})".format(**fit), file=sys.stderr)
    run.open()
    return config, dataset, trainer, run


def save_samples(trainer, run, prompts, dataset):
    path = run.dir / "samples" / f"step_{trainer.global_step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(trainer, prompts, dataset).save(path)


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()  # reuse freed gradients and activations instead of re-faulting them
    try:
        config, dataset, trainer, run = setup(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:  # one line, no traceback
        sys.exit("train.py: " + " ".join(str(err).split()))
    # A private generator keeps the DataLoader from drawing on the global RNG (dropout's).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=run.batches, collate_fn=collate,
                                         num_workers=config.num_workers,
                                         generator=torch.Generator())
    prompts = list(config.sample_prompts) or default_sample_prompts(dataset)
    stop = StopFlag()
    progress = Progress(config.max_steps, initial=trainer.global_step, every=config.log_every,
                        desc="train", enabled=run.is_main)
    while trainer.global_step < config.max_steps and not stop.stopping(trainer):
        run.start_epoch(dataset)
        for batch in loader:
            metrics = trainer.train_step(batch)
            run.batch_done()
            step = trainer.global_step
            if metrics["updated"]:
                progress.update(loss=f"{metrics['loss']:.4f}",
                                lr=f"{metrics['learning_rate']:.2e}")
                if step % config.log_every == 0:
                    run.log(metrics)
                if step % config.save_every == 0:
                    run.save()
                if step % config.sample_every == 0 and run.is_main:
                    save_samples(trainer, run, prompts, dataset)
                if config.eval_every and step % config.eval_every == 0 and run.is_main:
                    run.log_eval(evaluate_during_training(trainer, dataset))
            stop.sync(trainer.device)
            if step >= config.max_steps or stop.stopping(trainer):
                break
        else:
            run.epoch_done()
    progress.close()
    if trainer.global_step % config.save_every != 0 or stop.signal is not None:
        run.save()
    if stop.signal is not None and run.is_main:
        print(f"stopped by signal {stop.signal} at step {trainer.global_step}; checkpoint saved",
              file=sys.stderr)
    run.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
