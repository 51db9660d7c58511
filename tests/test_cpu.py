"""Tests of nets/cpu.py: inside prepacked_for_cpu_inference(...) the plain nn.Conv2d / nn.Linear
layers compute what F.conv2d / F.linear compute, through oneDNN with their weights laid out
once, only for fp32 CPU inference; every way a weight can change through its Parameter is
seen; leaving the block (an exception included) restores the modules; the UNet runs
channels_last inside and returns its input's memory format; the pipeline applies it;
keep_freed_memory really stops large blocks from being page-faulted in again."""

import copy
import io
import pickle
import platform
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.optim.optimizer as optimizer_module
from helpers import randomize, tiny_config
from torch import nn

from diffusion import DiffusionConfig
from nets import AdvancedUNet, TextEncoder, cpu_has_fast_low_precision, prepacked_for_cpu_inference

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                 reason="the prepacked path needs oneDNN (mkldnn)"),
              pytest.mark.usefixtures("one_thread")]  # tiny layers gain nothing from 2 threads


def reference(layer, x):
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight, layer.bias)
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                    layer.groups)


# (layer, an input for it)
LAYERS = {
    "conv": lambda: (nn.Conv2d(4, 4, 3, padding=1), torch.randn(1, 4, 8, 8)),
    "linear": lambda: (nn.Linear(6, 6), torch.randn(2, 3, 6)),
}


@contextmanager
def onednn_disabled():
    """torch.backends.mkldnn.enabled = False for the block (its `flags` warns about TF32)."""
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def packed(layer) -> bool:
    """Whether `layer` holds a weight laid out for oneDNN (made only on the fast path)."""
    return layer.__dict__.get("_packed") is not None


def plain(module) -> bool:
    """Whether nothing inside `module` is left changed by a block: classes and attributes."""
    return all(type(m).__module__ != "nets.cpu" and "_packed" not in m.__dict__
               for m in module.modules())


@pytest.mark.parametrize("kernel,stride,padding,bias", [
    (3, 1, 1, True), (3, 2, 1, True), (1, 1, 0, True), (3, 1, 0, False), (5, 2, 2, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_convolution_matches_conv2d(kernel, stride, padding, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, kernel, stride=stride, padding=padding, bias=bias)
    if bias:
        nn.init.normal_(conv.bias)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad(), prepacked_for_cpu_inference(conv):
        # packed for the first shape, then used with another batch and spatial size
        for shape in [(2, 6, 12, 16), (3, 6, 9, 7)]:
            x = torch.randn(shape).contiguous(memory_format=fmt)
            out = conv(x)
            assert packed(conv)  # the fast path ran
            expected = reference(conv, x)
            assert out.shape == expected.shape
            assert rel_err(out, expected) < 1e-5
            assert out.is_contiguous(memory_format=fmt)  # the format F.conv2d returns


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 6), (2, 5, 6), (2, 3, 4, 6)])
def test_packed_linear_matches_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(6, 9, bias=bias)
    if bias:
        nn.init.normal_(layer.bias)
    with torch.no_grad(), prepacked_for_cpu_inference(layer):
        # packed for one number of rows, then used with another and with a non-contiguous input
        for x in [torch.randn(shape), torch.randn(11, 6), torch.randn(6, 4, 5).transpose(0, 2)]:
            out = layer(x)
            assert packed(layer)  # the fast path ran
            assert rel_err(out, reference(layer, x)) < 1e-5


@pytest.mark.parametrize("kind", LAYERS)
def test_leaving_the_block_restores_the_layer(kind):
    layer, x = LAYERS[kind]()
    plain_class = type(layer)
    with torch.no_grad():
        with prepacked_for_cpu_inference(layer):
            assert type(layer) is not plain_class and isinstance(layer, plain_class)
            assert repr(layer) == repr(LAYERS[kind]()[0])  # repr unchanged
            layer(x)
            assert packed(layer)
        assert type(layer) is plain_class and plain(layer)
        with pytest.raises(RuntimeError, match="inside"):
            with prepacked_for_cpu_inference(layer):
                layer(x)
                assert packed(layer)
                raise RuntimeError("inside")
        assert type(layer) is plain_class and plain(layer)
    assert not optimizer_module._global_optimizer_post_hooks  # the block's hook is gone


@pytest.mark.parametrize("kind", LAYERS)
def test_nested_blocks_leave_the_outer_ones_state(kind):
    """An inner block on the same (or an enclosing) module changes nothing the outer block
    set up, and its exit leaves the outer block's laid-out weights and classes in place."""
    layer, x = LAYERS[kind]()
    outer = nn.Sequential(layer)
    with torch.no_grad(), prepacked_for_cpu_inference(layer):
        layer(x)
        packed_class, laid_out = type(layer), layer._packed[-1]
        with prepacked_for_cpu_inference(outer, layer):
            layer(x)
            assert layer._packed[-1] is laid_out  # not laid out again
        assert type(layer) is packed_class and layer._packed[-1] is laid_out
        layer(x)
        assert layer._packed[-1] is laid_out
    assert plain(outer)


