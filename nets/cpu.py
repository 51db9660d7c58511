"""Opt-in speed on the CPU, kept out of the networks (which are plain torch.nn layers):

- `prepacked_for_cpu_inference(*modules)`: for the duration of a `with` block, the
  nn.Conv2d / nn.Linear layers inside `modules` run CPU inference through oneDNN with their
  weights laid out once, and the outer modules run their convolutions in channels_last.
  The pipeline wraps its sampling loop in it. Same numbers as the plain layers to float
  rounding (~1e-6 relative); on a 2-core AMD EPYC (AVX2) a UNet call is 12-18% faster at the
  guide's default configuration and ~5% at the small one (docs/benchmarks-cpu.md,
  `inference_ms` against `inference_unpacked_ms`).
- `keep_freed_memory()`: a malloc setting that stops glibc from handing big buffers back to
  the kernel between training steps.
- `cpu_has_fast_low_precision(dtype)`: whether bf16 / fp16 run natively on this CPU.

This is the one module of `nets` that calls PyTorch's private oneDNN operators
(torch.ops.mkldnn, torch._C._nn); nothing else depends on them.
"""

import copyreg
import ctypes
import ctypes.util
import functools
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
    default configuration's training step took 6.2-8.2 s without this and 5.6 s with it on a
    2-core AMD EPYC (AVX2; docs/benchmarks-cpu.md). Raising
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


def cpu_has_fast_low_precision(dtype: torch.dtype) -> bool:
    """Whether this CPU runs `dtype` (bf16/fp16) convolutions and matmuls natively (oneDNN with
    AVX512-BF16/AMX or AVX512-FP16). Without it they are emulated: on an AVX2-only CPU (a
    2-core AMD EPYC) a bf16 3x3 conv is ~4-80x and a bf16 matmul ~100x slower than fp32; on
    AVX-512/AMX Xeons bf16 autocast is 1.6-2.1x faster than fp32 (docs/benchmarks-cpu.md).
    The UNet reads it for `UNet.fp32_when_cpu_autocast_is_slow`."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if x is laid out (B, H, W, C) in memory, else contiguous_format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not (
            x.is_contiguous()):
        return torch.channels_last
    return torch.contiguous_format


# ---- oneDNN inference with weights laid out once ----

_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)  # not subclasses (fake, sharded, ...)
_ONEDNN_OPS = ("_convolution_pointwise", "_linear_pointwise", "_reorder_linear_weight")


@functools.cache
def _onednn_built() -> bool:
    return torch.backends.mkldnn.is_available() and all(
        hasattr(torch.ops.mkldnn, op) for op in _ONEDNN_OPS)


def runs_prepacked(x: torch.Tensor) -> bool:
    """Whether, inside `prepacked_for_cpu_inference`, a call on input `x` takes the oneDNN path:
    no autograd (torch.no_grad / inference_mode), a plain fp32 CPU tensor, no CPU autocast,
    not being traced by torch.compile (inductor lays weights out itself), oneDNN enabled.
    Everything else runs the plain layers."""
    return _fp32_cpu_inference(x) and not torch.is_autocast_enabled("cpu")


def _fp32_cpu_inference(x: torch.Tensor) -> bool:
    """runs_prepacked(x) but for the autocast condition."""
    return (not torch.is_grad_enabled()
            and type(x) in _PLAIN_TENSOR_TYPES and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and torch.backends.mkldnn.enabled and _onednn_built())


def _runs_channels_last(x: torch.Tensor) -> bool:
    """Whether an outer module runs on `x` in channels_last: where its layers take the oneDNN
    path, also under CPU autocast to a dtype this CPU only emulates, where the UNet computes
    in fp32 (UNet.fp32_when_cpu_autocast_is_slow) and so its layers do take it."""
    return _fp32_cpu_inference(x) and (
        not torch.is_autocast_enabled("cpu")
        or not cpu_has_fast_low_precision(torch.get_autocast_dtype("cpu")))


class _PrepackedLayer:
    """Mixin of the classes a layer takes inside `prepacked_for_cpu_inference` (see there).

    `_packed` holds (weight, its storage, (data pointer, strides, version), laid-out copy); the
    storage is held so that its address cannot be handed to a new weight while kept.
    """

    _plain_class: type  # nn.Conv2d / nn.Linear, restored on leaving the block
    _packed = None

    def _weight_fits(self, x) -> bool:
        w, b = self.weight, self.bias
        return (runs_prepacked(x) and type(w) in _PLAIN_TENSOR_TYPES
                and w.dtype == torch.float32 and w.device.type == "cpu"
                and (b is None or (type(b) in _PLAIN_TENSOR_TYPES and b.dtype == torch.float32)))

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight laid out for oneDNN, laid out again when it changed (see the block)."""
        w = self.weight
        key = (w.data_ptr(), w.stride(), w._version)
        if self._packed is not None:
            packed_from, _storage, packed_key, packed = self._packed
            if packed_from is w and packed_key == key:
                return packed
            self._packed = None  # free the stale copy before making the new one
        packed = self._pack(w, x)  # under no_grad: nothing to detach
        self._packed = (w, w.untyped_storage(), key, packed)
        return packed

    def _get_name(self) -> str:  # repr() shows Conv2d / Linear
        return self._plain_class.__name__

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_packed", None)  # oneDNN tensors cannot be pickled or deep-copied
        return state

    def __reduce_ex__(self, protocol):  # pickles and copies made inside the block are plain
        return _reduce_as_plain(self)


