"""The run folder of train.py and what keeps a run resumable: processes, signals, the data
position, metrics.jsonl and checkpoints.

    output_dir/config.yaml          the resolved config of the (latest) run
    output_dir/metrics.jsonl        one JSON object per logged step: step, loss, lr, grad_norm, ...
    output_dir/checkpoints/, last.pt  see checkpoint.py (rotation, atomic writes)
    output_dir/tensorboard/         when tensorboard is installed
    output_dir/samples/             sample grids (written by train.py)
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import (
    check_no_newer_run,
    find_resumable,
    load_checkpoint_file,
    save_run_checkpoint,
)
from .data import DATA_ORDER, GlobalBatchSampler, resume_position


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) this starts
    the process group: nccl with one GPU per process, gloo on the CPU; else (0, 1, cuda or cpu)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if not cuda:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    # one GPU per process: more processes than GPUs cannot run
    local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if local_rank >= gpus:
        raise ValueError(f"LOCAL_RANK={local_rank}, but this machine has {gpus} CUDA device(s): "
                         "start at most that many processes per node (torchrun "
                         "--nproc_per_node), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on "
                         "the CPU with gloo")
    dist.init_process_group("nccl")
    torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)


# What AutoencoderTrainer.train_step adds to a metrics line (the last micro-batch's values).
AUTOENCODER_METRICS = ("rec_loss", "kl", "psnr", "gan_weight", "disc_loss")


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop asks `stopping(trainer)` between steps, saves and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def stopping(self, trainer) -> bool:
        """A signal stops the run at the end of an accumulation window."""
        return self.signal is not None and not trainer.accumulating

    def sync(self, device: torch.device) -> None:
        """Under torch.distributed every rank must stop at the same step, or DDP would hang: a
        signal on any rank stops all of them. The flag travels on the training device, since
        an nccl group cannot reduce CPU tensors."""
        if not dist.is_initialized():
            return
        flag = torch.tensor([0 if self.signal is None else self.signal], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signal = int(flag) or None


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
    """A SummaryWriter under run_dir/tensorboard, or None (with a note) without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: metrics go to metrics.jsonl only "
              "(pip install tensorboard to get event files)", file=sys.stderr)
        return None
    return SummaryWriter(run_dir / "tensorboard")


class TrainingRun:
    """One train.py run in its output folder: resume, data position, metrics, checkpoints.

    Rank 0 (`is_main`) writes the files; the other ranks keep the same position and skip the
    writing. `resume` is None, "auto" (the newest loadable checkpoint in the folder, or a fresh
    start) or a checkpoint path. Everything the user can get wrong (a path that is a file, an
    unreadable or mismatched checkpoint, another run's folder) is a ValueError, raised before
    anything is written.
    """

    def __init__(self, config, trainer, batches: GlobalBatchSampler, dataset_size: int, *,
                 resume: str | None = None, is_main: bool = True):
        self.config, self.trainer, self.batches = config, trainer, batches
        self.is_main = is_main
        self.dir = Path(config.output_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"output_dir={str(self.dir)!r} is a file; it must be a folder "
                             "(created if missing)")
        # What the epoch order depends on; saved with the position, compared on resume.
        self.data_shape = {"global_batch": batches.global_batch, "dataset_size": dataset_size,
                           "seed": config.seed, "data_order": DATA_ORDER}
        state = self._resume_state(resume)
        position = trainer.load_state_dict(state) if state is not None else {}
        if resume != "auto":  # auto took the newest loadable one: newer files are broken
            check_no_newer_run(self.dir, trainer.global_step)
        self.epoch, self.batch, moved = resume_position(
            position.get("epoch", 0), position.get("batch", 0), position, self.data_shape,
            batches.batches_per_epoch)
        if moved and is_main:
            print(moved, file=sys.stderr)
        self.metrics_file, self.writer = None, None
        self.images_per_step = (config.batch_size * trainer.world_size
                                * config.gradient_accumulation_steps)
        self._last_time, self._last_step = time.perf_counter(), trainer.global_step

    def _resume_state(self, resume: str | None) -> dict | None:
        if not resume:
            return None
        if resume != "auto":
            return load_checkpoint_file(resume)
        found = find_resumable(self.dir)
        if found is None:
            print(f"no checkpoint in {self.dir}; starting from scratch", file=sys.stderr)
            return None
        print(f"resuming from {found[0]}", file=sys.stderr)
        return found[1]

    def open(self) -> None:
        """Create the folder and write config.yaml; open metrics.jsonl (without the lines past
        the resumed step) and TensorBoard; say what the run is. Rank 0 only."""
        if not self.is_main:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a path under a file, or a folder we may not write
            raise ValueError(f"cannot create output_dir={str(self.dir)!r}: "
                             f"{err.strerror or err}") from None
        self.config.to_yaml(self.dir / "config.yaml")
        config, trainer = self.config, self.trainer
        backend = f", backend {dist.get_backend()}" if dist.is_initialized() else ""
        print(f"global batch {self.images_per_step} = batch_size {config.batch_size} x "
              f"{trainer.world_size} processes x {config.gradient_accumulation_steps} "
              f"accumulation steps\ntraining on {trainer.device}{backend}", file=sys.stderr)
        self.metrics_file = open_metrics(self.dir / "metrics.jsonl", self.trainer.global_step)
        self.writer = open_tensorboard(self.dir)

    def start_epoch(self, dataset) -> None:
        """Point the batch sampler (and the dataset's flips) at the current position."""
        self.batches.set_position(self.epoch, self.batch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.epoch)

    def batch_done(self) -> None:
        self.batch += 1

    def epoch_done(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0

    def log(self, metrics: dict) -> None:
        """One metrics.jsonl line (and TensorBoard scalars train/<key>) for the step just made."""
        if not self.is_main:
            return
        step, now = self.trainer.global_step, time.perf_counter()
        its = (step - self._last_step) / (now - self._last_time)
        line = {"step": step, "loss": metrics["loss"], "lr": metrics["learning_rate"],
                "grad_norm": metrics["grad_norm"], "it_s": its,
                "images_s": its * self.images_per_step, "skipped_steps": metrics["skipped_steps"],
                **{key: metrics[key] for key in AUTOENCODER_METRICS if key in metrics}}
        self._write(line, "train", {key: line[key] for key in
                                    ("loss", "lr", "grad_norm", "it_s", *AUTOENCODER_METRICS)
                                    if key in line})
        self._last_time, self._last_step = now, step

    def log_eval(self, result: dict) -> None:
        """One metrics.jsonl line {"step", "eval": {fd, kid, ...}} (and TensorBoard scalars
        eval/<key>) for an evaluation at the current step."""
        if self.is_main:
            scalars = {key: value for key, value in result.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)}
            self._write({"step": self.trainer.global_step, "eval": result}, "eval", scalars)

    def _write(self, line: dict, group: str, scalars: dict) -> None:
        """Append `line` to metrics.jsonl (flushed) and `scalars` to TensorBoard as group/key."""
        self.metrics_file.write(json.dumps(line) + "\n")
        self.metrics_file.flush()
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{group}/{key}", value, line["step"])

    def save(self) -> None:
        """A checkpoint with the data position (rotated: the last keep_last are kept)."""
        if self.is_main:
            position = {"epoch": self.epoch, "batch": self.batch, **self.data_shape}
            save_run_checkpoint(self.trainer.state_dict(position), self.dir,
                                self.trainer.global_step, self.config.keep_last)

    def close(self) -> None:
        if self.metrics_file:
            self.metrics_file.close()
        if self.writer:
            self.writer.close()