@pytest.mark.parametrize("kind", LAYERS)
def test_weight_changes_are_laid_out_again(kind):
    torch.manual_seed(0)
    layer, x = LAYERS[kind]()
    shape = layer.weight.shape

    def check():
        with torch.no_grad():
            assert rel_err(layer(x), reference(layer, x)) < 1e-5
        assert packed(layer)

    with prepacked_for_cpu_inference(layer):
        check()
        with torch.no_grad():
            layer.weight.mul_(-2.0)  # in place on the Parameter: its version counter moves
        check()
        layer.load_state_dict({"weight": torch.randn(shape), "bias": torch.randn(shape[0])})
        check()
        layer.weight = nn.Parameter(torch.randn(shape))  # a new tensor
        check()
        layer.weight.data = torch.randn(shape)  # same Parameter, new storage
        check()
        for _ in range(20):  # the old storage is held, so a new one can never reuse its address
            layer.weight.data = torch.randn(shape)
            layer.weight.data = torch.randn(shape)
            check()
        layer.double().float()  # .to() replaces the weights' data
        check()
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
        layer(x).square().sum().backward()
        optimizer.step()
        check()
        # fused optimizers (the trainer's AdamW on the CPU) bump no version counter: the laid
        # out weights are dropped after every optimizer step instead
        for fused in (torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True),
                      torch.optim.SGD(layer.parameters(), lr=0.5, fused=True)):
            version = layer.weight._version
            layer(x).square().sum().backward()
            fused.step()
            assert layer.weight._version == version  # why the version check cannot see it
            check()


@pytest.mark.parametrize("kind", LAYERS)
def test_new_parameter_on_the_same_storage_and_moved_views_are_laid_out_again(kind):
    """Identity, data pointer and strides each catch a change the other checks miss."""
    torch.manual_seed(0)
    layer, x = LAYERS[kind]()
    with torch.no_grad(), prepacked_for_cpu_inference(layer):
        layer(x)
        packed_version = layer.weight._version
        new = nn.Parameter(layer.weight.data)  # same storage, a version counter of its own
        layer.weight = new
        new.mul_(-2.0)
        while new._version < packed_version:  # same storage, pointer, version: only identity
            new.mul_(1.0)
        assert new._version == packed_version
        assert rel_err(layer(x), reference(layer, x)) < 1e-5
        n = layer.weight.numel()
        flat = torch.randn(2 * n)  # two weights as views of one buffer: same storage
        layer.weight.data = flat[:n].view(layer.weight.shape)
        assert rel_err(layer(x), reference(layer, x)) < 1e-5
        layer.weight.data = flat[n:].view(layer.weight.shape)  # only the pointer moves
        assert rel_err(layer(x), reference(layer, x)) < 1e-5
        w = layer.weight.data
        layer.weight.data = w.transpose(0, 1)  # only the strides move (square weights)
        assert layer.weight.data_ptr() == w.data_ptr()
        assert rel_err(layer(x), reference(layer, x)) < 1e-5


@pytest.mark.parametrize("kind", LAYERS)
def test_edits_outside_the_block_are_seen(kind):
    """Outside the block the layer is the plain one, so every way of editing a weight (`.data`
    included, which no version counter records) is seen by the next block."""
    torch.manual_seed(0)
    layer, x = LAYERS[kind]()
    with torch.no_grad():
        with prepacked_for_cpu_inference(layer):
            layer(x)
        layer.weight.data.mul_(-3.0)
        with prepacked_for_cpu_inference(layer):
            assert rel_err(layer(x), reference(layer, x)) < 1e-5


@pytest.mark.parametrize("kind", LAYERS)
def test_autograd_uses_the_plain_layer(kind):
    torch.manual_seed(0)
    layer, x = LAYERS[kind]()
    x.requires_grad_(True)
    expected = layer(x)
    with prepacked_for_cpu_inference(layer):
        out = layer(x)
        assert not packed(layer)
        out.square().sum().backward()
    assert torch.equal(out, expected)  # the same kernel as outside
    assert layer.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("kind", LAYERS)
def test_other_dtypes_and_autocast_use_the_plain_layer(kind):
    layer, x = LAYERS[kind]()
    with torch.no_grad():
        with prepacked_for_cpu_inference(layer), torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            assert not packed(layer) and out.dtype == torch.bfloat16
        layer = layer.double()
        with prepacked_for_cpu_inference(layer):
            out = layer(x.double())
            assert not packed(layer) and out.dtype == torch.float64
        with onednn_disabled(), prepacked_for_cpu_inference(layer):
            layer.float()(x)
            assert not packed(layer)


