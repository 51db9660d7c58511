"""Tests of nets/: shapes, gradients, toggles that must not change numbers, padding
invariance, clear errors, and the guide's two configurations."""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend

from diffusion import DiffusionConfig
from nets import (
    AdvancedUNet,
    AttentionBlock,
    BasicTransformerBlock,
    ByteTokenizer,
    CrossAttention,
    DownBlock,
    Downsample,
    Dropout,
    FeedForward,
    ResBlock,
    SpatialTransformer,
    TextEncoder,
    UNet,
    Upsample,
    attention,
    cpu_has_fast_low_precision,
    explicit_attention,
    masked_mean,
    norm_groups,
    timestep_embedding,
    timesteps_as_batch,
    trim_padding,
)
from nets.attention import ATTENTION_BACKENDS, AttentionPool, sdpa_backends
from nets.text_encoder import text_heads

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine a
    second thread waits on a busy core at every op; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> DiffusionConfig:
    fields = dict(in_channels=3, out_channels=3, model_channels=16, num_res_blocks=1,
                  channel_mult=(1, 2), attention_resolutions=(8,), num_heads=2,
                  context_dim=24, sample_size=16, dropout=0.0, gradient_checkpointing=False)
    fields.update(overrides)
    return DiffusionConfig(**fields)


def build(seed=0, **overrides) -> AdvancedUNet:
    torch.manual_seed(seed)
    return AdvancedUNet(tiny_config(**overrides))


def inputs(config, batch=2, height=None, width=None, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    height = height or config.sample_size
    width = width or config.sample_size
    x = torch.randn(batch, config.in_channels, height, width, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, length, config.context_dim, generator=gen)
    return x, t, context


def run(model, x, t, context=None, mask=None):
    if not model.unet.has_cross_attention:
        context = mask = None
    return model(x, t, context, mask)["sample"]


# ---- shapes ----

@pytest.mark.parametrize("in_ch, out_ch, mult, res, spatial, batch, hw", [
    (1, 1, (1,), (16,), True, 1, (16, 16)),
    (2, 4, (1, 2), (16, 8), True, 3, (16, 8)),        # attention at every level, non-square
    (3, 3, (1, 2, 2), (), False, 1, (16, 24)),        # no attention levels, plain attention
    (4, 2, (1, 1, 2, 2), (16, 8, 4, 2), False, 3, (16, 16)),  # 4 levels, attention everywhere
    (3, 1, (1, 2, 2, 2), (4,), True, 2, (8, 24)),     # 4 levels, non-square, other size
])
def test_output_shape(in_ch, out_ch, mult, res, spatial, batch, hw):
    model = build(in_channels=in_ch, out_channels=out_ch, channel_mult=mult,
                  attention_resolutions=res, use_spatial_transformer=spatial)
    expected_levels = tuple(i for i in range(len(mult)) if 16 // 2 ** i in res)
    assert model.unet.attention_levels == expected_levels
    randomize(model)
    x, t, context = inputs(model.config, batch, *hw)
    with torch.no_grad():
        out = run(model, x, t, context)
    assert out.shape == (batch, out_ch, *hw)
    assert torch.isfinite(out).all()


def test_attention_placement_follows_sample_size():
    model = AdvancedUNet(DiffusionConfig(model_channels=8, channel_mult=(1, 2, 4, 8),
                                         num_heads=2, context_dim=8, sample_size=64,
                                         attention_resolutions=(8, 16)))
    assert model.unet.attention_levels == (2, 3)  # 64 -> 32 -> 16 -> 8
    assert [len(b.attentions) for b in model.unet.down_blocks] == [0, 0, 2, 2]
    assert [len(b.attentions) for b in model.unet.up_blocks] == [3, 3, 0, 0]


def test_timestep_forms_agree():
    model = build()
    randomize(model)
    x, _, context = inputs(model.config, batch=3)
    with torch.no_grad():
        ref = run(model, x, torch.tensor([7, 7, 7]), context)
        for t in (7, torch.tensor(7), torch.tensor([7])):
            torch.testing.assert_close(run(model, x, t, context), ref)
        other = run(model, x, torch.tensor([7, 500, 7]), context)
    assert not torch.allclose(other[1], ref[1])  # the timestep matters per sample
    torch.testing.assert_close(other[0], ref[0])


def test_timestep_embedding_formula():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 8)
    freqs = 10_000 ** (-torch.arange(4) / 4)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 7).shape == (3, 7)


@given(st.lists(st.tuples(st.integers(0, 999), st.floats(0.1, 0.9)), min_size=1, max_size=4),
       st.integers(1, 12), st.floats(10.0, 1e5))
def test_timestep_embedding_oracle(steps, dim, max_period):
    """Vaswani et al. 2017, sec. 3.5 at any max_period, fractional t and odd dim:
    emb[:, i] = cos(t f_i), emb[:, half + i] = sin(t f_i), f_i = max_period^(-i / half),
    and an odd dim's last column is exactly zero (dim 1: that zero column alone)."""
    t = torch.tensor([k + frac for k, frac in steps], dtype=torch.float64)
    half = dim // 2
    emb = timestep_embedding(t, dim, max_period=max_period)
    assert emb.shape == (len(steps), dim) and emb.dtype == torch.float32
    freqs = max_period ** (-torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None] * freqs
    expected = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    # float32 arguments t * f_i up to ~1000 carry ~1e-4 absolute rounding
    torch.testing.assert_close(emb[:, :2 * half].double(), expected, rtol=0, atol=2e-4)
    if dim % 2:
        assert torch.equal(emb[:, -1], torch.zeros(len(steps)))


def test_norm_groups_rule():
    assert [norm_groups(c) for c in (8, 16, 32, 48, 128, 1024, 3)] == [8, 16, 32, 16, 32, 32, 1]


# ---- architecture: each block against its formula written out by hand ----
# The references below use only torch.nn.functional and the block's own parameters, so a
# change to the math of a block (an operand swapped, a norm moved, a residual dropped) fails.

def group_norm(norm, x):
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def layer_norm(norm, x):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def conv(layer, x):
    return F.conv2d(x, layer.weight, layer.bias, padding=layer.padding)