class _PrepackedConv2d(_PrepackedLayer, nn.Conv2d):
    """nn.Conv2d with its weight laid out once for oneDNN.

    In eager mode PyTorch hands oneDNN the weight in (out, in, kh, kw) order and oneDNN
    re-lays it out into its blocked format on every call. For wide layers on small feature
    maps (the guide's default UNet has 1024 channels at 8x8) that reorder costs more than the
    convolution itself: a 1280-channel 3x3 conv on 2x1280x8x8 ran at ~80 GFLOP/s eager and
    ~180 with the weight prepacked on a 2-core AMD EPYC (AVX2).
    x: (B, in_channels, H, W) in any memory format -> (B, out_channels, H', W') in x's.
    """

    _plain_class = nn.Conv2d

    def _pack(self, weight, x):
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
            self.groups, list(x.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or self.padding_mode != "zeros" or isinstance(self.padding, str)
                or not self._weight_fits(x)):
            return super().forward(x)
        out = torch.ops.mkldnn._convolution_pointwise(
            x, self._packed_weight(x), self.bias, list(self.padding), list(self.stride),
            list(self.dilation), self.groups, "none", [], "")
        # the format F.conv2d would return (oneDNN picks its own)
        return out.contiguous(memory_format=memory_format_of(x))


class _PrepackedLinear(_PrepackedLayer, nn.Linear):
    """nn.Linear run through oneDNN with its weight packed once.

    With few rows (the UNet's 8x8 and 16x16 levels give 128-512 tokens) MKL's sgemm, which
    eager mode calls, re-packs the weight on every call and reached 104-119 GFLOP/s on the
    UNet's shapes on a 2-core AMD EPYC (AVX2), where oneDNN with the weight packed once
    reached 156-164. x: (..., in_features) -> (..., out_features).
    """

    _plain_class = nn.Linear

    def _pack(self, weight, x):
        return torch.ops.mkldnn._reorder_linear_weight(weight, x.numel() // x.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.numel() == 0 or not self._weight_fits(x):
            return super().forward(x)
        # contiguous: oneDNN's kernel (and so the rounding) would otherwise depend on x's
        # strides, and e.g. sliced attention must give the same numbers as unsliced
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed_weight(x),
                                                  self.bias, "none", [], "")


# exactly these classes: a subclass may compute something else in its forward
_PREPACKED_CLASSES = {nn.Conv2d: _PrepackedConv2d, nn.Linear: _PrepackedLinear}


class _ChannelsLastInference:
    """Mixin of the class an outer module takes inside `prepacked_for_cpu_inference`: when the
    first positional argument is a 4-D tensor on which the layers take the oneDNN path
    (_runs_channels_last), the module runs on it in channels_last (oneDNN then reads and
    writes the activations without converting them around every convolution), and 4-D
    tensors in its output (a tensor, or one level of a dict, list or tuple) are returned in
    the argument's memory format."""

    _plain_class: type

    def forward(self, *args, **kwargs):
        x = args[0] if args else None
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and _runs_channels_last(x)):
            return super().forward(*args, **kwargs)
        memory_format = memory_format_of(x)
        args = (x.contiguous(memory_format=torch.channels_last),) + args[1:]
        return _in_memory_format(super().forward(*args, **kwargs), memory_format)

    def _get_name(self) -> str:
        return self._plain_class.__name__

    def __reduce_ex__(self, protocol):  # pickles and copies made inside the block are plain
        return _reduce_as_plain(self)


_channels_last_classes: dict[type, type] = {}  # outer module class -> its subclass