def test_packed_convolution_of_a_one_channel_input_stays_contiguous():
    """(B, 1, H, W) is contiguous in both formats: the output is F.conv2d's, contiguous."""
    conv = nn.Conv2d(1, 4, 3, padding=1)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), prepacked_for_cpu_inference(conv):
        out = conv(x)
        assert packed(conv)
    assert out.is_contiguous() and rel_err(out, reference(conv, x)) < 1e-5


def test_subclasses_are_left_alone():
    """A subclass of nn.Linear may compute something else in its forward: not replaced."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Scaled(6, 6)
    x = torch.randn(3, 6)
    with torch.no_grad(), prepacked_for_cpu_inference(layer):
        assert type(layer) is Scaled and torch.equal(layer(x), 2 * reference(layer, x))


def small_unet(size, width):
    """(UNet in eval mode with random non-zero weights, sample, context); attention at size/2."""
    config = DiffusionConfig(sample_size=size, model_channels=width, channel_mult=(1, 2),
                             num_res_blocks=1, attention_resolutions=(size // 2,),
                             num_heads=width // 8, context_dim=width)
    torch.manual_seed(0)
    model = AdvancedUNet(config).eval()
    randomize(model)  # the untrained output is 0
    return model, torch.randn(2, 3, size, size), torch.randn(2, 5, width)


def layers_of(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_copies_and_pickles_inside_the_block_are_plain():
    model, x, context = small_unet(8, 16)
    with torch.no_grad():
        with prepacked_for_cpu_inference(model):
            expected = model(x, 10, context)["sample"]
            twin = copy.deepcopy(model)  # oneDNN tensors cannot be copied: plain layers
            buffer = io.BytesIO()
            torch.save(model, buffer)
            layer = pickle.loads(pickle.dumps(model.unet.conv_in))
            assert all(packed(m) for m in layers_of(model))  # the original keeps its own
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for copied in (twin, loaded):
            assert type(copied) is AdvancedUNet and plain(copied)
            assert rel_err(copied(x, 10, context)["sample"], expected) < 1e-5
        assert type(layer) is nn.Conv2d and plain(layer)


def conv_out_formats(model):
    """Memory formats conv_out's input had, one per call: 'contiguous' or 'channels_last'."""
    formats = []
    model.unet.conv_out.register_forward_pre_hook(lambda module, args: formats.append(
        "contiguous" if args[0].is_contiguous() else "channels_last"))
    return formats


def test_unet_inference_same_with_and_without_prepacking():
    """The UNet gives the plain layers' numbers, runs channels_last inside and returns its
    input's memory format, for either input format."""
    model, x, context = small_unet(16, 32)
    formats = conv_out_formats(model)
    x_last = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain_out = model(x, 10, context)["sample"]
        with prepacked_for_cpu_inference(model):
            out = model(x, 10, context)["sample"]
            assert all(packed(m) for m in layers_of(model))
            out_last = model(x_last, 10, context)["sample"]
        assert plain(model)
    assert formats == ["contiguous", "channels_last", "channels_last"]
    assert rel_err(out, plain_out) < 1e-5 and rel_err(out_last, plain_out) < 1e-5
    assert out.is_contiguous() and out_last.is_contiguous(memory_format=torch.channels_last)


def test_unet_is_unchanged_where_the_fast_path_does_not_apply():
    """Autograd, float64 and a disabled oneDNN give the plain model's exact output (same
    kernels), with nothing laid out and the activations in the input's format."""
    model, x, context = small_unet(8, 16)
    formats = conv_out_formats(model)

    def both(**kw):
        expected = model(x, 10, context)["sample"]
        with prepacked_for_cpu_inference(model):
            out = model(x, 10, context)["sample"]
            assert not any(packed(m) for m in layers_of(model))
        assert torch.equal(out, expected), kw

    both(grad=True)
    with torch.no_grad():
        with onednn_disabled():
            both(mkldnn=False)
        model.double()
        x, context = x.double(), context.double()
        both(dtype=torch.float64)
    assert set(formats) == {"contiguous"}