def resblock_reference(block, x, emb, resample=None, drop=lambda h: h):
    """h = conv1(SiLU(GN(x))); GN(h) * (1 + scale) + shift (or GN(h + e)); then
    conv2(drop(SiLU(h))) + skip(x) (guided-diffusion's ResBlock)."""
    h = F.silu(group_norm(block.norm1, x))
    if resample == "up":
        h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
    elif resample == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = conv(block.conv1, h)
    e = F.linear(F.silu(emb), block.emb_proj.weight, block.emb_proj.bias)[:, :, None, None]
    if block.use_scale_shift_norm:
        c = block.out_channels
        scale, shift = e[:, :c], e[:, c:]
        h = group_norm(block.norm2, h) * (1 + scale) + shift
    else:
        h = group_norm(block.norm2, h + e)
    h = conv(block.conv2, drop(F.silu(h)))
    skip = x if block.in_channels == block.out_channels else conv(block.skip, x)
    return skip + h


def attention_reference(layer, x, context=None, mask=None):
    """CrossAttention written out: per head softmax(Q K^T / sqrt(d)) V, heads concatenated,
    then to_out. x: (B, N, D), context: (B, M, D_c), mask: (B, M) bool, True = real."""
    b, n, _ = x.shape
    if layer.is_cross_attention:
        q = x @ layer.to_q.weight.T
        k, v = (context @ layer.to_kv.weight.T).chunk(2, dim=-1)
    else:
        q, k, v = (x @ layer.to_qkv.weight.T).chunk(3, dim=-1)

    def heads(y):  # (B, L, h * d) -> (B, h, L, d)
        return y.reshape(b, y.shape[1], layer.heads, layer.dim_head).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(layer.dim_head)  # (B, h, N, M)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)  # (B, N, h * d)
    return F.linear(out, layer.to_out[0].weight, layer.to_out[0].bias)


def feed_forward_reference(ff, x):
    """GEGLU (Shazeer 2020): a * GELU(g) with [a, g] = x W + b, then Linear; or Linear-GELU."""
    first, last = ff.net[0], ff.net[2]
    if hasattr(first, "proj"):
        a, g = F.linear(x, first.proj.weight, first.proj.bias).chunk(2, dim=-1)
        h = a * F.gelu(g)
    else:
        h = F.gelu(F.linear(x, first[0].weight, first[0].bias))
    return F.linear(h, last.weight, last.bias)


def transformer_block_reference(block, x, context=None, mask=None):
    """Pre-norm: x += attn1(LN(x)); x += attn2(LN(x), context); x += ff(LN(x))."""
    x = x + attention_reference(block.attn1, layer_norm(block.norm1, x))
    if block.attn2 is not None:
        x = x + attention_reference(block.attn2, layer_norm(block.norm2, x), context, mask)
    return x + feed_forward_reference(block.ff, layer_norm(block.norm3, x))


def pixels(x):
    return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)


def unpixels(tokens, like):
    return tokens.transpose(1, 2).reshape(like.shape)  # (B, HW, C) -> (B, C, H, W)


# Without scale-shift the embedding is added before GroupNorm, which removes its mean over each
# group: with one channel per group (norm_groups(c) == c, c <= 32) it would vanish entirely,
# so those cases use 64 channels (32 groups of 2).
@pytest.mark.parametrize("scale_shift, c_in, c_out, resample", [
    (True, 8, 16, None), (False, 16, 64, None), (True, 16, 16, "up"), (False, 64, 64, "down")])
