"""Checkpoint files: plain tensors, numbers, strings and dicts only, written atomically.

A checkpoint is one `torch.save` file whose content loads with `torch.load(weights_only=True)`:
the config is stored as a dict, never a pickled object, so a checkpoint from a stranger cannot
run code. Files are written to a temporary name, fsynced and renamed, so a crash mid-write
leaves the previous checkpoint intact. A run folder keeps `checkpoints/step_XXXXXXXX.pt` (the
last `keep_last` of them) and `last.pt`, a hard link to the newest.

Any checkpoint file in a run folder, even one that does not load, counts as a run: a corrupt
file or one from a newer version is never overwritten or pruned by a run started from scratch.
"""

import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from nets.text_encoder import EXTRA_STATE_KEY, ByteTokenizer

from .config import DiffusionConfig

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST_NAME = "last.pt"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
# atomic_save's temp names for step files and last.pt (see tempfile.mkstemp below)
_TEMP_FILE = re.compile(r"^\.(step_\d+|last)\.pt\..+\.tmp$")
NEW_FILE_MODE = 0o666  # open()'s mode before the umask: as shareable as a plain torch.save

# Fields that define the network and the process it was trained on: resuming with any of them
# changed would load weights into a different model or train toward a different target.
MODEL_FIELDS = (
    "in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_resolutions",
    "channel_mult", "num_heads", "use_spatial_transformer", "transformer_depth", "context_dim",
    "sample_size", "use_scale_shift_norm", "pooled_text_conditioning", "text_pooling",
    "text_encoder_layers", "text_encoder_width", "max_text_length", "tokenizer",
    "text_vocab_size", "num_train_timesteps",
    "beta_start", "beta_end", "beta_schedule", "prediction_type", "rescale_betas_zero_snr",
    "norm_groups", "stage", "latent_channels", "ae_channels", "ae_channel_mult",
    "ae_num_res_blocks", "ae_attention", "ae_norm_groups", "ae_disc_channels",
    "ae_disc_layers",
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


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


def atomic_save(obj: dict, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes the file private (0600); keep open()'s mode
            os.fchmod(fd, NEW_FILE_MODE & ~_umask())
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
        _check_records(path)
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, or a pickle that wants to run code
        raise CheckpointError(f"cannot load checkpoint {str(path)!r}: it is truncated, corrupt "
                              f"or not a plain-tensor checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION \
            or "config" not in state:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint of this codebase (format "
                              f"version {FORMAT_VERSION} with a config)")
    config = config_from_checkpoint(state, path)
    text_state = state.get("text_encoder")
    if text_state and EXTRA_STATE_KEY not in text_state:  # written before tokenizers were saved
        text_state[EXTRA_STATE_KEY] = {"tokenizer": ByteTokenizer(
            config.max_text_length).state_dict()}
    return state


def _check_records(path: Path) -> None:
    """Raise zipfile.BadZipFile unless every record of the file (a zip archive, as torch.save
    writes it) matches its CRC-32: torch.load does not check them, so flipped bytes inside a
    tensor would load as silently wrong weights."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"record {bad!r} fails its CRC-32 check")


def config_from_checkpoint(state: dict, path: str | Path | None = None) -> DiffusionConfig:
    """The config a checkpoint was trained with. A stored config this code refuses (a field
    since renamed, a value now out of range) is the checkpoint's fault, not the user's config's:
    a CheckpointError naming the checkpoint `path` (load_checkpoint_file checks it on load)."""
    try:
        return DiffusionConfig.from_dict(state["config"])
    except (ValueError, TypeError) as err:
        where = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
        raise CheckpointError(f"{where} holds a config this code cannot use: {err}") from err


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


def _separate_last(run_dir: Path, found: list[tuple[int, Path]]) -> Path | None:
    """last.pt when it is not a second name of one of the step files `found`: a run copied
    without hard links, a filesystem without them, or a folder holding only last.pt."""
    last = run_dir / LAST_NAME
    if not last.is_file() or any(os.path.samefile(last, p) for _, p in found):
        return None
    return last


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Delete temp files that a kill mid-save left behind (each is a whole checkpoint's size).
    Safe because one folder holds one run, saved by its main process alone."""
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        if folder.is_dir():
            for p in folder.iterdir():
                if _TEMP_FILE.match(p.name):
                    p.unlink(missing_ok=True)


def save_run_checkpoint(state: dict, run_dir: str | Path, step: int,
                        keep_last: int) -> Path:
    """Write checkpoints/step_XXXXXXXX.pt atomically, point last.pt at it, prune old ones and
    any temp files a killed save left. Call it from the main process only."""
    run_dir = Path(run_dir)
    _remove_stale_temp_files(run_dir)
    state = {"format_version": FORMAT_VERSION, **state}
    path = atomic_save(state, run_dir / CHECKPOINT_DIR / f"step_{step:08d}.pt")
    last = run_dir / LAST_NAME
    tmp = run_dir / f".{LAST_NAME}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)  # a second name for the same file: no extra disk
    except OSError:  # a filesystem without hard links: a copy
        atomic_save(state, last)
    else:
        os.replace(tmp, last)
    # Only files older than this step are pruned, so the one just written always survives
    # (train.py also refuses to mix two runs in one folder: check_no_newer_run).
    older = [p for s, p in step_checkpoints(run_dir) if s < step]
    for old in older[:max(len(older) - (keep_last - 1), 0)]:
        old.unlink(missing_ok=True)
    return path


def check_no_newer_run(run_dir: str | Path, step: int) -> None:
    """Raise ValueError if run_dir holds checkpoints past `step`: training from `step` in that
    folder would interleave two runs' checkpoints and rotation would delete one of them. A
    separate last.pt counts with its step, and as newer when it does not load."""
    run_dir = Path(run_dir)
    found = step_checkpoints(run_dir)
    newest = found[-1][0] if found else None
    last = _separate_last(run_dir, found)
    if last is not None:
        try:
            last_step = int(load_checkpoint_file(last).get("step", 0))
        except CheckpointError as err:
            raise ValueError(f"output_dir {str(run_dir)!r} holds a {LAST_NAME} that does not "
                             f"load, so it may be another run's newest checkpoint ({err}); move "
                             "it away or set output_dir to a new folder (--set output_dir=...)"
                             ) from err
        newest = last_step if newest is None else max(newest, last_step)
    if newest is not None and newest > step:
        raise ValueError(
            f"output_dir {str(run_dir)!r} already holds checkpoints up to step {newest}, "
            f"past this run's step {step}; pass --resume auto to continue that run, or set "
            "output_dir to a new folder (--set output_dir=...)")


def _load_or_warn(path: Path) -> dict | None:
    try:
        return load_checkpoint_file(path)
    except CheckpointError as err:
        warnings.warn(f"skipping unusable checkpoint: {err}", stacklevel=3)
        return None


def find_resumable(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of a run that loads, with its state: the newest step file that
    loads, or a separate last.pt (see _separate_last) holding a later step. Corrupt, truncated
    or foreign files are reported with a warning and skipped.

    None for a folder with no checkpoint files. A folder whose files all fail to load is a
    CheckpointError, not None: starting from scratch there would overwrite them."""
    run_dir = Path(run_dir)
    found = step_checkpoints(run_dir)
    loaded = []
    for _, path in reversed(found):
        if (state := _load_or_warn(path)) is not None:
            loaded.append((path, state))
            break
    last = _separate_last(run_dir, found)
    if last is not None and (state := _load_or_warn(last)) is not None:
        loaded.append((last, state))
    if loaded:  # on a tie the step file, the name that says its step
        return max(loaded, key=lambda item: item[1].get("step", 0))
    if found or last is not None:
        count = len(found) + (last is not None)
        raise CheckpointError(
            f"none of the {count} checkpoint file(s) in {str(run_dir)!r} loads (see the "
            "warnings above), and starting from scratch would overwrite them; move them away, "
            "pass --resume PATH, or set output_dir to a new folder (--set output_dir=...)")
    return None