@pytest.mark.parametrize("compute_in_fp32", [True, False])
def test_unet_under_cpu_autocast(compute_in_fp32):
    """Under bf16 autocast the layers are the plain ones, except where the UNet computes in
    fp32 because this CPU only emulates bf16 (UNet.fp32_when_cpu_autocast_is_slow): then it
    runs as fp32 inference does in the block, laid out and channels_last inside. Where bf16 is
    native the block changes nothing."""
    model, x, context = small_unet(8, 16)
    model.unet.fp32_when_cpu_autocast_is_slow = compute_in_fp32
    formats = conv_out_formats(model)
    emulated = not cpu_has_fast_low_precision(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the UNet's warning about the fp32 fallback
        expected = model(x, 10, context)["sample"]
        with prepacked_for_cpu_inference(model):
            out = model(x, 10, context)["sample"]
            fp32 = emulated and compute_in_fp32
            assert all(packed(m) == fp32 for m in layers_of(model))
    assert out.is_contiguous() and out.dtype == expected.dtype
    assert formats == ["contiguous", "channels_last" if emulated else "contiguous"]
    if not emulated:
        assert torch.equal(out, expected)
    else:  # fp32, or bf16 kernels on channels_last activations, which round differently
        assert rel_err(out.float(), expected.float()) < (1e-5 if fp32 else 2e-2)


def test_only_modules_with_convolutions_change_their_memory_format():
    """The text encoder (no convolution) keeps its class; its linear layers are laid out."""
    encoder = TextEncoder.from_config(tiny_config()).eval()
    randomize(encoder)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        expected, _ = encoder(ids)
        with prepacked_for_cpu_inference(encoder):
            assert type(encoder) is TextEncoder
            out, _ = encoder(ids)
            assert all(packed(m) for m in layers_of(encoder))
    assert rel_err(out, expected) < 1e-5 and plain(encoder)


def test_pipeline_generate_samples_inside_the_block():
    """generate lays each UNet weight out once for all steps and restores the UNet after."""
    from sampling import AdvancedDiffusionPipeline

    config = tiny_config(num_inference_steps=3)
    torch.manual_seed(0)
    unet, encoder = AdvancedUNet(config).eval(), TextEncoder.from_config(config).eval()
    randomize(unet)
    pipeline = AdvancedDiffusionPipeline(config, unet, encoder)
    laid_out = []  # conv_in's laid-out weight at each call
    unet.unet.conv_in.register_forward_hook(
        lambda module, args, out: laid_out.append(module.__dict__.get("_packed")))
    expected = pipeline.generate(["a red circle"], [0], guidance_scale=2.0)
    assert len(laid_out) >= 3 and laid_out[0] is not None
    assert all(w[-1] is laid_out[0][-1] for w in laid_out)
    assert plain(unet)
    with onednn_disabled():  # the plain layers: the same images
        images = pipeline.generate(["a red circle"], [0], guidance_scale=2.0)
    assert laid_out[-1] is None and rel_err(images, expected) < 1e-5


def test_compiled_unet_does_not_use_the_onednn_ops():
    """Under torch.compile the layers take the plain path (dynamo traces F.conv2d / F.linear,
    never the oneDNN ops), and a module compiled in place keeps its input's memory format
    (a channels_last input would only recompile); the numbers match eager inference."""
    model, x, context = small_unet(8, 16)
    graphs = []

    def record(graph_module, example_inputs):  # a backend that runs the traced graph as is
        graphs.append(graph_module)
        return graph_module.forward

    with torch.no_grad():
        with prepacked_for_cpu_inference(model):
            eager = model(x, 10, context)["sample"]
        torch._dynamo.reset()
        model.unet.compile(backend=record)
        with prepacked_for_cpu_inference(model):
            assert type(model) is AdvancedUNet  # not switched to channels_last
            compiled = model(x, 10, context)["sample"]
    assert rel_err(compiled, eager) < 1e-5
    traced = [str(node.target) for graph in graphs for node in graph.graph.nodes]
    assert any("conv2d" in target for target in traced)
    assert not any("mkldnn" in target for target in traced)


def test_the_networks_are_plain_torch_nn():
    """The oneDNN operators and PyTorch internals stay in nets/cpu.py."""
    for path in sorted((ROOT / "nets").glob("*.py")):
        if path.name != "cpu.py":
            text = path.read_text()
            assert "torch._C" not in text and "torch.ops.mkldnn" not in text, path.name


KEEP_FREED_CHILD = """
import resource, sys, torch
from nets import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def touch():  # 256 MiB, written so every page is faulted in, then freed
    torch.empty(64 * 2 ** 20).fill_(1.0)
for _ in range(20):  # page faults of each allocation
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def transparent_huge_pages_always():
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory is glibc's")
@pytest.mark.skipif(transparent_huge_pages_always(),
                    reason="with huge pages always on, the page-fault count says little")
def test_keep_freed_memory_reuses_large_blocks():
    def settled_faults(mode):
        """Page faults of allocations 11-20. With freed memory kept, the first 2-5 grow the
        heap (seen here) until a freed block fits the next request; after that none should."""
        proc = subprocess.run([sys.executable, "-c", KEEP_FREED_CHILD, mode],
                              capture_output=True, text=True, check=True)
        return [int(n) for n in proc.stdout.split()[10:]]

    pages = 256 * 2 ** 20 // 4096  # of one block
    # by default glibc unmaps each freed block and the kernel faults the next one in again
    assert min(settled_faults("default")) > pages // 2
    assert max(settled_faults("keep")) < pages // 20  # every freed block is reused