def test_resblock_matches_its_formula(scale_shift, c_in, c_out, resample):
    block = ResBlock(c_in, 12, c_out, use_scale_shift_norm=scale_shift, up=resample == "up",
                     down=resample == "down")
    randomize(block)  # conv2 is zero at init; random weights make every term count
    x, emb = torch.randn(2, c_in, 8, 8), torch.randn(2, 12)
    out = block(x, emb)
    torch.testing.assert_close(out, resblock_reference(block, x, emb, resample),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(block(x, emb + 1), out, atol=1e-3)  # the timestep matters


def test_resblock_warns_when_its_added_embedding_would_vanish():
    """Without scale-shift at <= 32 channels (one channel per group) GroupNorm removes the
    embedding: the block says so, and the timestep indeed changes nothing."""
    with pytest.warns(UserWarning, match=r"out_channels=16, use_scale_shift_norm=False.*removes"):
        block = ResBlock(16, 12, 16, use_scale_shift_norm=False)
    randomize(block)
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 12)
    torch.testing.assert_close(block(x, emb + 1), block(x, emb), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ResBlock(64, 12, 64, use_scale_shift_norm=False)
        ResBlock(16, 12, 16, use_scale_shift_norm=True)


class FixedMask(nn.Module):
    """A deterministic stand-in for dropout: multiplies by a fixed mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def test_resblock_dropout_is_active_in_training_only_and_where_documented():
    block = ResBlock(8, 12, 8, dropout=0.5)
    randomize(block)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 12)
    block.train()
    assert not torch.allclose(block(x, emb), block(x, emb), atol=1e-3)  # a mask per call
    block.eval()
    out = block(x, emb)
    assert torch.equal(block(x, emb), out)
    torch.testing.assert_close(out, resblock_reference(block, x, emb), atol=1e-5, rtol=1e-5)
    mask = (torch.rand(2, 8, 8, 8) > 0.5) * 2.0
    block.dropout = FixedMask(mask)  # h = conv2(dropout(SiLU(h))): the mask goes there
    torch.testing.assert_close(block(x, emb),
                               resblock_reference(block, x, emb, drop=lambda h: h * mask),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("glu", [True, False])
def test_feed_forward_matches_its_formula(glu):
    ff = FeedForward(8, mult=2, glu=glu)
    randomize(ff)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(ff(x), feed_forward_reference(ff, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("context_dim", [None, 6])
def test_basic_transformer_block_matches_its_formula(context_dim):
    block = BasicTransformerBlock(8, 2, 4, context_dim=context_dim)
    randomize(block)
    x, context = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    if context_dim is None:
        context = mask = None
    torch.testing.assert_close(block(x, context, mask),
                               transformer_block_reference(block, x, context, mask),
                               atol=1e-5, rtol=1e-5)


def test_spatial_transformer_is_x_plus_its_branch():
    block = SpatialTransformer(16, 2, 4, depth=2, context_dim=6)  # inner width 8
    randomize(block)
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 6)
    mask = torch.tensor([[True] * 3, [True, False, False]])
    h = F.linear(pixels(group_norm(block.norm, x)), block.proj_in.weight, block.proj_in.bias)
    for transformer_block in block.transformer_blocks:
        h = transformer_block_reference(transformer_block, h, context, mask)
    h = F.linear(h, block.proj_out.weight, block.proj_out.bias)  # (B, HW, C)
    torch.testing.assert_close(block(x, context, mask), x + unpixels(h, x),
                               atol=1e-5, rtol=1e-5)


def test_attention_block_is_x_plus_its_branch():
    block = AttentionBlock(16, 2)
    randomize(block)
    x = torch.randn(2, 16, 4, 4)
    branch = attention_reference(block.attn, pixels(group_norm(block.norm, x)))
    torch.testing.assert_close(block(x), x + unpixels(branch, x), atol=1e-5, rtol=1e-5)


# ---- gradients and initialisation ----

@pytest.mark.parametrize("pooled", [False, True])
def test_every_parameter_gets_a_finite_nonzero_gradient(pooled):
    model = build(attention_resolutions=(16, 8), dropout=0.1, pooled_text_conditioning=pooled)
    randomize(model)  # at init the zeroed output conv blocks every other gradient
    x, t, context = inputs(model.config)
    run(model, x, t, context).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spatial", [True, False])
def test_init_weights_zero_residual_outputs(spatial):
    model = build(attention_resolutions=(16, 8), use_spatial_transformer=spatial)
    unet = model.unet
    assert unet.conv_out.weight.abs().sum() == 0
    attention_blocks = []
    for module in model.modules():
        if isinstance(module, ResBlock):
            assert module.conv2.weight.abs().sum() == 0
            assert module.conv1.weight.std() > 0
        if isinstance(module, SpatialTransformer):
            assert module.proj_out.weight.abs().sum() == 0
            attention_blocks.append(module)
        if isinstance(module, AttentionBlock):
            assert module.attn.to_out[0].weight.abs().sum() == 0
            assert module.attn.to_qkv.weight.std() > 0
            attention_blocks.append(module)
    assert len(attention_blocks) == 7  # 1 down + 2 up at each of the two levels, 1 mid

    def starts_as_identity(module, args, output):
        torch.testing.assert_close(output, args[0], atol=0, rtol=0)

    for module in attention_blocks:
        module.register_forward_hook(starts_as_identity)
    x, t, context = inputs(model.config)
    out = run(model, x, t, context)
    assert out.abs().max() == 0  # an untrained model predicts zeros
    out.square().mean().backward()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()


def test_gradient_checkpointing_same_outputs_and_grads():
    model = build(attention_resolutions=(16, 8), dropout=0.1)
    randomize(model)
    x, t, context = inputs(model.config)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        else:
            model.unet.disable_gradient_checkpointing()
        assert model.unet.is_gradient_checkpointing == checkpointing
        model.zero_grad()
        torch.manual_seed(3)  # same dropout masks in both runs
        out = run(model, x, t, context)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out0, grads0), (out1, grads1) = results
    torch.testing.assert_close(out1, out0, atol=1e-5, rtol=0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-5, rtol=1e-4,
                                   msg=name)


def test_gradient_checkpointing_recomputes_every_block_in_the_backward_pass():
    """With checkpointing each ResBlock and attention block runs twice per forward+backward
    (forward, then recomputation), without it once; under no_grad once either way."""
    model = build(attention_resolutions=(16, 8))
    randomize(model)
    x, t, context = inputs(model.config)
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, SpatialTransformer))]
    calls = []
    for block in blocks:  # a pre-hook: the recomputation stops once it has what it needs
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    for checkpointing, grad, runs in ((False, True, 1), (True, True, 2), (True, False, 1)):
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        else:
            model.unet.disable_gradient_checkpointing()
        calls.clear()
        with torch.set_grad_enabled(grad):
            out = run(model, x, t, context)
        if grad:
            out.square().mean().backward()
        assert [sum(c is b for c in calls) for b in blocks] == [runs] * len(blocks), (
            checkpointing, grad)


def test_gradient_checkpointing_is_non_reentrant():
    """Non-reentrant checkpointing gives parameter gradients even when no input of the block
    requires grad; reentrant checkpointing (use_reentrant=True) would give none."""
    block = DownBlock([ResBlock(8, 12, 8, dropout=0.1)], [], None)
    randomize(block)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 12)  # neither requires grad
    grads = []
    for checkpointing in (False, True):
        block.gradient_checkpointing = checkpointing
        block.zero_grad()
        torch.manual_seed(3)  # same dropout mask
        block(x, emb)[0].square().mean().backward()
        grads.append({n: p.grad for n, p in block.named_parameters()})
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_config_gradient_checkpointing_is_applied_at_construction():
    assert build(gradient_checkpointing=True).unet.is_gradient_checkpointing
    assert not build(gradient_checkpointing=False).unet.is_gradient_checkpointing


# ---- attention ----

def test_sdpa_matches_explicit_softmax_reference_with_padding():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen) for n in (10, 6, 6))
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    out = attention(q, k, v, mask)
    # hand-written reference, independent of explicit_attention
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) / 8 ** 0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    ref = torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(explicit_attention(q, k, v, mask[:, None, None]), ref)
    for backend in ("math", "flash", "efficient", "explicit"):
        torch.testing.assert_close(attention(q, k, v, mask, backend=backend), ref,
                                   atol=1e-6, rtol=1e-5)
    for slice_size in (1, 3, "auto", 100):
        torch.testing.assert_close(attention(q, k, v, mask, slice_size=slice_size), out,
                                   atol=1e-6, rtol=0)


def test_flash_backend_with_a_padding_mask_also_allows_the_efficient_kernel(monkeypatch):
    """CUDA's flash kernel takes no mask: under backend="flash" a masked call may fall back to
    the memory-efficient kernel instead of failing with "No available kernel"; unmasked calls
    and the other backends ask for exactly their kernels."""
    flash, efficient = SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION
    assert sdpa_backends("flash", masked=False) == [flash]
    assert sdpa_backends("flash", masked=True) == [flash, efficient]
    for backend in (None, "math", "efficient"):
        for masked in (False, True):
            assert sdpa_backends(backend, masked) == ATTENTION_BACKENDS[backend]
    attention_module = sys.modules["nets.attention"]  # `nets.attention` is the function
    requested, sdpa_kernel = [], attention_module.sdpa_kernel

    def recording_sdpa_kernel(kernels):
        requested.append(list(kernels))
        return sdpa_kernel(kernels)

    monkeypatch.setattr(attention_module, "sdpa_kernel", recording_sdpa_kernel)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=gen) for n in (5, 4, 4))
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    ref = explicit_attention(q, k, v, mask[:, None, None])
    torch.testing.assert_close(attention(q, k, v, mask, backend="flash"), ref)
    attention(q, k, v, None, backend="flash")
    assert requested == [[flash, efficient], [flash]]


def test_slicing_and_backends_do_not_change_the_unet():
    model = build(attention_resolutions=(16, 8))
    randomize(model)
    x, t, context = inputs(model.config)
    mask = torch.ones(2, context.shape[1], dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        ref = run(model, x, t, context, mask)
        model.unet.set_attention_backend("explicit")
        torch.testing.assert_close(run(model, x, t, context, mask), ref, atol=1e-5, rtol=1e-5)
        model.unet.set_attention_backend(None)
        # attention() itself matches sliced to 1e-6 (test above). Through the whole UNet,
        # slices of 5 queries moved this output (size ~1) by 8e-7 with plain layers and by
        # 1.3e-6 with the prepacked oneDNN ones: fp32 rounding carried through ~20 layers, so
        # the fp32 tolerance the other backends get.
        for slice_size in ("auto", 5):
            model.unet.set_attention_slice(slice_size)
            torch.testing.assert_close(run(model, x, t, context, mask), ref, atol=1e-5,
                                       rtol=1e-5)
        model.unet.disable_attention_slicing()
        with pytest.warns(UserWarning, match="xformers is not a dependency"):
            model.unet.enable_xformers_memory_efficient_attention()
        torch.testing.assert_close(run(model, x, t, context, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_attention_with_gradients_runs_its_kernel_in_float32(dtype):
    """CPU_HALF_BACKWARD_FP32_BELOW: the CPU's half-precision SDPA backward is slow on short
    sequences, so with gradients and queries x keys below the bound attention computes in
    float32 and casts back (also under autocast, which would cast the inputs to half again);
    forward alone, and from the bound up, it stays in half precision."""
    bound = sys.modules["nets.attention"].CPU_HALF_BACKWARD_FP32_BELOW
    gen = torch.Generator().manual_seed(0)

    def qkv(n, m, grad):
        return [torch.randn(2, 2, size, 8, generator=gen).to(dtype).requires_grad_(grad)
                for size in (n, m, m)]

    def in_fp32(q, k, v, mask):
        with torch.no_grad():
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                  attn_mask=mask).to(dtype)

    def in_half(q, k, v, mask):
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    q, k, v = qkv(10, 6, grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = attention(q, k, v, mask)
    assert out.dtype == dtype
    expected = in_fp32(q, k, v, mask[:, None, None])
    assert torch.equal(out, expected)
    assert not torch.equal(expected, in_half(q, k, v, mask[:, None, None]))
    out.float().square().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad).all()
    for slice_size in (3, "auto"):  # the bound applies to each slice's queries
        assert torch.equal(attention(q, k, v, mask, slice_size=slice_size), expected)
    with torch.no_grad():  # forward only: the half-precision kernel
        assert torch.equal(attention(q, k, v, mask), in_half(q, k, v, mask[:, None, None]))
    q, k, v = qkv(10, 6, grad=False)  # no input needs a gradient
    assert torch.equal(attention(q, k, v), in_half(q, k, v, None))
    q, k, v = qkv(bound // 64, 64, grad=True)  # at the bound
    out = attention(q, k, v)
    assert torch.equal(out, in_half(q, k, v, None)) and not torch.equal(out, in_fp32(q, k, v, None))


@pytest.mark.parametrize("n", [1, 2, 5])
def test_auto_slicing_makes_two_slices(n, monkeypatch):
    """slice_size="auto" runs ceil(n / 2) queries per SDPA call: two calls (one for n = 1)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, m, 8, generator=gen) for m in (n, 3, 3))
    ref = attention(q, k, v)
    calls, sdpa = [], F.scaled_dot_product_attention

    def counting_sdpa(q_part, *args, **kwargs):
        calls.append(q_part.shape[2])
        return sdpa(q_part, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    torch.testing.assert_close(attention(q, k, v, slice_size="auto"), ref, atol=1e-6, rtol=0)
    assert calls == ([1] if n == 1 else [-(-n // 2), n // 2])


def test_xformers_toggle_selects_the_efficient_kernel_and_says_so_once():
    """xformers is not a dependency (docs/design.md): the toggle picks PyTorch's memory-efficient
    SDPA kernel and warns that it did, once per model, however it is reached."""
    model = build()
    layers = [m for m in model.modules() if isinstance(m, CrossAttention)]
    with pytest.warns(UserWarning, match="enable_xformers_memory_efficient_attention: xformers "
                                         "is not a dependency; attention uses PyTorch's "
                                         "memory-efficient SDPA kernel"):
        model.enable_xformers_memory_efficient_attention()
    assert layers and all(layer.backend == "efficient" for layer in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.unet.enable_xformers_memory_efficient_attention()  # said already: silent
    with pytest.warns(UserWarning, match="xformers is not a dependency"):
        build(use_xformers=True)  # the config's flag says so too


@pytest.mark.parametrize("pooled, pooling", [(False, "mean"), (True, "mean"),
                                             (True, "attention"), (True, "bag")])
def test_padding_tokens_have_no_effect(pooled, pooling):
    config = tiny_config(attention_resolutions=(16, 8), context_dim=32,
                         text_encoder_width=32, text_encoder_layers=1, max_text_length=12,
                         pooled_text_conditioning=pooled, text_pooling=pooling)
    torch.manual_seed(0)
    model = AdvancedUNet(config)
    encoder = TextEncoder.from_config(config)
    randomize(model)
    randomize(encoder, seed=2)
    with pytest.warns(UserWarning, match="truncated"):
        states, mask = encoder.encode(["a red square", "ok"])  # 12 bytes > 10
    assert states.shape == (2, 12, 32) and mask.tolist()[1] == [True] * 4 + [False] * 8
    x, t, _ = inputs(config)
    with torch.no_grad():
        ref = run(model, x, t, states, mask)
        changed = torch.where(mask[..., None], states, torch.randn_like(states) * 100)
        torch.testing.assert_close(run(model, x, t, changed, mask), ref, atol=1e-6, rtol=0)
        unmasked = run(model, x, t, changed)  # without the mask the padding does matter
    assert not torch.allclose(unmasked, ref, atol=1e-3)


def test_masked_mean_oracle():
    context = torch.arange(12.0).reshape(1, 4, 3).repeat(2, 1, 1)  # rows 0-2, 3-5, ...
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    torch.testing.assert_close(masked_mean(context, mask),
                               torch.tensor([[1.5, 2.5, 3.5], [4.5, 5.5, 6.5]]))
    torch.testing.assert_close(masked_mean(context, None), masked_mean(context, mask[[1, 1]]))


def test_attention_pool_oracle():
    """AttentionPool against softmax(q K^T / sqrt(d)) V written out per head, padding masked."""
    torch.manual_seed(0)
    pool = AttentionPool(8, heads=2)
    context = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    attn = pool.attn
    q = attn.to_q(pool.query)[0, 0].view(2, 4)  # (heads, d)
    k, v = attn.to_kv(context).chunk(2, dim=-1)
    k, v = k.view(2, 5, 2, 4), v.view(2, 5, 2, 4)  # (B, M, heads, d)
    logits = torch.einsum("hd,bmhd->bhm", q, k) / 2.0  # sqrt(d) = 2
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    heads = torch.einsum("bhm,bmhd->bhd", logits.softmax(-1), v).reshape(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(pool(context, mask), attn.to_out(heads), atol=1e-5,
                                   rtol=1e-5)
        # the pooled vector is a convex mix of values: one token's value when it is alone
        alone = torch.zeros(2, 5, dtype=torch.bool)
        alone[:, 2] = True
        torch.testing.assert_close(pool(context, alone),
                                   attn.to_out(v[:, 2].reshape(2, 8)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="AttentionPool heads=3 must divide dim=8"):
        AttentionPool(8, heads=3)


def test_attention_pooling_builds_its_pool_only_when_asked():
    assert build(pooled_text_conditioning=True).unet.text_pool is None  # the mean
    model = build(pooled_text_conditioning=True, text_pooling="attention")
    assert isinstance(model.unet.text_pool, AttentionPool)
    assert build(pooled_text_conditioning=False, text_pooling="attention").unet.text_pool \
        is None  # nothing is pooled without the pooled embedding
    with pytest.raises(ValueError, match="text_pooling='max' must be one of"):
        UNet(context_dim=32, model_channels=32, channel_mult=(1,), num_heads=4,
             pooled_text=True, text_pooling="max")


def test_bag_pooling_reads_the_first_state():
    """text_pooling="bag": the pooled vector is context[:, 0] (where the text encoder puts its
    summary), whatever the other states and the mask hold."""
    model = build(pooled_text_conditioning=True, text_pooling="bag")
    context = torch.randn(2, 5, model.config.context_dim)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    assert torch.equal(model.unet.pooled_text(context, mask), context[:, 0])
    assert model.unet.text_pool is None


def test_pooled_text_conditioning_reaches_a_level_without_attention():
    """With the pooled embedding, a prompt changes a model whose attention is only in the mid
    block through the ResBlocks too: the output moves even with cross-attention zeroed."""
    outputs = {}
    for pooled in (False, True):
        model = build(attention_resolutions=(), pooled_text_conditioning=pooled)
        randomize(model)
        for module in model.modules():
            if isinstance(module, CrossAttention) and module.is_cross_attention:
                module.to_out[0].weight.data.zero_()  # cut the cross-attention path
        x, t, context = inputs(model.config)
        with torch.no_grad():
            outputs[pooled] = (run(model, x, t, context), run(model, x, t, context + 1.0))
    assert torch.equal(*outputs[False])  # only cross-attention carried the prompt
    assert not torch.allclose(*outputs[True], atol=1e-4)


# ---- memory formats and precision ----

def record_conv_out_formats(model):
    """Memory formats conv_out's input had, one per call: 'contiguous' or 'channels_last'."""
    formats = []

    def hook(module, args):
        formats.append("contiguous" if args[0].is_contiguous() else "channels_last")

    model.unet.conv_out.register_forward_pre_hook(hook)
    return formats


def test_channels_last_matches_contiguous():
    """Inference: a channels_last model and input against the same model run contiguous all
    the way through. The UNet keeps its input's memory format (inside
    nets.prepacked_for_cpu_inference it runs channels_last inside, see tests/test_cpu.py)."""
    model = build(attention_resolutions=(16, 8))
    randomize(model)
    x, t, context = inputs(model.config)
    formats = record_conv_out_formats(model)
    with torch.no_grad():
        ref = run(model, x, t, context)
        model.to(memory_format=torch.channels_last)
        out = run(model, x.contiguous(memory_format=torch.channels_last), t, context)
    assert formats == ["contiguous", "channels_last"]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_channels_last_training_matches_contiguous():
    """Training (autograd on, no inference switch): outputs and gradients agree to float
    rounding between a contiguous and a channels_last model and input."""
    model = build(attention_resolutions=(16, 8))
    randomize(model)
    x, t, context = inputs(model.config)
    formats = record_conv_out_formats(model)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=memory_format)
        model.zero_grad()
        out = run(model, x.contiguous(memory_format=memory_format), t, context)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert formats == ["contiguous", "channels_last"]
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("force_low_precision", [False, True])
def test_bf16_autocast_close_to_fp32(force_low_precision):
    model = build(attention_resolutions=(16, 8))
    randomize(model, seed=4)
    model.unet.fp32_when_cpu_autocast_is_slow = not force_low_precision
    x, t, context = inputs(model.config)
    with torch.no_grad():
        ref = run(model, x, t, context)
        with warnings.catch_warnings(record=True) as caught, \
                torch.autocast("cpu", dtype=torch.bfloat16):
            warnings.simplefilter("always")
            out = run(model, x, t, context)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    emulated = not cpu_has_fast_low_precision(torch.bfloat16)
    if emulated and not force_low_precision:  # the documented fp32 fallback
        assert any("emulated on this CPU" in str(w.message) for w in caught)
        torch.testing.assert_close(out, ref)
    else:  # the real bf16 path: ~3 significant digits, but not fp32's
        rel = (out.float() - ref).norm() / ref.norm()
        assert 1e-5 < rel < 0.05, rel


def test_a_bf16_model_runs_under_cpu_autocast():
    """The fp32 fallback for emulated bf16 cast the sample to fp32 but not the parameters, so a
    model converted to bf16 failed inside its first conv; it now runs as it is."""
    model = build(attention_resolutions=(8,))
    randomize(model, seed=4)
    x, t, context = inputs(model.config)
    with torch.no_grad():
        ref = run(model, x, t, context)
        model.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(model, x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_dropout_draws_on_the_input_device():
    """The random bits were drawn on the default device, so a CPU input under another default
    device (AdvancedUNet builds on torch.get_default_device()) failed."""
    x = torch.ones(4, 8)
    with torch.device("meta"):
        torch.manual_seed(0)
        y = Dropout(0.5).train()(x)
    assert y.device.type == "cpu" and set(y.unique().tolist()) <= {0.0, 2.0}


def test_explicit_attention_gives_zeros_where_no_key_may_be_attended():
    """As SDPA does (it gave NaN); and its softmax runs in float32 for bf16 inputs."""
    q, k, v = (torch.randn(2, 1, 3, 4, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    mask = torch.tensor([[True, True, False], [False, False, False]])[:, None, None]
    out = explicit_attention(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0], F.scaled_dot_product_attention(q, k, v, mask)[0])
    bf16 = explicit_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    torch.testing.assert_close(bf16.float(), out, atol=0.02, rtol=0.02)


def test_dropout_statistics_and_reproducibility():
    drop = Dropout(0.25).train()
    x = torch.ones(64, 8, 32, 32).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    y = drop(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    kept = y > 0
    assert abs(kept.float().mean() - 0.75) < 0.005
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert abs(y.mean() - 1) < 0.01  # inverted dropout keeps the expectation
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)
    assert not torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError, match="p=1.0"):
        Dropout(1.0)


# ---- text encoder ----

def test_text_encoder_shapes_mask_and_unconditional_prompt():
    encoder = TextEncoder(context_dim=16, width=32, num_layers=1, max_length=10)
    ids, mask = encoder.tokenizer(["", "héllo"])
    assert ids[0, :2].tolist() == [encoder.tokenizer.bos_id, encoder.tokenizer.eos_id]
    assert (ids[0, 2:] == encoder.tokenizer.pad_id).all()
    assert mask.sum(1).tolist() == [2, 8]  # "héllo" is 6 UTF-8 bytes
    assert encoder.tokenizer.decode(ids[1]) == "héllo"
    states, mask = encoder.encode(["", "héllo"])
    assert states.shape == (2, 10, 16) and mask.dtype == torch.bool
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = encoder.tokenizer("x" * 20)
    assert mask.all() and ids[0, -1] == encoder.tokenizer.eos_id


def test_truncation_keeps_whole_characters_and_bad_text_is_named():
    """Truncating at max_length - 2 bytes cut a two-byte character in half ('\u00e9\u00e9\ufffd');
    a lone surrogate was a bare UnicodeEncodeError."""
    tokenizer = ByteTokenizer(max_length=7)  # 5 bytes of room
    with pytest.warns(UserWarning, match=r"6 UTF-8 bytes truncated to 4 \(max_text_length=7 "):
        ids = tokenizer.encode("\u00e9\u00e9\u00e9")  # 3 x 2 bytes
    assert ids[1:-1] == list("\u00e9\u00e9".encode()) and tokenizer.decode(ids) == "\u00e9\u00e9"
    with pytest.warns(UserWarning, match=r"truncated to 5"):  # ASCII: cut at the room
        assert len(tokenizer.encode("abcdefg")) == 7
    with pytest.warns(UserWarning, match=r"truncated to 3"):  # 'x' + a 4-byte emoji + ...
        assert tokenizer.decode(tokenizer.encode("xyz\U0001F600")) == "xyz"
    with pytest.raises(ValueError, match=r"prompt 'a\\udc80' is not valid Unicode text"):
        tokenizer.encode("a\udc80")


def test_text_encoder_refuses_float_and_non_tensor_masks():
    """A float mask (e.g. an additive 0 / -inf one) was read with .bool(), which inverts it."""
    encoder = TextEncoder(context_dim=16, width=32, num_layers=1, max_length=10)
    ids, mask = encoder.tokenizer(["hi", "there"])
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    with pytest.raises(TypeError, match=r"attention_mask must be bool \(True = real token\) "
                                        r"or 0/1 integers; got dtype torch.float32"):
        encoder(ids, additive)
    with pytest.raises(TypeError, match=r"attention_mask must be a tensor.*got list"):
        encoder(ids, mask.tolist())
    torch.testing.assert_close(encoder(ids, mask.long())[0], encoder(ids, mask)[0])


def test_text_encoder_ignores_padding_ids():
    torch.manual_seed(0)
    encoder = TextEncoder(context_dim=16, width=32, num_layers=2, max_length=10)
    randomize(encoder)
    ids, mask = encoder.tokenizer(["hi", "there"])
    ref, _ = encoder(ids, mask)
    ids2 = torch.where(mask, ids, torch.randint(0, 256, ids.shape))
    out, _ = encoder(ids2, mask)
    torch.testing.assert_close(out[mask], ref[mask])


def test_tokenizer_truncation_keeps_the_start_and_warns_only_when_it_cuts():
    """Truncation keeps the first max_length - 2 bytes; decode replaces malformed UTF-8."""
    tokenizer = ByteTokenizer(max_length=6)  # room for 4 bytes between BOS and EOS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, mask = tokenizer("abcd")  # exactly fits: kept whole, no warning
    assert ids[0].tolist() == [tokenizer.bos_id, *b"abcd", tokenizer.eos_id] and mask.all()
    with pytest.warns(UserWarning, match="prompt of 6 UTF-8 bytes truncated to 4"):
        ids, _ = tokenizer("abcdef")
    assert ids[0].tolist() == [tokenizer.bos_id, *b"abcd", tokenizer.eos_id]
    lone_lead_byte = [tokenizer.bos_id, *b"a", 0xC3, tokenizer.eos_id]  # half of an é
    assert tokenizer.decode(lone_lead_byte) == "a\ufffd"  # malformed UTF-8 is replaced


def test_text_encoder_default_mask_is_the_padding_mask():
    """Without attention_mask the encoder masks PAD itself; an integer mask works like bool."""
    encoder = TextEncoder(context_dim=16, width=32, num_layers=1, max_length=10)
    randomize(encoder)
    ids, mask = encoder.tokenizer(["hi", "there"])
    with torch.no_grad():
        ref, ref_mask = encoder(ids, mask)
        out, out_mask = encoder(ids)
        as_long, long_mask = encoder(ids, mask.long())
    assert torch.equal(out_mask, mask) and long_mask.dtype == torch.bool
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(as_long, ref, atol=0, rtol=0)


def test_text_encoder_sees_token_order():
    """Position embeddings: "ab" and "ba" are not permutations of each other's states."""
    encoder = TextEncoder(context_dim=16, width=32, num_layers=1, max_length=10)
    randomize(encoder)
    with torch.no_grad():
        states, _ = encoder.encode(["ab", "ba"])
    swapped = states[0, [0, 2, 1, 3]]  # "ab" with its two byte positions exchanged
    assert not torch.allclose(swapped, states[1, :4], atol=1e-3)


def test_text_heads_rule():
    """Largest divisor of the width not above width // 64, at least 1 (docstring examples)."""
    assert [text_heads(w) for w in (32, 96, 192, 256, 320, 512, 640)] == [1, 1, 3, 4, 5, 8, 10]
    block = TextEncoder(context_dim=16, width=192, num_layers=1).blocks[0]
    assert (block.attn.heads, block.attn.dim_head) == (3, 64)


def test_trim_padding_cuts_at_the_longest_prompt():
    encoder = TextEncoder(context_dim=16, width=32, num_layers=1, max_length=10)
    ids, mask = encoder.tokenizer(["", "hello", "hi"])
    short_ids, short_mask = trim_padding(ids, mask)
    assert short_ids.shape == short_mask.shape == (3, 7)  # BOS + 5 bytes + EOS
    states, states_mask = encoder.encode(["", "hello", "hi"], trim=True)
    assert states.shape == (3, 7, 16) and torch.equal(states_mask, short_mask)
    assert torch.equal(short_ids, ids[:, :7]) and torch.equal(short_mask, mask[:, :7])
    assert not mask[:, 7:].any()
    # a hole in the middle stays (only trailing all-padding positions go); no real token: 1
    holes = torch.tensor([[True, False, True, False]])
    assert trim_padding(torch.zeros(1, 4), holes)[1].tolist() == [[True, False, True]]
    assert trim_padding(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool))[1].shape == (2, 1)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids "
                                         r"\(3, 10\); got \(3, 9\)"):
        trim_padding(ids, mask[:, :9])


def test_text_encoder_bad_inputs_raise_clear_errors():
    encoder = TextEncoder(context_dim=16, width=32, num_layers=1, max_length=10)
    ids, mask = encoder.tokenizer(["hi", "there"])
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, L\) int64 tensor; got "
                                         r"torch.Size\(\[10\]\)"):
        encoder(ids[0])
    with pytest.raises(ValueError, match=r"at most max_text_length=10; got shape \(2, 11\)"):
        encoder(torch.cat([ids, ids[:, :1]], dim=1))
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids "
                                         r"\(2, 10\); got \(2, 9\)"):
        encoder(ids, mask[:, :9])
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(TypeError, match=r"input_ids must be a \(B, L\) int64 tensor of "
                                            rf"token ids; got dtype {dtype}"):
            encoder(ids.to(dtype))
    for bad in (300, 259, -1):
        with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, 259\) "
                                             rf".*; got {bad}$"):
            encoder(torch.where(mask, ids, bad))
    torch.testing.assert_close(encoder(ids.int())[0], encoder(ids)[0])  # int32 is cast