def _channels_last_class(cls: type) -> type:
    if cls not in _channels_last_classes:
        _channels_last_classes[cls] = type(f"ChannelsLast{cls.__name__}",
                                           (_ChannelsLastInference, cls),
                                           {"_plain_class": cls, "__module__": __name__})
    return _channels_last_classes[cls]


def _in_memory_format(out, memory_format):
    def convert(value):
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return value.contiguous(memory_format=memory_format)
        return value

    if type(out) is dict:
        return {key: convert(value) for key, value in out.items()}
    if type(out) in (list, tuple):
        return type(out)(convert(value) for value in out)
    return convert(out)


def _reduce_as_plain(module: nn.Module):
    """__reduce_ex__ for a module inside the block: rebuilt as its plain class, with its state
    (copyreg's constructor for objects, which pickle and copy know; the default one insists on
    the object's own class)."""
    return copyreg._reconstructor, (module._plain_class, object, None), module.__getstate__()


@contextmanager
def prepacked_for_cpu_inference(*modules: nn.Module):
    """While the block is open, the nn.Conv2d and nn.Linear layers inside `modules` run CPU
    inference through oneDNN with their weights laid out once, and each of `modules` that
    holds a convolution runs it in channels_last. On leaving (an exception included) every
    module gets its own class back and the laid-out copies are dropped.

        with torch.no_grad(), prepacked_for_cpu_inference(pipeline.unet):
            for t in timesteps: ...  # every step reuses the laid-out weights

    For loops that run the same weights many times: AdvancedDiffusionPipeline.generate wraps
    its sampling loop in it (and so sample.py and sampling.evaluate use it).

    - What changes: the layers (exactly nn.Conv2d / nn.Linear; subclasses are left alone) and
      the outer modules get a subclass with the fast path for the block (their repr, state
      dict, parameters and hooks are unchanged); copies and pickles made inside the block are
      of the plain classes. Leaving restores the classes, so afterwards nothing is left.
    - When: each call checks `runs_prepacked(x)`: no autograd, a fp32 CPU input and fp32
      weights, no CPU autocast, not inside torch.compile, oneDNN enabled. Anything else
      (training, gradients, bf16, CUDA) runs the plain layer, so the block is safe to leave
      open around code that also trains. The outer modules switch to channels_last under
      the same conditions, and under CPU autocast to a dtype this CPU only emulates too, where
      the UNet computes in fp32 (UNet.fp32_when_cpu_autocast_is_slow) with the fast layers.
    - Outputs: the same numbers as the plain layers to float rounding; a module's 4-D outputs
      come back in its input's memory format.
    - Weights that change: a layer lays its weight out again whenever the weight changed
      through its Parameter (any in-place op, which is how load_state_dict, the EMA and
      optimizers update it), was replaced (a new Parameter, `.data = ...`, `.to()`), or any
      torch.optim optimizer stepped while the block was open (fused optimizers write without
      marking the Parameter changed). Not seen: writes that bypass the Parameter, through
      `p.data` or another view of its storage; inside the block write through the Parameter
      (`with torch.no_grad(): p.copy_(...)`).
    - Nesting: an inner block on the same modules leaves the outer block's state alone.
    - Cost: each laid-out copy takes the memory of its weight again while kept.
    """
    layers, outers = [], []  # (module, its class before the block)
    hook = None
    try:
        for module in modules:
            for layer in module.modules():
                prepacked_class = _PREPACKED_CLASSES.get(type(layer))
                if prepacked_class is not None:  # not already inside an open block
                    layers.append((layer, type(layer)))
                    layer.__class__ = prepacked_class
            if (not isinstance(module, (_PrepackedLayer, _ChannelsLastInference))
                    and any(isinstance(m, nn.Conv2d) for m in module.modules())
                    and not any(_compiled(m) for m in module.modules())):
                outers.append((module, type(module)))
                module.__class__ = _channels_last_class(type(module))

        def drop_packed_weights(*_):
            for layer, _cls in layers:
                layer._packed = None

        hook = register_optimizer_step_post_hook(drop_packed_weights)
        yield
    finally:
        if hook is not None:
            hook.remove()
        for layer, cls in layers:
            layer.__dict__.pop("_packed", None)
            layer.__class__ = cls
        for module, cls in outers:
            module.__class__ = cls


def _compiled(module: nn.Module) -> bool:
    """Whether `module` was compiled in place (nn.Module.compile) or is torch.compile's wrapper:
    its graphs lay weights out themselves, and a channels_last input would only recompile."""
    return getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod")
