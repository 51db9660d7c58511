"""What the command-line scripts (sample.py, `python -m sampling.evaluate`, train.py) share:
the --device argument, output paths checked and made before any sampling, image arguments, and
errors ending the script as one line instead of a traceback.

The pipeline never imports this module: it raises TypeError / ValueError and the scripts turn
those into `prog: message` with `exit_on_error`.
"""

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from .images import open_image
from .pipeline import parse_device

FROM_CONFIG = "default: the checkpoint config's value"  # the scripts' --help for such options

__all__ = ["FROM_CONFIG", "add_device_argument", "check_output_path", "exit_on_error",
           "make_folder", "open_image", "positive_int"]


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The scripts' `--device`: cuda when this machine has a GPU, else cpu."""
    def device_type(name):
        try:
            return parse_device(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parser.add_argument("--device", type=device_type,
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to sample (default: cuda when available, else cpu)")


@contextmanager
def exit_on_error(prog: str, errors=ValueError, what: str = ""):
    """Inside the block, an exception of `errors` (a class or a tuple) ends the script with the
    one line `prog: what: message` (sys.exit: exit status 1, no traceback). For what the user
    got wrong (arguments, checkpoints: CheckpointError is a ValueError) and for what the
    machine refused (OSError: a full disk)."""
    try:
        yield
    except errors as err:
        sys.exit(f"{prog}: {what}: {err}" if what else f"{prog}: {err}")


def check_output_path(path: str | Path, name: str, *, folder: bool = False) -> Path:
    """A script's output, checked before any sampling: `path` must be a file (or, with folder,
    a folder) that is new or of that kind, under folders that exist or can be made and whose
    nearest existing one is writable. ValueError naming `name` and the path otherwise.
    Nothing is created (see `make_folder`)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is an existing file, not a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is an existing folder, not a file")
    parent = path if folder else path.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{name} {str(path)!r} is under {str(existing)!r}, which is a file, "
                         f"not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {str(path)!r}: the folder {str(existing)!r} is not writable")
    return path


def make_folder(folder: Path, name: str) -> None:
    """mkdir -p `folder` for the output `name`; ValueError saying why it cannot be made."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{name}: cannot create the folder {str(folder)!r} "
                         f"({err.strerror or err})") from None


def positive_int(text: str) -> int:
    """argparse type for the scripts' counts (--num-images, --seeds, --num-samples, ...): an
    int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer (>= 1)")
    return value
