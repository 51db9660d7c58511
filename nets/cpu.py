"""Running the networks fast on the CPU: convolution and linear weights laid out once for
inference (Conv2d, Linear, inside `reuse_packed_weights()`), and a malloc setting that stops
the allocator from handing big buffers back to the kernel (keep_freed_memory).

None of it changes what is computed (the prepacked layers agree with F.conv2d / F.linear to
float rounding, ~1e-6 relative); it is about where the time goes on a CPU.
"""

import ctypes
import ctypes.util
import weakref
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# glibc mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BELOW_BYTES = 2 ** 30  # allocations up to 1 GiB come from the heap and are reused
NEVER_TRIM_BYTES = 2 ** 31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    By default glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on
    free, so a training step that allocates and frees the same gradients and activations
    page-faults them all in again (zero-filled by the kernel) on every step. The guide's
    default configuration's training step took 6.2-8.2 s without this and 5.6 s with it on
    the 2-core benchmark machine (README, "Speed on the CPU"). Raising
    the mmap threshold to 1 GiB and never trimming the heap makes freed blocks reusable. The
    price: the process keeps its peak memory until it exits. Process-wide, so the scripts call
    it (train.py, sample.py, sampling.evaluate, the benchmark), not the library on import.

    Returns True if applied, False where the C library is not glibc (nothing is changed).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BELOW_BYTES)
                and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM_BYTES))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if x is laid out (B, H, W, C) in memory, else contiguous_format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not (
            x.is_contiguous()):
        return torch.channels_last
    return torch.contiguous_format


_reuse_depth = 0  # how many reuse_packed_weights() blocks are open (process-wide)
_packed_layers = weakref.WeakSet()  # layers holding a laid-out copy, dropped on leaving
_optimizer_hook = None  # drops every copy after any optimizer step while a block is open


def _drop_packed_copies(*_) -> None:
    for layer in list(_packed_layers):
        layer._packed = None
    _packed_layers.clear()


@contextmanager
def reuse_packed_weights():
    """Inside the block, CPU inference lays out each Conv2d / Linear weight for oneDNN once and
    reuses it on every later call; leaving the outermost block drops the copies.

    For loops that run the same weights many times: `sampling.sample` wraps its sampling loop
    in it, so the pipeline, sample.py and sampling.evaluate use it. Outside a block the layers
    are plain nn.Conv2d / nn.Linear. The copies are remade when a weight changes in a way its
    tensor records (an in-place op on the Parameter, load_state_dict, a new tensor) and after
    every torch.optim optimizer step (fused optimizers such as AdamW(fused=True), which the
    trainer uses on the CPU, write the weights without bumping their version counters). An
    edit through `.data` (`p.data.copy_(...)`) or through another tensor sharing the storage
    bumps no version counter and is not seen: inside the block, change weights in place on
    the Parameter (under torch.no_grad), as the EMA does.
    """
    global _reuse_depth, _optimizer_hook
    if _reuse_depth == 0:
        _optimizer_hook = register_optimizer_step_post_hook(_drop_packed_copies)
    _reuse_depth += 1
    try:
        yield
    finally:
        _reuse_depth -= 1
        if _reuse_depth == 0:
            _optimizer_hook.remove()
            _drop_packed_copies()


def _mkldnn_available(op_name: str) -> bool:
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, op_name))