@pytest.mark.parametrize("pooled", [False, True])
def test_trimmed_text_gives_the_same_prediction(pooled):
    """Encoder + UNet on the 77-style padded text and on the text cut by trim_padding agree:
    every reader of the text masks the cut positions out."""
    config = tiny_config(context_dim=32, text_encoder_width=32, text_encoder_layers=1,
                         max_text_length=20, pooled_text_conditioning=pooled)
    torch.manual_seed(0)
    model, encoder = AdvancedUNet(config), TextEncoder.from_config(config)
    randomize(model)
    randomize(encoder, seed=2)
    ids, mask = encoder.tokenizer(["a red square", "ok"])
    x, t, _ = inputs(config)
    with torch.no_grad():
        full = run(model, x, t, *encoder(ids, mask))
        short_ids, short_mask = trim_padding(ids, mask)
        assert short_ids.shape[1] == len("a red square") + 2
        trimmed = run(model, x, t, *encoder(short_ids, short_mask))
        one_real_token_less = run(model, x, t, *encoder(short_ids[:, :-1], short_mask[:, :-1]))
    # float rounding only (7e-7 seen, outputs of mean size 0.2): the linear layers see fewer
    # rows; losing one real token moves the output by ~8e-3
    torch.testing.assert_close(trimmed, full, atol=5e-6, rtol=0)
    assert not torch.allclose(one_real_token_less, full, atol=1e-3)


