"""Tests of nets/cpu.py: the prepacked inference layers compute what F.conv2d / F.linear
compute, only inside reuse_packed_weights(), notice the ways their weight can change there and
stay out of training; keep_freed_memory really stops large blocks from being page-faulted in
again."""

import copy
import io
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.optim.optimizer as optimizer_module
from helpers import randomize
from torch import nn

from diffusion import DiffusionConfig
from nets import AdvancedUNet, Conv2d, Linear, UNet, reuse_packed_weights

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="the prepacked path needs oneDNN (mkldnn)")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny layers gain nothing from a second thread; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(layer, x):
    if isinstance(layer, nn.Linear):
        return F.linear(x, layer.weight, layer.bias)
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                    layer.groups)


# (layer, an input for it)
LAYERS = {
    "conv": lambda: (Conv2d(4, 4, 3, padding=1), torch.randn(1, 4, 8, 8)),
    "linear": lambda: (Linear(6, 5), torch.randn(2, 3, 6)),
}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kernel,stride,padding,bias", [
    (3, 1, 1, True), (3, 2, 1, True), (1, 1, 0, True), (3, 1, 0, False), (5, 2, 2, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_convolution_matches_conv2d(kernel, stride, padding, bias, channels_last):
    torch.manual_seed(0)
    conv = Conv2d(6, 10, kernel, stride=stride, padding=padding, bias=bias)
    if bias:
        nn.init.normal_(conv.bias)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # packed for the first shape, then used with another batch and spatial size
    for shape in [(2, 6, 12, 16), (3, 6, 9, 7)]:
        x = torch.randn(shape).contiguous(memory_format=fmt)
        with torch.no_grad(), reuse_packed_weights():
            out = conv(x)
            expected = reference(conv, x)
            assert conv._packed is not None  # the fast path ran
        assert out.shape == expected.shape
        assert rel_err(out, expected) < 1e-5
        assert out.is_contiguous(memory_format=fmt)  # the format F.conv2d returns


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 6), (2, 5, 6), (2, 3, 4, 6)])
def test_packed_linear_matches_linear(shape, bias):
    torch.manual_seed(0)
    layer = Linear(6, 9, bias=bias)
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randn(shape)
    # packed for one number of rows, then used with another and with a non-contiguous input
    for inputs in [x, torch.randn(11, 6), torch.randn(6, 4, 5).transpose(0, 2)]:
        with torch.no_grad(), reuse_packed_weights():
            out = layer(inputs)
            assert layer._packed is not None  # the fast path ran
        assert rel_err(out, reference(layer, inputs)) < 1e-5


@pytest.mark.parametrize("kind", LAYERS)
def test_weight_changes_repack(kind):
    torch.manual_seed(0)
    layer, x = LAYERS[kind]()
    shape = layer.weight.shape

    def check():
        with torch.no_grad():
            assert rel_err(layer(x), reference(layer, x)) < 1e-5
        assert layer._packed is not None

    with reuse_packed_weights():
        check()
        with torch.no_grad():
            layer.weight.mul_(-2.0)  # in place: the version counter moves
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
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
        layer(x).square().sum().backward()
        optimizer.step()
        check()
        # fused optimizers (the trainer's AdamW on the CPU) bump no version counter: the
        # copies are dropped after every optimizer step instead
        for fused in (torch.optim.AdamW(layer.parameters(), lr=0.5, fused=True),
                      torch.optim.SGD(layer.parameters(), lr=0.5, fused=True)):
            version = layer.weight._version
            layer(x).square().sum().backward()
            fused.step()
            assert layer.weight._version == version  # why the version check cannot see it
            check()
    assert not optimizer_module._global_optimizer_post_hooks  # the block's hook is gone


@pytest.mark.parametrize("kind", LAYERS)
def test_copies_live_only_inside_the_block(kind):
    """Outside reuse_packed_weights() the layer is the plain one, so every way of editing a
    weight (`.data` included, which no version counter records) is seen; leaving the
    outermost block drops the copies."""
    torch.manual_seed(0)
    layer, x = LAYERS[kind]()
    with torch.no_grad():
        layer(x)
        assert layer._packed is None
        with reuse_packed_weights():
            with reuse_packed_weights():
                layer(x)
            assert layer._packed is not None  # the inner block's exit keeps it
        assert layer._packed is None
        layer.weight.data.mul_(-3.0)
        assert rel_err(layer(x), reference(layer, x)) < 1e-5


@pytest.mark.parametrize("kind", LAYERS)
def test_new_parameter_on_the_same_storage_and_moved_views_repack(kind):
    """Identity and data pointer each catch a change the other checks miss."""
    torch.manual_seed(0)
    layer, x = LAYERS[kind]()
    with torch.no_grad(), reuse_packed_weights():
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


@pytest.mark.parametrize("kind", LAYERS)
def test_training_and_autograd_use_the_plain_layer(kind):
    torch.manual_seed(0)
    layer, x = LAYERS[kind]()
    x.requires_grad_(True)
    with reuse_packed_weights():
        out = layer(x)
        assert layer._packed is None
        out.square().sum().backward()
        assert layer.weight.grad is not None and x.grad is not None
        with torch.no_grad():
            layer(x)
        assert layer._packed is not None
        layer.train()
        assert layer._packed is None  # train() (and eval()) drop the copy


@pytest.mark.parametrize("kind", LAYERS)
def test_switch_off_and_other_dtypes(kind, monkeypatch):
    layer, x = LAYERS[kind]()
    monkeypatch.setattr(type(layer), "prepack_for_inference", False)
    with torch.no_grad(), reuse_packed_weights():
        layer(x)
        assert layer._packed is None  # inside the block: leaving it drops copies anyway
    monkeypatch.setattr(type(layer), "prepack_for_inference", True)
    layer = layer.double()
    with torch.no_grad(), reuse_packed_weights():
        out = layer(x.double())
        assert layer._packed is None and out.dtype == torch.float64


