"""Where and how a training step runs: the process (rank and world size under
torch.distributed), the autocast precision, and deterministic kernels."""

import os

import torch
import torch.distributed as dist


def autocast_dtype(mixed_precision, device: torch.device) -> torch.dtype | None:
    """None (full precision), torch.bfloat16 or torch.float16 for config.mixed_precision:
    True means bf16 on the CPU and fp16 on CUDA."""
    if mixed_precision in (False, "no"):
        return None
    if mixed_precision is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def use_deterministic_algorithms() -> None:
    """Deterministic kernels from here on, process-wide (config.deterministic).

    Some CUDA kernels sum in whatever order their threads arrive (PyTorch's reproducibility
    notes name cuDNN's convolution algorithms among others), so two identical runs differ in
    the last bits, and the difference grows with training.
    torch.use_deterministic_algorithms picks ordered kernels instead; cuBLAS needs a fixed
    workspace for it (CUBLAS_WORKSPACE_CONFIG, read when CUDA first multiplies: set it in the
    environment to be sure), and cuDNN's benchmark mode, which picks algorithms by timing
    them, stays off. warn_only: an op without a deterministic kernel warns rather than
    stopping the run.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