# ---- errors ----

def test_bad_inputs_raise_clear_errors():
    model = build()
    x, t, context = inputs(model.config)
    with pytest.raises(ValueError, match=r"in_channels=3.*got \(2, 4, 16, 16\)"):
        model(torch.randn(2, 4, 16, 16), t, context)
    with pytest.raises(ValueError, match=r"divisible by the total downsampling 2.*\(16, 15\)"):
        model(torch.randn(2, 3, 16, 15), t, context)
    with pytest.raises(ValueError, match=r"context_dim=24.*got \(2, 7, 25\)"):
        model(x, t, torch.randn(2, 7, 25))
    with pytest.raises(ValueError, match=r"batch 2; got 3"):
        model(x, t, torch.randn(3, 7, 24))
    with pytest.raises(ValueError, match="required.*got None"):
        model(x, t)
    with pytest.raises(ValueError, match=r"encoder_attention_mask must have shape.*\(2, 6\)"):
        model(x, t, context, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="no real token"):
        model(x, t, context, torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be bool"):
        model(x, t, context, torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"timestep.*\(B,\)=\(2,\).*got shape \(3,\)"):
        model(x, torch.tensor([1, 2, 3]), context)
    with pytest.raises(TypeError, match="timestep must be"):
        model(x, "5", context)
    with pytest.raises(TypeError, match="sample must be a"):
        model(x.numpy(), t, context)
    with pytest.raises(TypeError, match=r"sample must be a float tensor of dtype torch.float32 "
                                        r".*; got dtype torch.int64"):
        model(x.long(), t, context)
    plain = build(use_spatial_transformer=False)
    with pytest.raises(ValueError, match="without cross-attention"):
        plain(x, t, context)


def test_input_dtypes_must_match_the_model():
    """float64 (numpy's default) or integer inputs get a clear error, not one from inside a
    conv or matmul; under autocast float32/float16/bfloat16 inputs are all accepted."""
    model = build()
    randomize(model)
    x, t, context = inputs(model.config)
    bad = [("sample", (x.double(), t, context), torch.float64),
           ("sample", (torch.from_numpy(x.numpy().astype("float64")), t, context),
            torch.float64),
           ("encoder_hidden_states", (x, t, context.double()), torch.float64),
           ("encoder_hidden_states", (x, t, context.long()), torch.int64),
           ("sample", (x.bfloat16(), t, context), torch.bfloat16)]
    for name, args, dtype in bad:
        with pytest.raises(TypeError, match=rf"{name} must be a float tensor of dtype "
                                            rf"torch.float32 \(the model's parameters are "
                                            rf"torch.float32\); got dtype {dtype}\. "):
            model(*args)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the emulated-bf16 fallback's warning
        out = model(x.bfloat16(), t, context.half())["sample"]
        assert torch.isfinite(out).all()
        with pytest.raises(TypeError, match=r"sample must be a float tensor of dtype "
                                            r"torch.bfloat16 or torch.float16 or torch.float32 "
                                            r"\(.* under autocast\); got dtype torch.float64"):
            model(x.double(), t, context)
    model.double()  # a float64 model takes float64 inputs
    with torch.no_grad():
        assert model(x.double(), t, context.double())["sample"].dtype == torch.float64


@pytest.mark.parametrize("make, error, match", [
    (lambda: Downsample(8, use_conv=False, out_channels=16), ValueError,
     "Downsample without a conv keeps the channels; got channels=8, out_channels=16"),
    (lambda: Upsample(8, use_conv=False, out_channels=4), ValueError,
     "Upsample without a conv keeps the channels; got channels=8, out_channels=4"),
    (lambda: ResBlock(8, 12, up=True, down=True), ValueError,
     "ResBlock takes up=True or down=True, not both"),
    (lambda: timesteps_as_batch(torch.tensor([True, False]), 2, "cpu"), TypeError,
     "timestep must be an integer or float tensor; got dtype torch.bool"),
    (lambda: timesteps_as_batch(torch.tensor([1j, 2j]), 2, "cpu"), TypeError,
     "timestep must be an integer or float tensor; got dtype torch.complex64"),
    (lambda: CrossAttention(8, None, 2, 4)(torch.randn(1, 3, 8), torch.randn(1, 2, 8)),
     ValueError, r"context was passed to a self-attention layer \(built with context_dim=None\)"),
    (lambda: CrossAttention(8, 6, 2, 4)(torch.randn(1, 3, 8)), ValueError,
     r"cross-attention needs context \(B, M, 6\); got None"),
    (lambda: ByteTokenizer(1), ValueError, r"max_length=1 must be an int >= 2"),
    (lambda: ByteTokenizer(True), ValueError, r"max_length=True must be an int >= 2"),
    (lambda: ByteTokenizer(10)(["ok", 3]), TypeError, "prompt must be a str; got int"),
    (lambda: ByteTokenizer(10)(b"ok"), TypeError,
     "prompts must be a str or a list of str; got bytes"),
])
def test_block_and_tokenizer_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_init_weights_rejects_a_module_it_has_no_rule_for():
    model = build()
    model.unet.extra = nn.PReLU()  # has a parameter, matches no rule
    with pytest.raises(TypeError, match="_init_weights does not know how to initialise PReLU; "
                                        "add a rule for it here"):
        model._init_weights()


def test_bad_construction_raises_clear_errors():
    with pytest.raises(ValueError, match=r"num_heads=3 must divide.*\[16, 32\]"):
        build(num_heads=3)
    with pytest.raises(ValueError, match="sample_size=20 must be divisible by the total "
                                         "downsampling 8"):
        build(sample_size=20, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="slice_size=0"):
        build().unet.set_attention_slice(0)
    with pytest.raises(ValueError, match="backend='xformers'"):
        build().unet.set_attention_backend("xformers")
    with pytest.raises(ValueError, match="pooled_text=True needs use_spatial_transformer"):
        UNet(model_channels=8, channel_mult=(1,), num_heads=2, use_spatial_transformer=False,
             pooled_text=True)
    with pytest.raises(ValueError, match="pooled_text_conditioning=True needs"):
        build(use_spatial_transformer=False, pooled_text_conditioning=True)
    with pytest.raises(ValueError, match=r"attention_levels=\(2,\)"):
        UNet(model_channels=8, channel_mult=(1, 2), num_heads=2, attention_levels=(2,))
    with pytest.raises(ValueError, match="context width"):
        CrossAttention(8, context_dim=4, heads=2, dim_head=4)(
            torch.randn(1, 3, 8), torch.randn(1, 2, 5))


def test_unmatched_attention_resolution_warns():
    with pytest.warns(UserWarning, match=r"entries \[3\] match no level"):
        model = build(attention_resolutions=(3, 8))
    assert model.unet.attention_levels == (1,)


# ---- the guide's two configurations ----

def test_guide_small_config_builds_and_runs():
    config = DiffusionConfig.from_yaml(CONFIGS / "guide_small.yaml")
    assert (config.model_channels, config.channel_mult, config.attention_resolutions,
            config.sample_size, config.context_dim) == (64, (1, 2), (8,), 32, 256)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AdvancedUNet(config)
    assert any("match no level" in str(w.message) for w in caught)  # (8,) at 32x32
    assert model.unet.attention_levels == ()  # only the mid block attends
    assert 2.5e6 < sum(p.numel() for p in model.parameters()) < 4.5e6
    encoder = TextEncoder.from_config(config)
    states, mask = encoder.encode(["a red circle", ""])
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.tensor([10, 90]), states, mask)["sample"]
    assert out.shape == x.shape
    out.square().mean().backward()


def test_guide_default_config_builds_and_runs():
    config = DiffusionConfig.from_yaml(CONFIGS / "guide_default.yaml")
    assert config == DiffusionConfig(sample_size=64)  # the guide's defaults
    torch.manual_seed(0)
    model = AdvancedUNet(config).eval()
    assert model.unet.attention_levels == (2, 3)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 388e6) / 388e6 < 0.05, params  # the reference UNet: 388M
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), 500, torch.randn(1, 77, 768))["sample"]
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