@pytest.mark.parametrize("kind", LAYERS)
def test_autocast_inside_the_block_uses_the_plain_layer(kind):
    """Under CPU autocast the layers compute in bfloat16 as nn.Conv2d / nn.Linear do."""
    layer, x = LAYERS[kind]()
    with torch.no_grad(), reuse_packed_weights(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        assert layer._packed is None and out.dtype == torch.bfloat16


def test_packed_convolution_of_a_one_channel_input_stays_contiguous():
    """(B, 1, H, W) is contiguous in both formats: the output is F.conv2d's, contiguous."""
    conv = Conv2d(1, 4, 3, padding=1)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), reuse_packed_weights():
        out = conv(x)
        assert conv._packed is not None
    assert out.is_contiguous() and rel_err(out, reference(conv, x)) < 1e-5


@pytest.mark.parametrize("kind", LAYERS)
def test_copies_and_pickles_after_inference(kind):
    layer, x = LAYERS[kind]()
    with torch.no_grad(), reuse_packed_weights():
        expected = layer(x)
        twin = copy.deepcopy(layer)  # oneDNN tensors cannot be deep-copied: the copy is dropped
        assert twin._packed is None and layer._packed is not None
        buffer = io.BytesIO()
        torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad(), reuse_packed_weights():
        assert torch.equal(twin(x), expected) and torch.equal(loaded(x), expected)


def small_unet(size, width):
    """(UNet in eval mode with random non-zero weights, sample, context); attention at size/2."""
    config = DiffusionConfig(sample_size=size, model_channels=width, channel_mult=(1, 2),
                             num_res_blocks=1, attention_resolutions=(size // 2,),
                             num_heads=width // 8, context_dim=width)
    torch.manual_seed(0)
    model = AdvancedUNet(config).eval()
    randomize(model)  # the untrained output is 0
    return model, torch.randn(2, 3, size, size), torch.randn(2, 5, width)


def test_unet_inference_same_with_and_without_prepacking(monkeypatch):
    model, x, context = small_unet(16, 32)
    with torch.no_grad(), reuse_packed_weights():
        packed = model(x, 10, context)["sample"]
        assert all(m._packed is not None for m in model.modules()
                   if isinstance(m, (Conv2d, Linear)))
        x_last = x.contiguous(memory_format=torch.channels_last)
        packed_last = model(x_last, 10, context)["sample"]
        monkeypatch.setattr(Conv2d, "prepack_for_inference", False)
        monkeypatch.setattr(Linear, "prepack_for_inference", False)
        plain = model(x, 10, context)["sample"]
    assert rel_err(packed, plain) < 1e-5 and rel_err(packed_last, plain) < 1e-5
    # channels_last inside, the input's memory format outside
    assert packed.is_contiguous() and packed_last.is_contiguous(memory_format=torch.channels_last)
    assert not model.unet._runs_channels_last(x)  # autograd on: never
    with torch.no_grad():
        assert not model.unet._runs_channels_last(x)  # outside the block: never


def test_unet_runs_channels_last_inside_the_block_unless_switched_off(monkeypatch):
    """Inside reuse_packed_weights() the activations are channels_last (conv_out sees them so)
    for a contiguous input; UNet.channels_last_cpu_inference = False keeps them contiguous."""
    model, x, context = small_unet(8, 16)
    formats = []
    model.unet.conv_out.register_forward_pre_hook(
        lambda module, args: formats.append(args[0].is_contiguous()))
    with torch.no_grad(), reuse_packed_weights():
        model(x, 10, context)
        monkeypatch.setattr(UNet, "channels_last_cpu_inference", False)
        model(x, 10, context)
    assert formats == [False, True]


def test_sampling_loop_reuses_the_packed_weights():
    """sampling.sample runs its loop inside reuse_packed_weights(): the network called from
    model_fn lays out each weight once for all steps, and the copies go when it returns."""
    from diffusion import AdvancedScheduler
    from sampling import sample

    model, x, context = small_unet(8, 16)
    scheduler = AdvancedScheduler(model.config)
    copies = []

    def model_fn(x_t, t):
        out = model(x_t, t, context)["sample"]
        copies.append(model.unet.conv_in._packed[-1])
        return out

    sample(model_fn, scheduler, x[:, :, :8, :8], sampler="ddim", num_inference_steps=3)
    assert len(copies) == 3 and all(c is copies[0] for c in copies)
    assert all(m._packed is None for m in model.modules() if isinstance(m, (Conv2d, Linear)))


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


def test_compiled_unet_matches_the_prepacked_eager_unet():
    """Under torch.compile the layers take the plain path (dynamo traces F.conv2d / F.linear,
    never the oneDNN ops); the numbers match eager inference, which uses the packed path."""
    model, x, context = small_unet(8, 16)
    graphs = []

    def record(graph_module, example_inputs):  # a backend that runs the traced graph as is
        graphs.append(graph_module)
        return graph_module.forward

    with torch.no_grad(), reuse_packed_weights():
        eager = model(x, 10, context)["sample"]
        torch._dynamo.reset()
        model.unet.compile(backend=record)
        compiled = model(x, 10, context)["sample"]
    assert rel_err(compiled, eager) < 1e-5
    traced = [str(node.target) for graph in graphs for node in graph.graph.nodes]
    assert any("conv2d" in target for target in traced)
    assert not any("mkldnn" in target for target in traced)
