"""Checkpoint files: plain tensors, numbers, strings and dicts only, written atomically.

A checkpoint is one `torch.save` file whose content loads with `torch.load(weights_only=True)`:
the config is stored as a dict, never a pickled object, so a checkpoint from a stranger cannot
run code. Files are written to a temporary name, fsynced and renamed, so a crash mid-write
leaves the previous checkpoint intact. A run folder keeps `checkpoints/step_XXXXXXXX.pt` (the
last `keep_last` of them) and `last.pt`, a hard link to the newest.
"""

import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from .config import DiffusionConfig

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST_NAME = "last.pt"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")

# Fields that define the network and the process it was trained on: resuming with any of them
# changed would load weights into a different model or train toward a different target.
MODEL_FIELDS = (
    "in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_resolutions",
    "channel_mult", "num_heads", "use_spatial_transformer", "transformer_depth", "context_dim",
    "sample_size", "use_scale_shift_norm", "pooled_text_conditioning", "text_encoder_layers",
    "text_encoder_width", "max_text_length", "num_train_timesteps", "beta_start", "beta_end",
    "beta_schedule", "prediction_type", "rescale_betas_zero_snr",
)


class CheckpointError(ValueError):
    """A file that is missing, truncated, corrupt, unsafe or not one of our checkpoints."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: dict, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint_file(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; any failure is a CheckpointError that says
    what is wrong with which file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is a folder; pass a .pt file "
                              f"(e.g. {str(path / LAST_NAME)!r})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, or a pickle that wants to run code
        raise CheckpointError(f"cannot load checkpoint {str(path)!r}: it is truncated, corrupt "
                              f"or not a plain-tensor checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION \
            or "config" not in state:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint of this codebase (format "
                              f"version {FORMAT_VERSION} with a config)")
    return state


def config_from_checkpoint(state: dict) -> DiffusionConfig:
    return DiffusionConfig.from_dict(state["config"])


def check_same_model(saved: DiffusionConfig, current: DiffusionConfig) -> None:
    """Raise ValueError listing the MODEL_FIELDS where two configs differ."""
    diffs = [f"{name}: checkpoint {getattr(saved, name)!r} vs config {getattr(current, name)!r}"
             for name in MODEL_FIELDS if getattr(saved, name) != getattr(current, name)]
    if diffs:
        raise ValueError("cannot resume: the checkpoint's model differs from the config in "
                         + "; ".join(diffs))


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step checkpoint in a run folder, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def save_run_checkpoint(state: dict, run_dir: str | Path, step: int,
                        keep_last: int) -> Path:
    """Write checkpoints/step_XXXXXXXX.pt atomically, point last.pt at it, prune old ones."""
    run_dir = Path(run_dir)
    path = atomic_save({"format_version": FORMAT_VERSION, **state},
                       run_dir / CHECKPOINT_DIR / f"step_{step:08d}.pt")
    last = run_dir / LAST_NAME
    tmp = run_dir / f".{LAST_NAME}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)  # a second name for the same file: no extra disk
    except OSError:
        atomic_save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, last)
    # Only files older than this step are pruned, so the one just written always survives
    # (train.py also refuses to mix two runs in one folder: check_no_newer_run).
    older = [p for s, p in step_checkpoints(run_dir) if s < step]
    for old in older[:max(len(older) - (keep_last - 1), 0)]:
        old.unlink(missing_ok=True)
    return path


def check_no_newer_run(run_dir: str | Path, step: int) -> None:
    """Raise ValueError if run_dir holds step checkpoints past `step`: training from `step` in
    that folder would interleave two runs' checkpoints and rotation would delete one of them."""
    found = step_checkpoints(run_dir)
    if found and found[-1][0] > step:
        raise ValueError(
            f"output_dir {str(run_dir)!r} already holds checkpoints up to step {found[-1][0]}, "
            f"past this run's step {step}; pass --resume auto to continue that run, or set "
            "output_dir to a new folder (--set output_dir=...)")


def find_resumable(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest step checkpoint of a run that loads, with its state; corrupt or truncated
    newer files are reported with a warning and skipped. None if there is none."""
    for _, path in reversed(step_checkpoints(run_dir)):
        try:
            return path, load_checkpoint_file(path)
        except CheckpointError as err:
            warnings.warn(f"skipping unusable checkpoint: {err}", stacklevel=2)
    return None