class PrepackedWeight:
    """Mixin for nn.Conv2d / nn.Linear: inside `reuse_packed_weights()`, on the CPU, without
    autograd, run the layer through oneDNN with its weight laid out once (`_pack`) instead of
    on every call.

    The laid-out copy is kept in `_packed` until the weight changes: an in-place update on the
    Parameter (EMA, load_state_dict, a non-fused optimizer) bumps its version counter, a new
    weight tensor has a new identity or storage, and any optimizer step drops every copy;
    any of these repacks (see
    reuse_packed_weights for the edits that are not seen). Leaving the block, `train()` and
    `eval()` drop the copy, and pickling / deepcopy leave it out (oneDNN tensors cannot be
    copied). The copy costs the memory of the weight again while it is kept.
    The fast path needs: an open reuse_packed_weights() block, no gradient (torch.no_grad /
    inference_mode), CPU, fp32 input and weight, no autocast, not inside torch.compile,
    oneDNN enabled, and the class attribute `prepack_for_inference` (True; set it to False on
    the class to turn the path off). Everything else is the parent's forward, unchanged.
    """

    prepack_for_inference = True
    _op_name = ""  # the oneDNN op the subclass calls
    # per instance once set: (weight, its storage, data pointer, version, laid-out copy). The
    # storage is held so that its address cannot be handed to a new weight while this is kept.
    _packed = None

    def uses_packed_weight(self, x: torch.Tensor) -> bool:
        """Whether forward(x) takes the oneDNN path (the conditions above)."""
        return (self.prepack_for_inference and _reuse_depth > 0
                and not torch.compiler.is_compiling()  # inductor lays out weights itself
                and not torch.is_grad_enabled()
                and x.device.type == "cpu" and x.dtype == torch.float32
                and type(self.weight) in (torch.Tensor, nn.Parameter)
                and self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")
                and _mkldnn_available(self._op_name))

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight laid out for oneDNN (for inputs like x), made only when it changed."""
        w = self.weight
        if self._packed is not None:
            packed_from, storage, pointer, version, packed = self._packed
            if (packed_from is w and w.untyped_storage().data_ptr() == storage.data_ptr()
                    and pointer == w.data_ptr() and version == w._version):
                return packed
            self._packed = None  # free the stale copy before making the new one
        packed = self._pack(w, x)  # runs under no_grad: nothing to detach
        self._packed = (w, w.untyped_storage(), w.data_ptr(), w._version, packed)
        _packed_layers.add(self)
        return packed

    def train(self, mode: bool = True):
        self._packed = None
        return super().train(mode)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_packed"] = None  # oneDNN tensors cannot be pickled or deep-copied
        return state


class Conv2d(PrepackedWeight, nn.Conv2d):
    """nn.Conv2d whose CPU inference reuses a weight laid out once for oneDNN (see
    PrepackedWeight for when, and how changes to the weight are noticed).

    In eager mode PyTorch hands oneDNN the weight in (out, in, kh, kw) order and oneDNN
    re-lays it out into its blocked format on every call. For wide layers on small feature
    maps (the guide's default UNet has 1024 channels at 8x8) that reorder costs more than the
    convolution itself: a 1280-channel 3x3 conv on 2x1280x8x8 ran at ~80 GFLOP/s eager and
    ~180 with the weight prepacked on the benchmark machine.
    x: (B, in_channels, H, W) in any memory format -> (B, out_channels, H', W') in x's;
    channels_last input saves oneDNN converting the activations (UNet uses it).
    """

    _op_name = "_convolution_pointwise"

    def _pack(self, weight, x):
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
            self.groups, list(x.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or not self.uses_packed_weight(x)):
            return super().forward(x)
        out = torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight(x), self.bias, list(self.padding), list(self.stride),
            list(self.dilation), self.groups, "none", [], "")
        # the format F.conv2d would return (oneDNN picks its own)
        return out.contiguous(memory_format=memory_format_of(x))


class Linear(PrepackedWeight, nn.Linear):
    """nn.Linear whose CPU inference runs through oneDNN with a prepacked weight (see
    PrepackedWeight for when, and how changes to the weight are noticed).

    With few rows (the UNet's 8x8 and 16x16 levels give 128-512 tokens) MKL's sgemm, which
    eager mode calls, re-packs the weight on every call and reached 104-119 GFLOP/s on the
    benchmark machine's shapes where oneDNN with the weight packed once reached 156-164.
    x: (..., in_features) -> (..., out_features).
    """

    _op_name = "_linear_pointwise"

    def _pack(self, weight, x):
        return torch.ops.mkldnn._reorder_linear_weight(weight, x.numel() // x.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.numel() == 0 or not self.uses_packed_weight(x):
            return super().forward(x)
        # contiguous: oneDNN's kernel (and so the rounding) would otherwise depend on x's
        # strides, and e.g. sliced attention must give the same numbers as unsliced
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight(x),
                                                  self.bias, "none", [], "")
