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
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from diffusion import DiffusionConfig, parse_overrides
from diffusion.checkpoint import (
    check_no_newer_run,
    find_resumable,
    load_checkpoint_file,
    save_run_checkpoint,
)
from diffusion.data import ImageFolderDataset, all_captions, build_dataset, collate
from diffusion.trainer import (
    DATA_ORDER,
    AdvancedDiffusionTrainer,
    GlobalBatchSampler,
    resume_position,
)
from nets import AdvancedUNet, keep_freed_memory
from sampling import AdvancedDiffusionPipeline, make_grid

SAMPLE_CAPTION_STRIDE = 3  # every third caption: a mix of colours and shapes
SAMPLE_PROMPTS = 8  # a folder dataset's sample grid: its first 8 distinct captions


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


def default_sample_prompts(dataset) -> list[str]:
    """The sample grids' prompts when sample_prompts is empty: every third shapes caption, or
    the first distinct captions of a folder dataset (its own prompts, not shapes')."""
    if not isinstance(dataset, ImageFolderDataset):
        return all_captions()[::SAMPLE_CAPTION_STRIDE]
    distinct = list(dict.fromkeys(c for c in dataset.captions if c))[:SAMPLE_PROMPTS]
    return distinct or [""] * SAMPLE_PROMPTS


def fail(reason):
    """Exit non-zero with `reason` (a message or an exception) on one line, no traceback: a YAML
    error's message spans several lines."""
    sys.exit("train.py: " + " ".join(str(reason).split()))


def setup_distributed():
    """(rank, world_size, device); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if not cuda:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    # one GPU per process: more processes than GPUs cannot run
    local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if local_rank >= gpus:
        fail(f"LOCAL_RANK={local_rank}, but this machine has {gpus} CUDA device(s): start at "
             "most that many processes per node (torchrun --nproc_per_node), or hide the "
             "GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU with gloo")
    dist.init_process_group("nccl")
    torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, saves and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


def resume_state(args, run_dir: Path):
    if not args.resume:
        return None
    if args.resume == "auto":
        found = find_resumable(run_dir)
        if found is None:
            print(f"no checkpoint in {run_dir}; starting from scratch", file=sys.stderr)
            return None
        print(f"resuming from {found[0]}", file=sys.stderr)
        return found[1]
    return load_checkpoint_file(args.resume)


def save_samples(trainer, config, run_dir: Path, step: int, prompts):
    """A grid of the EMA model's images for fixed prompts and seeds 0..n-1."""
    with trainer.ema_weights():
        pipeline = AdvancedDiffusionPipeline(config, trainer.model, trainer.text_encoder,
                                             trainer.noise_scheduler, device=trainer.device)
        images = pipeline.generate(prompts, list(range(len(prompts))),
                                   num_inference_steps=config.num_inference_steps,
                                   guidance_scale=config.guidance_scale)
    trainer.denoiser.train()  # the pipeline put the modules in eval mode
    path = run_dir / "samples" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, prompts).save(path)


