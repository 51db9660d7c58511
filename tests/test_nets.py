"""Tests of nets/: shapes, gradients, toggles that must not change numbers, padding
invariance, clear errors, and the guide's two configurations."""

import warnings
from pathlib import Path

import pytest
import torch
from helpers import randomize

from diffusion import DiffusionConfig
from nets import (
    AdvancedUNet,
    CrossAttention,
    Dropout,
    ResBlock,
    SpatialTransformer,
    TextEncoder,
    UNet,
    attention,
    cpu_has_fast_low_precision,
    explicit_attention,
    masked_mean,
    norm_groups,
    timestep_embedding,
    trim_padding,
)

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


def test_norm_groups_rule():
    assert [norm_groups(c) for c in (8, 16, 32, 48, 128, 1024, 3)] == [8, 16, 32, 16, 32, 32, 1]


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


def test_init_weights_zero_residual_outputs():
    model = build(attention_resolutions=(16, 8))
    unet = model.unet
    assert unet.conv_out.weight.abs().sum() == 0
    for module in model.modules():
        if isinstance(module, ResBlock):
            assert module.conv2.weight.abs().sum() == 0
            assert module.conv1.weight.std() > 0
        if isinstance(module, SpatialTransformer):
            assert module.proj_out.weight.abs().sum() == 0
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
        model.unet.enable_xformers_memory_efficient_attention()
        torch.testing.assert_close(run(model, x, t, context, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooled", [False, True])
def test_padding_tokens_have_no_effect(pooled):
    config = tiny_config(attention_resolutions=(16, 8), context_dim=32,
                         text_encoder_width=32, text_encoder_layers=1, max_text_length=12,
                         pooled_text_conditioning=pooled)
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

def test_channels_last_matches_contiguous():
    model = build(attention_resolutions=(16, 8))
    randomize(model)
    x, t, context = inputs(model.config)
    with torch.no_grad():
        ref = run(model, x, t, context)
        model.to(memory_format=torch.channels_last)
        out = run(model, x.contiguous(memory_format=torch.channels_last), t, context)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


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


def test_text_encoder_ignores_padding_ids():
    torch.manual_seed(0)
    encoder = TextEncoder(context_dim=16, width=32, num_layers=2, max_length=10)
    randomize(encoder)
    ids, mask = encoder.tokenizer(["hi", "there"])
    ref, _ = encoder(ids, mask)
    ids2 = torch.where(mask, ids, torch.randint(0, 256, ids.shape))
    out, _ = encoder(ids2, mask)
    torch.testing.assert_close(out[mask], ref[mask])


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
    plain = build(use_spatial_transformer=False)
    with pytest.raises(ValueError, match="without cross-attention"):
        plain(x, t, context)


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