def open_metrics(path: Path, step: int):
    """metrics.jsonl opened for appending, without the lines past `step`: a run killed between
    a log line and its next checkpoint logged steps that the resumed run logs again. A line
    cut short by the kill is dropped too."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return open(path, "a")


def open_tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: metrics go to metrics.jsonl only "
              "(pip install tensorboard to get event files)", file=sys.stderr)
        return None
    return SummaryWriter(run_dir / "tensorboard")


def main(argv=None):
    args = parse_args(argv)
    try:
        config = load_config(args)
    except (ValueError, TypeError, OSError) as err:  # bad config or --set: say it, no traceback
        fail(err)
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        fail(f"output_dir={str(run_dir)!r} is a file; it must be a folder (created if missing)")
    keep_freed_memory()  # reuse freed gradients and activations instead of re-faulting them
    rank, world, device = setup_distributed()
    is_main = rank == 0
    try:  # a missing data_dir, a folder without images, fewer images than one batch
        dataset = build_dataset(config)
        batches = GlobalBatchSampler(len(dataset), config.batch_size, world_size=world,
                                     rank=rank, seed=config.seed)
        dataset[0]  # a folder where no image decodes fails here, before anything is written
    except (ValueError, OSError, RuntimeError) as err:
        fail(err)
    torch.manual_seed(config.seed)  # same initial weights on every rank
    try:  # e.g. num_heads that does not divide a level's channels
        model = AdvancedUNet(config)
    except ValueError as err:
        fail(err)
    trainer = AdvancedDiffusionTrainer(model, config, device=device, distributed=world > 1)
    # A private generator keeps the DataLoader from drawing on the global RNG (dropout's).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=config.num_workers,
                                         generator=torch.Generator())
    try:  # an unreadable checkpoint, another model, or another run's folder: say it and stop
        state = resume_state(args, run_dir)
        position = trainer.load_state_dict(state) if state is not None else {}
        if args.resume != "auto":  # auto took the newest loadable one: newer files are broken
            check_no_newer_run(run_dir, trainer.global_step)
    except ValueError as err:
        fail(err)
    epoch, batch_in_epoch = position.get("epoch", 0), position.get("batch", 0)
    data_shape = {"global_batch": batches.global_batch, "dataset_size": len(dataset),
                  "seed": config.seed, "data_order": DATA_ORDER}
    epoch, batch_in_epoch, moved = resume_position(epoch, batch_in_epoch, position, data_shape,
                                                   batches.batches_per_epoch)
    if moved and is_main:
        print(moved, file=sys.stderr)
    prompts = list(config.sample_prompts) or default_sample_prompts(dataset)
    writer, metrics_file = None, None
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a path under a file, or a folder we may not write
            fail(f"cannot create output_dir={str(run_dir)!r}: {err.strerror or err}")
        config.to_yaml(run_dir / "config.yaml")
        metrics_file = open_metrics(run_dir / "metrics.jsonl", trainer.global_step)
        writer = open_tensorboard(run_dir)
        print(f"global batch {config.batch_size * world * config.gradient_accumulation_steps} "
              f"= batch_size {config.batch_size} x {world} processes x "
              f"{config.gradient_accumulation_steps} accumulation steps", file=sys.stderr)
        backend = f", backend {dist.get_backend()}" if dist.is_initialized() else ""
        print(f"training on {device}{backend}", file=sys.stderr)

    def checkpoint():
        if is_main:
            save_run_checkpoint(trainer.state_dict({"epoch": epoch, "batch": batch_in_epoch,
                                                    **data_shape}),
                                run_dir, trainer.global_step, config.keep_last)

    stop = StopFlag()

    def stopping() -> bool:  # a signal stops the run at the end of an accumulation window
        return stop.signal is not None and not trainer.accumulating

    bar = tqdm(total=config.max_steps, initial=trainer.global_step, disable=not is_main,
               dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), trainer.global_step
    while trainer.global_step < config.max_steps and not stopping():
        batches.set_position(epoch, batch_in_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        for batch in loader:
            metrics = trainer.train_step(batch)
            batch_in_epoch += 1
            step = trainer.global_step
            if metrics["updated"]:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
            if metrics["updated"] and step % config.log_every == 0 and is_main:
                now = time.perf_counter()
                its = (step - last_step) / (now - last_time)
                line = {"step": step, "loss": metrics["loss"], "lr": metrics["learning_rate"],
                        "grad_norm": metrics["grad_norm"], "it_s": its,
                        "images_s": its * config.batch_size * world *
                        config.gradient_accumulation_steps,
                        "skipped_steps": metrics["skipped_steps"]}
                metrics_file.write(json.dumps(line) + "\n")
                metrics_file.flush()
                if writer:
                    for key in ("loss", "lr", "grad_norm", "it_s"):
                        writer.add_scalar(f"train/{key}", line[key], step)
                last_time, last_step = now, step
            if metrics["updated"] and step % config.save_every == 0:
                checkpoint()
            if metrics["updated"] and step % config.sample_every == 0 and is_main:
                save_samples(trainer, config, run_dir, step, prompts)
            if world > 1:  # every rank must stop at the same step, or DDP would hang
                # on the training device: an nccl group has no backend for CPU tensors
                flag = torch.tensor([0 if stop.signal is None else stop.signal], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop.signal = int(flag) or None
            if step >= config.max_steps or stopping():
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    bar.close()
    if trainer.global_step % config.save_every != 0 or stop.signal is not None:
        checkpoint()
    if stop.signal is not None and is_main:
        print(f"stopped by signal {stop.signal} at step {trainer.global_step}; checkpoint saved",
              file=sys.stderr)
    if metrics_file:
        metrics_file.close()
    if writer:
        writer.close()
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
