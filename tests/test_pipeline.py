"""AdvancedDiffusionPipeline and sample.py: guidance, seeds, image-to-image, toggles, errors."""

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config
from PIL import Image

import sample as sample_script
import sampling.cli as cli_module
import sampling.evaluate as evaluate_script
import sampling.images as images_module
import sampling.pipeline as pipeline_module
from diffusion import AdvancedDiffusionTrainer, AdvancedScheduler, CheckpointError, all_captions
from diffusion.config import MAX_SEED
from diffusion.shapes import SHAPES
from nets import AdvancedUNet, TextEncoder
from sampling import AdvancedDiffusionPipeline, guided_model_fn, to_pil
from sampling.evaluate import sample_all_captions
from sampling.images import from_pil, open_image
from sampling.pipeline import parse_device

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def randomised(module, seed):
    """A fresh model predicts exactly 0 (zero-initialised output layers); give every parameter
    small random values so outputs depend on the inputs and the prompt."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="module")
def pipeline():
    config = tiny_config(num_inference_steps=4, clip_sample=True)
    torch.manual_seed(0)
    return AdvancedDiffusionPipeline(config, randomised(AdvancedUNet(config), 1),
                                     randomised(TextEncoder.from_config(config), 2))


def record_batch_sizes(pipe) -> list[int]:
    """Record the batch size of every UNet forward of `pipe` (`del pipe.unet.forward` undoes)."""
    batches, forward = [], pipe.unet.forward

    def recording(x, t, context=None, mask=None):
        batches.append(x.shape[0])
        return forward(x, t, context, mask)

    pipe.unet.forward = recording
    return batches


def images_of(pipeline, prompts, seeds, **kw):
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("guidance_scale", 3.0)
    return pipeline.generate(prompts, seeds, **kw)


# ---- classifier-free guidance ----

def test_guidance_scale_one_is_cond_and_zero_is_uncond():
    def denoise(x, t, context, mask):
        return x * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    x = torch.randn(2, 1, 2, 2)
    cond = (torch.full((2, 3, 4), 2.0), torch.ones(2, 3, dtype=torch.bool))
    uncond = (torch.full((2, 3, 4), 5.0), torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(guided_model_fn(denoise, cond, uncond, 1.0)(x, 0), 2 * x)
    torch.testing.assert_close(guided_model_fn(denoise, cond, uncond, 0.0)(x, 0), 5 * x)
    torch.testing.assert_close(guided_model_fn(denoise, cond, uncond, 3.0)(x, 0),
                               5 * x + 3.0 * (2 * x - 5 * x))


def test_guidance_rescale_and_two_pass_guidance():
    def denoise(x, t, context, mask):
        return x * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = (torch.full((2, 3, 4), 2.0), torch.ones(2, 3, dtype=torch.bool))
    uncond = (torch.full((2, 3, 4), 0.5), torch.ones(2, 3, dtype=torch.bool))
    plain = guided_model_fn(denoise, cond, uncond, 5.0)(x, 0)
    torch.testing.assert_close(guided_model_fn(denoise, cond, uncond, 5.0, batched=False)(x, 0),
                               plain)
    full = guided_model_fn(denoise, cond, uncond, 5.0, guidance_rescale=1.0)(x, 0)
    dims = (1, 2, 3)
    torch.testing.assert_close(full.std(dim=dims), (2 * x).std(dim=dims))  # cond's spread
    half = guided_model_fn(denoise, cond, uncond, 5.0, guidance_rescale=0.5)(x, 0)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)


def test_negative_prompt_changes_the_uncond_branch_only(pipeline):
    seen = []
    forward = pipeline.unet.forward

    def recording(x, t, context, mask):
        seen.append(context.clone())
        return forward(x, t, context, mask)

    pipeline.unet.forward = recording
    try:
        images_of(pipeline, ["a red circle"], [0], num_inference_steps=1)
        images_of(pipeline, ["a red circle"], [0], num_inference_steps=1,
                  negative_prompt="a blue square")
    finally:
        del pipeline.unet.forward
    plain, negative = seen  # each a batch of [uncond, cond]
    # prompts and negative prompts are cut to the batch's longest (trim_padding), so only the
    # cond branch's real tokens (BOS, 12 bytes, EOS) can be compared
    assert plain.shape[1] == 14 and negative.shape[1] == len("a blue square") + 2
    assert torch.equal(plain[1, :14], negative[1, :14])
    assert not torch.equal(plain[0, :14], negative[0, :14])


# ---- seeds ----

def test_seeds(pipeline):
    a = images_of(pipeline, ["a red circle", "a blue square"], [3, 4])
    b = images_of(pipeline, ["a red circle", "a blue square"], [3, 4])
    c = images_of(pipeline, ["a red circle", "a blue square"], [5, 6])
    assert torch.equal(a, b) and not torch.equal(a, c)
    one_by_one = torch.cat([images_of(pipeline, ["a red circle"], [3]),
                            images_of(pipeline, ["a blue square"], [4])])
    # float32 kernels sum in a batch-size-dependent order (differences ~2e-5 seen here);
    # 1e-4 is 1/40 of one 8-bit level, far below any visible difference
    torch.testing.assert_close(a, one_by_one, rtol=0, atol=1e-4)


def test_generate_runs_under_cpu_bf16_autocast(pipeline, monkeypatch):
    """The README's bf16 sampling: the pipeline inside torch.autocast("cpu", bfloat16) gives
    float32 images close to fp32's but not equal to them (the networks compute in bf16; the
    scheduler's arithmetic stays float32).

    On CPUs without native bf16 the UNet would fall back to fp32 under autocast
    (UNet.fp32_when_cpu_autocast_is_slow) and this would compare fp32 with fp32; the fallback
    is switched off here so the bf16 path runs (emulated there: slow, but this model is tiny)
    on every CPU."""
    unet = pipeline.unet.unet
    monkeypatch.setattr(type(unet), "fp32_when_cpu_autocast_is_slow", False)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ref = images_of(pipeline, prompts, seeds, sampler="ddim")
    seen = []  # the dtype the UNet's layers computed in
    hook = unet.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = images_of(pipeline, prompts, seeds, sampler="ddim")
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert out.dtype == torch.float32 and out.shape == ref.shape and torch.isfinite(out).all()
    other_seeds = images_of(pipeline, prompts, [5, 6], sampler="ddim")
    rounding = ((out - ref).norm() / ref.norm()).item()
    another_image = ((other_seeds - ref).norm() / ref.norm()).item()
    # bf16 keeps 8 significant bits (relative rounding 2**-9 = 0.002 per operation). With both
    # networks in bf16 it moves this randomised (chaotic) model's images by a few percent
    # (measured: 0.045 emulated, 0.04 native); with the UNet's fp32 fallback only the text
    # encoder rounds (0.0035), and an fp32 run repeats the images exactly. Other noise,
    # prompts or a broken path give another image (0.98 here).
    assert 0.01 < rounding < 0.2 * another_image, (rounding, another_image)


STOCHASTIC = [("ddpm", None), ("euler_ancestral", None), ("ddim", 1.0)]


@pytest.mark.parametrize("sampler, eta", STOCHASTIC)
def test_a_seed_fixes_its_image_with_the_stochastic_samplers(pipeline, sampler, eta):
    """Each image draws its start AND step noise from its own seed, so a batch equals the
    same (prompt, seed) pairs made one at a time. (Bitwise where measured, on a 2-core AVX2
    CPU; the tolerance is test_seeds' allowance for batch-size-dependent float32 kernels. A
    shared step-noise generator gives differences of order 1.)"""
    prompts, seeds = ["a red circle", "a blue square", "a green cross"], [5, 6, 7]
    kw = dict(sampler=sampler, eta=eta)
    batch = images_of(pipeline, prompts, seeds, **kw)
    one_by_one = torch.cat([images_of(pipeline, [p], [s], **kw) for p, s in zip(prompts, seeds)])
    torch.testing.assert_close(batch, one_by_one, rtol=0, atol=1e-4)


def test_evaluate_images_do_not_depend_on_the_batch_size(pipeline):
    """sampling.evaluate scores the same images whatever --batch-size is (DDPM sampling)."""
    kw = dict(sampler="ddpm", num_inference_steps=2, guidance_scale=3.0)
    whole, prompts = sample_all_captions(pipeline, 1, batch_size=24, **kw)
    pieces, same_prompts = sample_all_captions(pipeline, 1, batch_size=5, **kw)
    assert prompts == same_prompts and whole.shape[0] == 24
    # float32 kernels sum in a batch-size-dependent order (1.4e-4 seen here); 5e-4 is 1/8 of an
    # 8-bit level, while a step-noise generator shared by the batch changes images by ~1
    torch.testing.assert_close(pieces, whole, rtol=0, atol=5e-4)


def test_generate_image_returns_pil_images(pipeline):
    image = pipeline.generate_image("a red circle", num_inference_steps=2, seed=0)
    assert isinstance(image, Image.Image) and image.size == (16, 16)
    many = pipeline.generate_image("a red circle", num_inference_steps=2, seed=0, num_images=2,
                                   width=32, height=16)
    assert len(many) == 2 and many[0].size == (32, 16)
    assert pipeline.generate_image("a red circle", num_inference_steps=2, seed=0).tobytes() == \
        image.tobytes()


# ---- image-to-image ----

def init_image(size=16):
    g = torch.Generator().manual_seed(7)
    return torch.rand(1, 3, size, size, generator=g) * 2 - 1


def test_img2img_strength_zero_returns_the_input(pipeline):
    init = init_image()
    out = images_of(pipeline, ["a red circle"], [0], init_images=init, strength=0.0)
    torch.testing.assert_close(out, (init + 1) / 2)


def test_img2img_strength_one_ignores_the_input(pipeline):
    out = images_of(pipeline, ["a red circle"], [0], init_images=init_image(), strength=1.0)
    torch.testing.assert_close(out, images_of(pipeline, ["a red circle"], [0]))


def test_img2img_runs_the_remaining_steps_from_the_right_noise_level(pipeline):
    """The input is noised to exactly the first timestep then denoised (not one step off),
    with the noise of its seed (3: conftest seeds the global RNG with 0, which would match)."""
    n, strength = 10, 0.5
    calls = []
    forward = pipeline.unet.forward

    def recording(x, t, context, mask):
        calls.append((int(torch.as_tensor(t).reshape(-1)[0]), x[:1].clone()))
        return forward(x, t, context, mask)

    init = init_image()
    pipeline.unet.forward = recording
    try:
        images_of(pipeline, ["a red circle"], [3], init_images=init, strength=strength,
                  num_inference_steps=n)
    finally:
        del pipeline.unet.forward
    pipeline.scheduler.set_timesteps(n)
    remaining = pipeline.scheduler.timesteps[n - 5:].tolist()
    assert [t for t, _ in calls] == remaining  # 5 of 10 steps, the last five
    noise = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(3))
    expected_first = pipeline.scheduler.add_noise(init, remaining[0], noise=noise)
    torch.testing.assert_close(calls[0][1], expected_first)


def test_settings_left_out_come_from_the_config():
    """generate_image and generate_variations take num_inference_steps and guidance_scale
    from the config when not given (the guide's config has 50 and 7.5): here 3 steps and
    guidance 1, i.e. 3 forwards of the conditional batch alone."""
    config = tiny_config(num_inference_steps=3, guidance_scale=1.0)
    pipe = AdvancedDiffusionPipeline(config)
    batches = record_batch_sizes(pipe)
    pipe.generate_image("a red circle", seed=0)
    assert batches == [1, 1, 1]
    batches.clear()
    pipe.generate_variations(Image.new("RGB", (16, 16)), "a red circle", strength=1.0, seed=0)
    assert batches == [1, 1, 1]
    assert pipe.settings() == {"num_inference_steps": 3, "guidance_scale": 1.0,
                               "sampler": "ddim", "eta": 0.0, "guidance_rescale": 0.0}


def test_generate_variations_accepts_a_path_and_resizes(pipeline, tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (40, 24), (255, 0, 0)).save(path)
    out = pipeline.generate_variations(str(path), "a red circle", num_inference_steps=4,
                                       strength=0.0, seed=0)
    assert out.size == (16, 16) and out.getpixel((8, 8)) == (255, 0, 0)


# ---- memory toggles ----

def test_memory_toggles_give_the_same_images():
    config = tiny_config(num_inference_steps=3)
    torch.manual_seed(0)
    unet = randomised(AdvancedUNet(config), 1)
    text = randomised(TextEncoder.from_config(config), 2)
    base = AdvancedDiffusionPipeline(config, unet, text)
    reference = images_of(base, ["a red circle"], [0])
    base.enable_attention_slicing(1)
    with pytest.warns(UserWarning, match="xformers is not a dependency"):
        base.enable_xformers_memory_efficient_attention()
    base.enable_sequential_guidance()
    with pytest.warns(UserWarning, match="pixel space"):
        base.enable_vae_slicing()
    with pytest.warns(UserWarning, match="nothing to offload"):
        base.enable_model_cpu_offload()
    # sequential guidance halves the forward's batch, and float32 kernels sum in a
    # batch-size-dependent order (~1e-4 seen here after 3 guided steps); 5e-4 is 1/8 of an
    # 8-bit level, so the saved images are the same
    torch.testing.assert_close(images_of(base, ["a red circle"], [0]), reference,
                               rtol=0, atol=5e-4)


# ---- the modes of the modules it is given ----

def test_generation_runs_in_eval_mode_and_gives_the_modules_back_in_their_mode():
    """A unet and text encoder given in train mode (the trainer's, drawing a sample grid) are
    in eval mode while generating only: with dropout 0.5, two generations with the same seed
    agree, and afterwards every submodule has its own mode back, also after an exception.
    Modules the pipeline builds itself are in eval mode."""
    config = tiny_config(num_inference_steps=2, dropout=0.5)
    torch.manual_seed(0)
    unet = randomised(AdvancedUNet(config), 1).train()
    text_encoder = randomised(TextEncoder.from_config(config), 2).train()
    text_encoder.token_embedding.eval()  # a submodule in a mode of its own stays in it
    x, t, context = torch.randn(1, 3, 16, 16), torch.tensor([500]), torch.randn(1, 4, 32)
    with torch.no_grad():  # dropout 0.5 does change the UNet's output in train mode
        assert not torch.equal(unet(x, t, context)["sample"], unet(x, t, context)["sample"])

    def modes():  # every submodule's mode
        return [m.training for m in [*unet.modules(), *text_encoder.modules()]]

    before = modes()
    assert any(before) and not all(before)
    pipe = AdvancedDiffusionPipeline(config, unet, text_encoder)
    seen = []

    def record(i, t, x):
        seen.append(any(modes()))

    first = pipe.generate(["a red circle"], [0], callback=record)
    assert seen == [False, False]  # every step ran with dropout off
    assert torch.equal(pipe.generate(["a red circle"], [0]), first)
    assert modes() == before

    def stop(i, t, x):
        raise RuntimeError("stopped mid-generation")

    with pytest.raises(RuntimeError, match="stopped mid-generation"):
        pipe.generate(["a red circle"], [0], callback=stop)
    assert modes() == before
    built = AdvancedDiffusionPipeline(config)
    assert not built.unet.training and not built.text_encoder.training


# ---- errors ----

@pytest.mark.parametrize("kwargs, message", [
    (dict(width=17), r"width=17 must be a positive multiple of the network's total "
                     r"downsampling 2"),
    (dict(height=0), r"height=0 must be a positive multiple"),
    (dict(num_inference_steps=0), r"num_inference_steps=0 is out of range; allowed: 1 <= "),
    (dict(num_inference_steps=1001), r"num_inference_steps=1001"),
    (dict(sampler="heun"), r"sampler='heun' is not one of \['ddpm', 'ddim'"),
    (dict(init_images=torch.zeros(1, 3, 16, 16), strength=1.5),
     r"strength=1.5 must lie in \[0, 1\]"),
])
def test_bad_generation_arguments(pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        images_of(pipeline, ["a red circle"], [0], **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    # per-call settings are held to the config fields' own checks (DiffusionConfig)
    (dict(guidance_rescale=5.0), ValueError,
     r"guidance_rescale=5.0 is out of range; allowed: 0.0 <= guidance_rescale <= 1.0"),
    (dict(guidance_scale=-4.0), ValueError,
     r"guidance_scale=-4.0 is out of range; allowed: 0.0 <= guidance_scale"),
    (dict(eta=-1.0), ValueError, r"eta=-1.0 is out of range; allowed: 0.0 <= eta"),
    (dict(eta="x"), TypeError, r"eta='x' must be float"),
    (dict(num_inference_steps=2.5), TypeError, r"num_inference_steps=2.5 must be int"),
    (dict(sampler=""), ValueError, r"sampler='' is not one of \['ddpm', 'ddim'"),
])
def test_per_call_settings_are_validated_like_the_config(pipeline, kwargs, error, message):
    with pytest.raises(error, match=message):
        images_of(pipeline, ["a red circle"], [0], **kwargs)
    with pytest.raises(error, match=message):
        pipeline.settings(**kwargs)


@pytest.mark.parametrize("prompts, init, kwargs, message", [
    (["a red circle"], torch.zeros(1, 3, 8, 8), {},
     r"init_images has shape \(1, 3, 8, 8\); expected \(1, 3, 16, 16\): one "
     r"\(channels=3, height=16, width=16\) image per prompt, 1 prompts"),
    (["a red circle"], torch.zeros(1, 3, 16, 16), dict(height=32),
     r"init_images has shape \(1, 3, 16, 16\); expected \(1, 3, 32, 16\).*height=32"),
    (["a red circle", "a blue square"], torch.zeros(1, 3, 16, 16), dict(strength=0.0),
     r"init_images has shape \(1, 3, 16, 16\); expected \(2, 3, 16, 16\)"),
    (["a red circle"], torch.zeros(3, 16, 16), {},
     r"init_images has shape \(3, 16, 16\); expected \(1, 3, 16, 16\)"),
    (["a red circle"], torch.zeros(1, 1, 16, 16), {},
     r"init_images has shape \(1, 1, 16, 16\); expected \(1, 3, 16, 16\)"),
    ([], None, dict(strength=1.0), r"prompts is empty; pass at least one prompt"),
    (["a red circle"], None, {},
     r"strength=0.5 is for image-to-image; pass init_images \(or leave strength at 1\)"),
    (["a red circle"], torch.full((1, 3, 16, 16), float("nan")), {},
     r"init_images contains NaN or Inf"),
    (["a red circle"], torch.full((1, 3, 16, 16), 255.0), {},  # a [0, 255] image
     r"init_images must lie in \[-1, 1\]; got values in \[255, 255\]"),
])
def test_bad_init_images_and_prompts(pipeline, prompts, init, kwargs, message):
    kwargs = {"strength": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        images_of(pipeline, prompts, list(range(len(prompts))), init_images=init, **kwargs)


def test_documented_pipeline_errors(pipeline, tmp_path):
    with pytest.raises(TypeError, match=r"config must be a DiffusionConfig; got dict"):
        AdvancedDiffusionPipeline({"sample_size": 16})
    for init, got in (([[0.0]], "list"), (torch.zeros(1, 3, 16, 16, dtype=torch.uint8),
                                          "a tensor of dtype torch.uint8")):
        with pytest.raises(TypeError, match=r"init_images must be a floating-point tensor of "
                                            rf"shape \(1, 3, 16, 16\) in \[-1, 1\]; got {got}"):
            images_of(pipeline, ["a red circle"], [0], init_images=init, strength=0.5)
    with pytest.raises(ValueError, match=r"got 2 prompts but 1 seeds"):
        images_of(pipeline, ["a red circle", "a blue square"], [0])
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=rf"image path '{missing}' does not exist"):
        pipeline.generate_variations(missing, "a red circle", seed=0)
    with pytest.raises(TypeError, match=r"image must be a PIL image or a path; got int"):
        pipeline.generate_variations(42, "a red circle", seed=0)
    for call in (lambda: pipeline.generate_image("a red circle", num_images=0),
                 lambda: pipeline.generate_variations(Image.new("RGB", (16, 16)), "a red circle",
                                                      num_images=0)):
        with pytest.raises(ValueError, match=r"num_images=0 must be a positive int"):
            call()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(seed=2**70), ValueError,
     r"seed=1180591620717411303424 is out of range; allowed: 0 <= seed <= 9223372036854775807$"),
    (dict(seed=-1), ValueError, r"seed=-1 is out of range; allowed: 0 <= seed <= "),
    (dict(seed=MAX_SEED, num_images=2), ValueError,
     r"seed=9223372036854775807 is out of range; allowed: 0 <= seed <= 9223372036854775806 "
     r"\(image i of 2 uses seed \+ i, at most 2\*\*63 - 1\)"),
    (dict(seed="3"), TypeError, r"seed='3' must be int"),
    (dict(seed=1.5), TypeError, r"seed=1.5 must be int"),
    (dict(seed=True), TypeError, r"seed=True must be int"),
    (dict(generator=5), TypeError, r"generator must be a torch.Generator or None; got int"),
    (dict(negative_prompt=["x", "y"]), TypeError,
     r"negative_prompt must be a str or None \(one negative prompt for the whole batch\); "
     r"got list"),
])
def test_seed_generator_and_negative_prompt_errors(pipeline, kwargs, error, message):
    """Checked in both public methods before anything is sampled (a seed past 2**63 - 1 used
    to fail inside torch, a str seed with a str + int TypeError, 1.5 was truncated)."""
    image = Image.new("RGB", (16, 16))
    with pytest.raises(error, match=message):
        pipeline.generate_image("a red circle", **kwargs)
    with pytest.raises(error, match=message):
        pipeline.generate_variations(image, "a red circle", **kwargs)


def test_seeds_reach_2_63_minus_1(pipeline):
    """Image i uses seed + i, each at most 2**63 - 1 (torch's limit): the last seeds work and
    one past them is refused before sampling; a generator still draws the seed."""
    kw = dict(num_inference_steps=1, guidance_scale=3.0)
    assert len(pipeline.generate_image("a red circle", seed=MAX_SEED - 1, num_images=2,
                                       **kw)) == 2
    with pytest.raises(ValueError, match=r"seed=9223372036854775807 is out of range"):
        pipeline.generate_image("a red circle", seed=MAX_SEED, num_images=2, **kw)
    drawn, again = (pipeline.generate_image("a red circle", **kw,
                                            generator=torch.Generator().manual_seed(4))
                    for _ in range(2))
    assert drawn.tobytes() == again.tobytes()


@pytest.mark.parametrize("call, error, message", [
    (lambda p: p.generate_image(None), TypeError,
     r"prompt must be a str or a list of str; got NoneType"),
    (lambda p: p.generate_image(["a red circle", 3]), TypeError,
     r"prompt must be a str or a list of str; got a list holding int 3"),
    (lambda p: p.generate_image([]), ValueError,
     r"prompt is an empty list; pass at least one prompt"),
    (lambda p: p.generate("a red circle", [0]), TypeError,
     r"prompts must be a list of str; got str"),
    (lambda p: p.generate(["a red circle"], 0), TypeError, r"seeds must be a list of int; got int"),
    (lambda p: p.generate(["a red circle"], [-1]), ValueError,
     r"seeds\[0\]=-1 is out of range; allowed: 0 <= seeds\[0\] <= 9223372036854775807"),
    (lambda p: p.generate(["a red circle"], [0.5]), TypeError, r"seeds\[0\]=0.5 must be int"),
    (lambda p: p.generate(["a red circle"], [0], negative_prompt=["x"]), TypeError,
     r"negative_prompt must be a str or None"),
])
def test_prompt_and_seed_errors_name_the_argument(pipeline, call, error, message):
    with pytest.raises(error, match=message):
        call(pipeline)


def test_guidance_rescale_is_a_per_call_setting_of_every_method(pipeline):
    kw = dict(num_inference_steps=2, guidance_scale=5.0, seed=3)
    plain = pipeline.generate_image("a red circle", **kw)
    rescaled = pipeline.generate_image("a red circle", guidance_rescale=1.0, **kw)
    expected = to_pil(pipeline.generate(["a red circle"], [3], num_inference_steps=2,
                                        guidance_scale=5.0, guidance_rescale=1.0)[0])
    assert rescaled.tobytes() == expected.tobytes() != plain.tobytes()
    image = Image.new("RGB", (16, 16), (40, 90, 200))
    varied = pipeline.generate_variations(image, "a red circle", strength=1.0,
                                          guidance_rescale=1.0, **kw)
    assert varied.tobytes() == rescaled.tobytes()  # strength 1 is plain text-to-image
    with pytest.raises(ValueError, match=r"guidance_rescale=2.0 is out of range"):
        pipeline.generate_variations(image, "a red circle", guidance_rescale=2.0, seed=0)


def test_pipeline_refuses_modules_built_from_another_config():
    """A UNet or text encoder of another config failed at the first forward with an error
    about encoder_hidden_states, and a scheduler of another config sampled a v-prediction
    model as epsilon; the pipeline now names the fields that differ."""
    config = tiny_config()
    with pytest.raises(ValueError, match=r"the unet, text_encoder or scheduler was built with "
                                         r"another config than the pipeline's: context_dim: "
                                         r"unet 16 vs "
                                         r"config 32; pass the config they were built with"):
        AdvancedDiffusionPipeline(config, unet=AdvancedUNet(tiny_config(context_dim=16)))
    with pytest.raises(ValueError, match=r"model_channels: unet 32 vs config 16; "
                                         r"prediction_type: unet 'v_prediction' vs config "
                                         r"'epsilon'"):
        AdvancedDiffusionPipeline(config, unet=AdvancedUNet(tiny_config(
            model_channels=32, prediction_type="v_prediction", v_prediction=True)))
    other_text = TextEncoder.from_config(tiny_config(text_encoder_layers=2, max_text_length=40))
    with pytest.raises(ValueError, match=r"text_encoder_layers: text_encoder 2 vs config 1; "
                                         r"max_text_length: text_encoder 40 vs config 77"):
        AdvancedDiffusionPipeline(config, text_encoder=other_text)
    other_scheduler = AdvancedScheduler(tiny_config(prediction_type="v_prediction",
                                                    num_train_timesteps=50))
    with pytest.raises(ValueError, match=r"num_train_timesteps: scheduler 50 vs config 1000.*"
                                         r"prediction_type: scheduler 'v_prediction' vs "
                                         r"config 'epsilon'"):
        AdvancedDiffusionPipeline(config, scheduler=other_scheduler)
    AdvancedDiffusionPipeline(config, AdvancedUNet(config), TextEncoder.from_config(config),
                              AdvancedScheduler(config.with_overrides({"sampler": "ddpm",
                                                                       "clip_sample": False})))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_a_clear_error(tmp_path):
    """Checked before the checkpoint loads: a missing file is not even looked at."""
    with pytest.raises(ValueError, match=r"device='cuda': this machine has no CUDA GPU"):
        AdvancedDiffusionPipeline.from_checkpoint(tmp_path / "missing.pt", device="cuda")
    with pytest.raises(ValueError, match=r"device='cuda:0': this machine has no CUDA GPU"):
        AdvancedDiffusionPipeline(tiny_config(), device=torch.device("cuda:0"))
    with pytest.raises(ValueError, match=r"device='gpu' is not a device"):
        AdvancedDiffusionPipeline(tiny_config(), device="gpu")


def test_generate_variations_image_path_errors(pipeline, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=rf"image path '{tmp_path}' is a folder, not an image"):
        pipeline.generate_variations(tmp_path, "a red circle", seed=0)
    with pytest.raises(ValueError, match=rf"image path '{tmp_path / 'notes.png'}' cannot be "
                                         rf"read as an image: cannot identify image file"):
        pipeline.generate_variations(tmp_path / "notes.png", "a red circle", seed=0)


def test_num_denoising_steps_counts_the_img2img_tail(pipeline):
    assert pipeline.num_denoising_steps(10) == 10
    assert pipeline.num_denoising_steps(10, strength=0.6) == 6
    assert pipeline.num_denoising_steps(strength=0.5) == 2  # the config's 4 steps
    assert pipeline.num_denoising_steps(10, strength=0.0) == 0


def test_from_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        AdvancedDiffusionPipeline.from_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a plain-tensor"):
        AdvancedDiffusionPipeline.from_checkpoint(tmp_path / "notes.pt")


def test_an_unconditional_unet_trains_saves_and_samples(tmp_path):
    """use_spatial_transformer=False builds a UNet without cross-attention. The trainer and
    the pipeline passed it text states anyway, and both failed at the first step; now the
    trainer freezes the unused text encoder (so the EMA skips it too) and the pipeline samples
    without text, saying once that prompts and guidance have no effect."""
    config = tiny_config(use_spatial_transformer=False, use_ema=True, ema_decay=0.5)
    torch.manual_seed(0)
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config)
    text_before = [p.clone() for p in trainer.text_encoder.parameters()]
    unet_before = [p.clone() for p in trainer.model.parameters()]
    batch = {"images": torch.rand(2, 3, 16, 16) * 2 - 1, "prompts": ["a red circle", ""]}
    for _ in range(2):
        assert torch.isfinite(torch.tensor(trainer.train_step(batch)["loss"]))
    assert not any(p.requires_grad for p in trainer.text_encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(text_before, trainer.text_encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(unet_before, trainer.model.parameters()))
    path = trainer.save_checkpoint(tmp_path / "uncond.pt")
    pipe = AdvancedDiffusionPipeline.from_checkpoint(path)  # EMA weights (no text encoder)
    shadow = trainer.ema.shadow["unet.unet.conv_in.weight"]
    assert torch.equal(dict(pipe.unet.named_parameters())["unet.conv_in.weight"], shadow)
    with pytest.warns(UserWarning, match=r"no cross-attention \(use_spatial_transformer=False\)"
                                         r": it is unconditional"):
        images = pipe.generate(["a red circle", "a blue square"], [5, 5], guidance_scale=3.0,
                               num_inference_steps=2)
    assert torch.equal(images[0], images[1])  # same seed: the prompt changes nothing


def test_a_png_with_a_broken_chunk_is_a_clear_error(tmp_path):
    """PIL raises SyntaxError for a broken chunk, which open_image let through (a traceback)."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "PNG")  # 192 KB: several IDAT chunks
    data = bytearray(buffer.getvalue())
    chunk = data.find(b"IDAT", data.find(b"IDAT") + 4)
    data[chunk:chunk + 4] = b"\0\1\2\3"  # the second chunk's type: the header still reads
    (tmp_path / "broken.png").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"--init-image '.*broken.png' cannot be read as an "
                                         r"image: broken PNG file"):
        open_image(tmp_path / "broken.png", "--init-image")


def test_16_bit_init_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (mode I;16) went through convert('RGB'), which clips at 255: mid-grey came
    out white (+1). It is scaled like the training data now."""
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "grey16.png")
    image = open_image(tmp_path / "grey16.png", "image")
    assert image.mode.startswith("I;16")
    for channels in (1, 2, 3, 4):
        x = from_pil(image, channels)
        assert x.shape == (1, channels, 16, 16)
        colour = 1 if channels < 3 else 3
        grey = torch.full_like(x[:, :colour], 32768 / 65535 * 2 - 1)
        torch.testing.assert_close(x[:, :colour], grey)
        assert (x[:, colour:] == 1).all()  # alpha: opaque
    pipe = AdvancedDiffusionPipeline(tiny_config())
    out = pipe.generate_variations(tmp_path / "grey16.png", "a red circle", strength=0.0, seed=0)
    assert (np.asarray(out) == 128).all()  # strength 0 returns the input


def test_from_checkpoint_without_ema_weights_warns(tmp_path):
    config = tiny_config(use_ema=False)
    path = AdvancedDiffusionTrainer(AdvancedUNet(config), config).save_checkpoint(
        tmp_path / "no_ema.pt")
    with pytest.warns(UserWarning, match=r"no_ema.pt: the checkpoint has no EMA weights"):
        AdvancedDiffusionPipeline.from_checkpoint(path)


@pytest.mark.parametrize("channels, mode", [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
def test_images_of_one_to_four_channels_are_pil_images(channels, mode):
    """2- and 4-channel models used to fail in generate_variations with a reshape error and
    lose their last channel in generate_image; they map to LA and RGBA now."""
    x = torch.rand(channels, 3, 5, generator=torch.Generator().manual_seed(channels))
    image = to_pil(x)
    assert image.mode == mode and image.size == (5, 3)
    expected = (x * 255).round() / 255 * 2 - 1
    torch.testing.assert_close(from_pil(image, channels), expected[None], atol=1e-6, rtol=0)
    config = tiny_config(in_channels=channels, out_channels=channels)
    pipe = AdvancedDiffusionPipeline(config)
    out = pipe.generate_variations(image.resize((16, 16)), "a red circle", strength=0.5,
                                   num_inference_steps=2, seed=0)
    assert out.mode == mode and out.size == (16, 16)


def test_more_than_four_channels_are_not_pil_images():
    pipe = AdvancedDiffusionPipeline(tiny_config(in_channels=5, out_channels=5))
    message = r"in_channels=5 images cannot be PIL images \(allowed: 1 to 4 channels"
    with pytest.raises(ValueError, match=message):
        pipe.generate_image("a red circle", num_inference_steps=1, seed=0)
    with pytest.raises(ValueError, match=message):
        pipe.generate_variations(Image.new("RGB", (16, 16)), "a red circle", seed=0)
    assert pipe.generate(["a red circle"], [0], num_inference_steps=1).shape == (1, 5, 16, 16)


def test_strength_accepts_any_real_number(pipeline):
    """numpy and one-element tensor strengths were refused as 'not a number in [0, 1]'."""
    init = torch.zeros(1, 3, 16, 16)
    expected = images_of(pipeline, ["a red circle"], [0], init_images=init, strength=0.5)
    for strength in (np.float32(0.5), torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float64)):
        torch.testing.assert_close(images_of(pipeline, ["a red circle"], [0], init_images=init,
                                             strength=strength), expected, atol=0, rtol=0)
    for strength in ("0.5", None, torch.tensor([0.5, 0.5])):
        with pytest.raises(TypeError, match=r"strength must be a real number in \[0, 1\]"):
            images_of(pipeline, ["a red circle"], [0], init_images=init, strength=strength)
    with pytest.raises(ValueError, match=r"strength=nan must lie in \[0, 1\]"):
        images_of(pipeline, ["a red circle"], [0], init_images=init, strength=float("nan"))


# ---- sample.py on a trained checkpoint ----

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 20-step train.py run of the tiny configuration."""
    folder = tmp_path_factory.mktemp("trained")
    config = tiny_config(output_dir=str(folder / "run"), max_steps=20, save_every=20,
                         sample_every=1000, use_ema=True, ema_decay=0.9)
    config.to_yaml(folder / "tiny.yaml")
    result = subprocess.run([sys.executable, "train.py", "--config", str(folder / "tiny.yaml")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run" / "last.pt"


def sample_cli(*args):
    return subprocess.run([sys.executable, "sample.py", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_sample_script_grid_and_folder(checkpoint, tmp_path):
    grid = tmp_path / "grid.png"
    result = sample_cli("--checkpoint", checkpoint, "--prompt", "a red circle",
                        "--num-images", 3, "--steps", 4, "--out", grid)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(grid).size[0] >= 3 * 32
    folder = tmp_path / "images"
    result = sample_cli("--checkpoint", checkpoint, "--prompt", "a blue square",
                        "--num-images", 2, "--steps", 4, "--seed", 5, "--sampler", "ddpm",
                        "--out", folder)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [(m["file_name"], m["text"], m["seed"], m["sampler"]) for m in lines] == \
        [("0000.png", "a blue square", 5, "ddpm"), ("0001.png", "a blue square", 6, "ddpm")]
    assert Image.open(folder / "0001.png").size == (16, 16)


def test_sample_script_img2img_and_errors(checkpoint, tmp_path):
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "in.png")
    result = sample_cli("--checkpoint", checkpoint, "--prompt", "a green square", "--steps", 4,
                        "--init-image", tmp_path / "in.png", "--strength", 0.0,
                        "--out", tmp_path / "same")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "same" / "0000.png").getpixel((3, 3)) == (0, 255, 0)
    bad = sample_cli("--checkpoint", tmp_path / "nope.pt", "--prompt", "x", "--out", tmp_path)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    bad = sample_cli("--checkpoint", checkpoint, "--prompt", "x", "--strength", 2.0,
                     "--init-image", tmp_path / "in.png", "--out", tmp_path / "o.png")
    assert bad.returncode != 0 and "strength=2.0" in bad.stderr


def script_error(module, monkeypatch, capsys, *args) -> str:
    """Run a script's main(args) in this process; return what it exited with (the one-line
    message sys.exit prints, or argparse's usage error)."""
    monkeypatch.setattr(module, "keep_freed_memory", lambda: True)  # process-wide: skip it
    with pytest.raises(SystemExit) as info:
        module.main([str(a) for a in args])
    code = info.value.code
    return code if isinstance(code, str) else capsys.readouterr().err


def test_sample_script_errors_are_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    base = ("--checkpoint", checkpoint, "--prompt", "a red circle", "--out", tmp_path / "o")
    missing = tmp_path / "missing.png"
    assert script_error(sample_script, monkeypatch, capsys, *base, "--init-image", missing) == \
        f"sample.py: --init-image {str(missing)!r} does not exist"
    for flags, message in [
        (("--guidance-rescale", 5), "sample.py: guidance_rescale=5.0 is out of range; allowed: "
                                    "0.0 <= guidance_rescale <= 1.0"),
        (("--guidance-scale", -4), "sample.py: guidance_scale=-4.0 is out of range"),
        (("--eta", -1), "sample.py: eta=-1.0 is out of range"),
        (("--steps", 0), "sample.py: num_inference_steps=0 is out of range"),
    ]:
        assert script_error(sample_script, monkeypatch, capsys, *base, *flags) \
            .startswith(message), flags
    assert "--num-images: 0 must be a positive int" in \
        script_error(sample_script, monkeypatch, capsys, *base, "--num-images", 0)
    assert not (tmp_path / "o").exists()


def test_sample_script_checks_its_arguments_before_loading(tmp_path, monkeypatch, capsys):
    """Bad --out, --seed, --init-image and --strength are one-line errors raised before the
    checkpoint loads (the checkpoint here does not exist, and that error never comes), so
    before anything is sampled; nothing is created."""
    afile, folder = tmp_path / "afile", tmp_path / "folder.png"
    afile.write_text("not an image")
    folder.mkdir()
    base = ("--checkpoint", tmp_path / "missing.pt", "--prompt", "a red circle")
    for flags, message in [
        (("--out", afile), f"--out {str(afile)!r} is an existing file, not a folder"),
        (("--out", afile / "x.png"),
         f"--out {str(afile / 'x.png')!r} is under {str(afile)!r}, which is a file, not a folder"),
        (("--out", afile / "sub" / "images"), f"--out {str(afile / 'sub' / 'images')!r} is "
                                              f"under {str(afile)!r}, which is a file"),
        (("--out", folder), f"--out {str(folder)!r} is an existing folder, not a file"),
        (("--seed", 99999999999999999999, "--out", tmp_path / "o"),
         "seed=99999999999999999999 is out of range; allowed: 0 <= seed <= 9223372036854775807"),
        (("--seed", -1, "--out", tmp_path / "o"), "seed=-1 is out of range; allowed: 0 <= seed"),
        (("--seed", MAX_SEED, "--num-images", 3, "--out", tmp_path / "o"),
         "seed=9223372036854775807 is out of range; allowed: 0 <= seed <= 9223372036854775805 "
         "(image i of 3 uses seed + i, at most 2**63 - 1)"),
        (("--init-image", afile, "--out", tmp_path / "o"),
         f"--init-image {str(afile)!r} cannot be read as an image: cannot identify image file"),
        (("--init-image", tmp_path, "--out", tmp_path / "o"),
         f"--init-image {str(tmp_path)!r} is a folder, not an image file"),
        (("--strength", 0.3, "--out", tmp_path / "o"),
         "--strength 0.3 is for image-to-image; it needs --init-image"),
        (("--strength", 0, "--out", tmp_path / "o"),
         "--strength 0.0 is for image-to-image; it needs --init-image"),
    ]:
        assert script_error(sample_script, monkeypatch, capsys, *base, *flags) \
            .startswith(f"sample.py: {message}"), flags
    assert not (tmp_path / "o").exists()


def unmakeable(folder: str, out: str | None = None) -> str:
    """The error for an output under /proc, where no folder can be made: as root the access
    check passes and mkdir fails; otherwise /proc is not writable."""
    if os.access("/proc", os.W_OK | os.X_OK):
        return f": cannot create the folder {folder!r} (No such file or directory)"
    return f" {out or folder!r}: the folder '/proc' is not writable"


def test_sample_script_output_folder_errors(checkpoint, tmp_path, monkeypatch, capsys):
    """The output folder is made before sampling starts (an unwritable place fails then, not
    after all the sampling), and a write that fails at the end is one line too."""
    monkeypatch.setattr(sample_script.AdvancedDiffusionPipeline, "generate",
                        lambda *a, **k: pytest.fail("sampled before the output was checked"))
    base = ("--checkpoint", checkpoint, "--prompt", "a red circle", "--steps", 1)
    assert script_error(sample_script, monkeypatch, capsys, *base, "--out", "/proc/no/out") \
        .startswith("sample.py: --out" + unmakeable("/proc/no/out"))
    # os.access: root may write anywhere, so the not-writable check is driven directly
    monkeypatch.setattr(cli_module.os, "access", lambda path, mode: False)
    out = tmp_path / "new" / "grid.png"
    assert script_error(sample_script, monkeypatch, capsys, *base, "--out", out) == \
        f"sample.py: --out {str(out)!r}: the folder {str(tmp_path)!r} is not writable"
    monkeypatch.undo()

    class FullDisk:
        def save(self, path):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample_script, "make_grid", lambda *a, **k: FullDisk())
    assert script_error(sample_script, monkeypatch, capsys, *base, "--out", out) == \
        f"sample.py: cannot write --out {str(out)!r}: [Errno 28] No space left on device"
    assert out.parent.is_dir()  # made before sampling


def test_sample_script_img2img_progress_and_strength(checkpoint, tmp_path, monkeypatch):
    """The progress bar's total is the number of steps image-to-image runs (strength 0.5 of
    10: 5), not num_inference_steps; --strength defaults to 0.8 with --init-image."""
    bars = []

    class Bar:
        def __init__(self, total, desc):
            self.total, self.n = total, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.n += n

    monkeypatch.setattr(sample_script, "Progress", Bar)
    monkeypatch.setattr(sample_script, "keep_freed_memory", lambda: True)
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "in.png")
    common = ("--checkpoint", checkpoint, "--prompt", "a red circle", "--steps", 10,
              "--init-image", tmp_path / "in.png", "--device", "cpu")
    assert sample_script.main([str(a) for a in (*common, "--strength", 0.5,
                                                "--out", tmp_path / "half")]) == 0
    assert sample_script.main([str(a) for a in (*common, "--out", tmp_path / "default")]) == 0
    assert [(bar.total, bar.n) for bar in bars] == [(5, 5), (8, 8)]
    line = json.loads((tmp_path / "default" / "metadata.jsonl").read_text())
    assert line["strength"] == 0.8


def test_sample_script_progress_in_a_log_file_is_plain_lines(checkpoint, tmp_path):
    """With stdout and stderr redirected to a file (nohup, a batch job), the progress is plain
    lines, at the start, after every step and at the end, with no carriage-return redraws."""
    log, out = tmp_path / "sample.log", tmp_path / "grid.png"
    with open(log, "w") as f:
        result = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(checkpoint),
                                 "--prompt", "a red circle", "--steps", "3", "--device", "cpu",
                                 "--out", str(out)], cwd=ROOT, env=ENV, stdout=f,
                                stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = text.splitlines()
    progress = [line for line in lines if line.startswith("sampling ")]
    assert progress[0] == "sampling 0/3 start" and progress[-1].endswith(" end")
    assert [line.split()[1] for line in progress] == ["0/3", "1/3", "2/3", "3/3", "3/3"]
    assert lines[-1] == f"wrote {out}" and out.is_file()


def test_scripts_help_shows_the_defaults(capsys):
    for module in (sample_script, evaluate_script):
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert "--guidance-scale GUIDANCE_SCALE default: the checkpoint config's value" in text
        assert "--steps STEPS num_inference_steps (default: the checkpoint config's value)" in text
    assert "--steps 25" not in evaluate_script.__doc__ and "--steps 50" not in \
        sample_script.__doc__
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--help"])
    assert "say how many images show the prompted colour and shape." in \
        " ".join(capsys.readouterr().out.split())  # the whole first paragraph


def test_sample_script_metadata_seed_remakes_the_image(checkpoint, tmp_path, monkeypatch):
    """With ddpm (fresh noise every step), image 1 of a batch of 3 is the image of its seed
    in metadata.jsonl made alone."""
    monkeypatch.setattr(sample_script, "keep_freed_memory", lambda: True)
    common = ("--checkpoint", checkpoint, "--prompt", "a red circle", "--steps", 4,
              "--sampler", "ddpm", "--device", "cpu")
    assert sample_script.main([str(a) for a in (*common, "--num-images", 3, "--seed", 5,
                                                "--out", tmp_path / "batch")]) == 0
    line = (tmp_path / "batch" / "metadata.jsonl").read_text().splitlines()[1]
    seed = json.loads(line)["seed"]
    assert seed == 6
    assert sample_script.main([str(a) for a in (*common, "--seed", seed,
                                                "--out", tmp_path / "alone")]) == 0
    batch = torch.tensor(list(Image.open(tmp_path / "batch" / "0001.png").tobytes()))
    alone = torch.tensor(list(Image.open(tmp_path / "alone" / "0000.png").tobytes()))
    assert batch.numel() == 16 * 16 * 3
    assert (batch - alone).abs().max().item() <= 1  # 8-bit rounding of float32 kernels


def test_from_checkpoint_uses_ema_weights(checkpoint):
    ema = AdvancedDiffusionPipeline.from_checkpoint(checkpoint)
    raw = AdvancedDiffusionPipeline.from_checkpoint(checkpoint, use_ema=False)
    state = torch.load(checkpoint, weights_only=True)
    name = "unet.unet.conv_in.weight"
    assert torch.equal(dict(ema.unet.named_parameters())["unet.conv_in.weight"],
                       state["ema"]["shadow"][name])
    assert torch.equal(dict(raw.unet.named_parameters())["unet.conv_in.weight"],
                       state["model"]["unet.conv_in.weight"])


# ---- python -m sampling.evaluate ----

def evaluate_cli(*args):
    return subprocess.run([sys.executable, "-m", "sampling.evaluate", *map(str, args)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_evaluate_prints_table_and_json_and_saves_a_grid(checkpoint, tmp_path):
    grid = tmp_path / "grid.png"
    result = evaluate_cli("--checkpoint", checkpoint, "--seeds", 2, "--steps", 2,
                          "--grid", grid, "--grid-seeds", 1, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["adherence", "measured", "chance"]
    assert [line.split()[0] for line in lines[1:4]] == ["colour", "shape", "both"]
    summary = json.loads(lines[-1])
    assert summary["n"] == summary["images"] == 48 and summary["seeds_per_caption"] == 2
    assert summary["chance_both"] == pytest.approx(1 / 24)
    assert 0 <= summary["both"] <= min(summary["colour"], summary["shape"]) <= 1
    # --grid-seeds 1: one seed per caption, one colour per row of 4 shapes
    cells = Image.open(grid).size
    two = tmp_path / "new" / "two.png"  # its folder is made
    assert evaluate_cli("--checkpoint", checkpoint, "--seeds", 2, "--steps", 2,
                        "--grid", two).returncode == 0
    assert Image.open(two).size[0] == 2 * cells[0] and Image.open(two).size[1] == cells[1]


def test_evaluate_controls_and_errors(checkpoint, tmp_path):
    for flag in ("--untrained", "--shuffle-prompts"):
        result = evaluate_cli("--checkpoint", checkpoint, "--seeds", 1, "--steps", 2, flag)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["untrained" if flag == "--untrained" else "shuffle_prompts"] is True
    bad = evaluate_cli("--checkpoint", tmp_path / "nope.pt")
    assert bad.returncode != 0 and "does not exist" in bad.stderr
    bad = evaluate_cli("--checkpoint", checkpoint, "--seeds", 0)
    assert bad.returncode != 0 and "--seeds: 0 must be a positive int" in bad.stderr
    bad = evaluate_cli("--checkpoint", checkpoint, "--device", "gpu")
    assert bad.returncode != 0 and "device='gpu' is not a device" in bad.stderr


def test_evaluate_checks_grid_before_sampling(checkpoint, tmp_path, monkeypatch, capsys):
    """--grid errors come before the checkpoint loads (here a missing one, whose error never
    comes); a grid in a new folder gets the folder, made before sampling."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ("--checkpoint", tmp_path / "missing.pt", "--seeds", 1, "--device", "cpu")
    assert script_error(evaluate_script, monkeypatch, capsys, *base, "--grid", afile) == \
        f"evaluate: --grid {str(afile)!r} must end in .png"
    assert script_error(evaluate_script, monkeypatch, capsys, *base, "--grid",
                        afile / "g.png") == \
        f"evaluate: --grid {str(afile / 'g.png')!r} is under {str(afile)!r}, which is a file, " \
        f"not a folder"
    (tmp_path / "dir.png").mkdir()
    assert script_error(evaluate_script, monkeypatch, capsys, *base, "--grid",
                        tmp_path / "dir.png") == \
        f"evaluate: --grid {str(tmp_path / 'dir.png')!r} is an existing folder, not a file"
    monkeypatch.setattr(evaluate_script, "sample_all_captions",
                        lambda *a, **k: pytest.fail("sampled before the grid was checked"))
    assert script_error(evaluate_script, monkeypatch, capsys, "--checkpoint", checkpoint,
                        "--grid", "/proc/no/grid.png") \
        .startswith("evaluate: --grid" + unmakeable("/proc/no", "/proc/no/grid.png"))


def test_evaluate_errors_are_one_line(checkpoint, monkeypatch, capsys):
    base = ("--checkpoint", checkpoint, "--seeds", 1, "--device", "cpu")
    assert script_error(evaluate_script, monkeypatch, capsys, *base, "--sampler", "heun") \
        .startswith("evaluate: sampler='heun' is not one of ['ddpm', 'ddim'")
    assert script_error(evaluate_script, monkeypatch, capsys, *base, "--steps", 0) \
        .startswith("evaluate: num_inference_steps=0 is out of range")
    assert "--batch-size: 0 must be a positive int" in \
        script_error(evaluate_script, monkeypatch, capsys, *base, "--batch-size", 0)


def test_evaluate_refuses_a_model_that_is_not_rgb_before_sampling(tmp_path, monkeypatch,
                                                                   capsys):
    """A one-channel checkpoint sampled every caption and seed, then crashed in the checker."""
    config = tiny_config(in_channels=1, out_channels=1, dataset="folder", data_dir=str(tmp_path))
    path = AdvancedDiffusionTrainer(AdvancedUNet(config), config).save_checkpoint(
        tmp_path / "grey.pt")
    monkeypatch.setattr(evaluate_script, "sample_all_captions",
                        lambda *a, **k: pytest.fail("sampled before refusing"))
    assert script_error(evaluate_script, monkeypatch, capsys, "--checkpoint", path,
                        "--seeds", 1) == (f"evaluate: the shapes checker scores RGB images; "
                                          f"{path} holds a model of 1-channel images")
    config = tiny_config(dataset="folder", data_dir=str(tmp_path))  # RGB, not shapes: warns
    path = AdvancedDiffusionTrainer(AdvancedUNet(config), config).save_checkpoint(
        tmp_path / "folder.pt")

    def stop(*args, **kwargs):
        raise ValueError("stopped here")

    monkeypatch.setattr(evaluate_script, "sample_all_captions", stop)
    assert script_error(evaluate_script, monkeypatch, capsys, "--checkpoint", path,
                        "--seeds", 1) == "evaluate: stopped here"
    assert (f"evaluate: warning: {path} was trained on dataset='folder'; the score measures "
            f"the shapes captions only") in capsys.readouterr().err


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='gpu' is not a device; use 'cpu', 'cuda'"):
        parse_device("gpu")
    with pytest.raises(ValueError, match="only 'cpu' and 'cuda'"):
        parse_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda': this machine has no CUDA GPU"):
            parse_device("cuda")


# ---- helpers, settings and scripts, pinned by a mutation sweep ----

def test_check_output_path_takes_an_existing_folder_and_checks_its_own_access(tmp_path,
                                                                               monkeypatch):
    """A folder output may already exist; what must be writable is that folder itself."""
    check = cli_module.check_output_path
    assert check(tmp_path, "--out", folder=True) == tmp_path
    monkeypatch.setattr(cli_module.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ValueError, match=rf"the folder '{tmp_path}' is not writable"):
        check(tmp_path, "--out", folder=True)


def test_open_image_refuses_a_truncated_file(tmp_path):
    """The whole image is decoded when opened, so a cut-off PNG fails there, not mid-run."""
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ValueError, match=rf"--init-image '{path}' cannot be read as an image"):
        images_module.open_image(path, "--init-image")


def test_generate_takes_tuples_of_prompts_and_seeds(pipeline):
    as_tuples = images_of(pipeline, ("a red circle",), (0,), num_inference_steps=1)
    assert torch.equal(as_tuples, images_of(pipeline, ["a red circle"], [0],
                                            num_inference_steps=1))


@pytest.mark.parametrize("field, value", [("beta_schedule", "cosine"), ("beta_start", 0.0002),
                                          ("beta_end", 0.03), ("rescale_betas_zero_snr", True)])
def test_pipeline_refuses_a_scheduler_of_another_noise_schedule(field, value):
    """Every SCHEDULE_FIELDS entry is compared, not only the two the test above uses."""
    config = tiny_config(prediction_type="v_prediction", v_prediction=True)
    other = AdvancedScheduler(config.with_overrides({field: value}))
    with pytest.raises(ValueError, match=rf"{field}: scheduler {value!r} vs config"):
        AdvancedDiffusionPipeline(config, scheduler=other)


def test_make_grid_layout():
    """8 columns by default, a partial last row kept, image i at (row i // columns, column
    i % columns); captions add CAPTION_HEIGHT under each cell and widen it to CAPTION_WIDTH."""
    images = torch.zeros(10, 3, 2, 2)
    images[2, 0] = 1  # red
    grid = images_module.make_grid(images)  # cells of 2 * 2 pixels + GRID_PAD 2 = 6
    assert grid.size == (8 * 6, 2 * 6)
    assert grid.getpixel((2 * 6 + 1, 1)) == (255, 0, 0) and grid.getpixel((1, 1)) == (0, 0, 0)
    captioned = images_module.make_grid(images[:3], ["a", "b", "c"], columns=2)
    assert captioned.size == (2 * (96 + 2), 2 * (4 + 12 + 2))


def test_decode_latents_rescales_and_clamps():
    torch.testing.assert_close(pipeline_module.decode_latents(torch.tensor([-3.0, -1, 0, 1, 3])),
                               torch.tensor([0.0, 0, 0.5, 1, 1]))


def test_per_call_guidance_scale_is_used(pipeline):
    """guidance_scale=1 runs the conditional forward alone whatever the config's scale (7.5)."""
    batches = record_batch_sizes(pipeline)
    try:
        images_of(pipeline, ["a red circle"], [0], num_inference_steps=1, guidance_scale=1.0)
        images_of(pipeline, ["a red circle"], [0], num_inference_steps=1, guidance_scale=3.0)
    finally:
        del pipeline.unet.forward
    assert batches == [1, 2]


def test_per_call_sampler_and_eta_are_used(pipeline):
    """sampler='ddpm' and ddim's eta=1 change the images from the config's ddim with eta 0."""
    ddim = images_of(pipeline, ["a red circle"], [0], num_inference_steps=2)
    for kw in (dict(sampler="ddpm"), dict(eta=1.0)):
        other = images_of(pipeline, ["a red circle"], [0], num_inference_steps=2, **kw)
        assert (other - ddim).abs().max() > 0.01, kw


def test_generate_variations_of_a_wide_image_several_times(pipeline):
    """width x height as PIL orders them, num_images copies: strength 0 returns the input."""
    image = Image.new("RGB", (32, 16), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 16))
    out = pipeline.generate_variations(image, "a red circle", strength=0.0, width=32,
                                       height=16, num_images=2, seed=0)
    assert [o.tobytes() for o in out] == [image.tobytes()] * 2


def test_sample_all_captions_pairs_each_caption_with_seeds_0_to_n_minus_1():
    """Caption-major (the grid and the scores rely on it), seeds 0..n-1, in batches."""
    calls = []

    class Recorder:
        def generate(self, prompts, seeds, **kw):
            calls.append((prompts, seeds, kw))
            return torch.tensor(seeds, dtype=torch.float).reshape(-1, 1, 1, 1)

    images, prompts = sample_all_captions(Recorder(), 2, batch_size=5, sampler="ddpm")
    assert prompts == [c for c in all_captions() for _ in range(2)]
    assert [p for call in calls for p in call[0]] == prompts
    assert images.flatten().tolist() == [0, 1] * 24
    assert [len(call[1]) for call in calls] == [5] * 9 + [3]
    assert all(call[2] == {"sampler": "ddpm"} for call in calls)


@pytest.fixture
def fresh_checkpoint(tmp_path):
    """An untrained tiny checkpoint, saved in milliseconds (no train.py run)."""
    config = tiny_config()
    return AdvancedDiffusionTrainer(AdvancedUNet(config), config).save_checkpoint(
        tmp_path / "fresh.pt")


def stub_adherence() -> dict:
    """What shapes_adherence returns, all zero: scores, chance levels and an empty confusion."""
    result = {k: 0.0 for k in ("colour", "shape", "both", "chance_colour", "chance_shape",
                               "chance_both")}
    return {**result, "shape_confusion": {s: dict.fromkeys((*SHAPES, "none"), 0)
                                          for s in SHAPES}}


def test_evaluate_scores_images_in_minus_1_1_against_the_right_prompts(fresh_checkpoint,
                                                                       monkeypatch):
    """The checker gets images * 2 - 1, and a permutation of the prompts under
    --shuffle-prompts (the control), the prompts themselves otherwise."""
    images = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = [c for c in all_captions() for _ in range(2)]
    monkeypatch.setattr(evaluate_script, "sample_all_captions", lambda *a, **k: (images, prompts))
    monkeypatch.setattr(evaluate_script, "keep_freed_memory", lambda: True)
    scored = []

    def adherence(x, p):
        scored.append((x, p))
        return stub_adherence()

    monkeypatch.setattr(evaluate_script, "shapes_adherence", adherence)
    base = ["--checkpoint", str(fresh_checkpoint), "--seeds", "2", "--device", "cpu"]
    assert evaluate_script.main(base) == evaluate_script.main(base + ["--shuffle-prompts"]) == 0
    (plain_images, plain), (_, shuffled) = scored
    assert torch.equal(plain_images, images * 2 - 1) and plain == prompts
    assert shuffled != prompts and sorted(shuffled) == sorted(prompts)


@pytest.mark.parametrize("grid_seeds, keep", [("1", 1), ("5", 3)])
def test_evaluate_grid_shows_the_first_seeds_of_each_caption(fresh_checkpoint, tmp_path,
                                                             monkeypatch, grid_seeds, keep):
    """--grid-seeds N (at most --seeds) picks seeds 0..N-1 of every caption, one colour per
    row of N x 4 shapes."""
    images = torch.arange(72.0).reshape(72, 1, 1, 1)  # image i is the number i
    prompts = [c for c in all_captions() for _ in range(3)]
    monkeypatch.setattr(evaluate_script, "sample_all_captions", lambda *a, **k: (images, prompts))
    monkeypatch.setattr(evaluate_script, "keep_freed_memory", lambda: True)
    monkeypatch.setattr(evaluate_script, "shapes_adherence", lambda x, p: stub_adherence())
    monkeypatch.setattr(evaluate_script, "shapes_distances", lambda *a: {  # 1-pixel images
        k: 0.0 for k in ("fd", "fd_floor", "kid", "kid_std", "kid_floor", "kid_floor_std",
                         "adherence", "chance", "real_adherence", "num_fake", "num_real_floor")})
    grids = []

    class Grid:
        def save(self, path):
            pass

    def make_grid(x, captions, columns):
        grids.append((x.flatten().tolist(), captions, columns))
        return Grid()

    monkeypatch.setattr(evaluate_script, "make_grid", make_grid)
    assert evaluate_script.main(["--checkpoint", str(fresh_checkpoint), "--seeds", "3",
                                 "--grid", str(tmp_path / "g.png"),
                                 "--grid-seeds", grid_seeds]) == 0
    picked = [i for i in range(72) if i % 3 < keep]
    assert grids == [(picked, [prompts[i] for i in picked], keep * 4)]


def test_sample_script_img2img_batch_into_a_captioned_grid(fresh_checkpoint, tmp_path,
                                                          monkeypatch):
    """--num-images with --init-image (strength 0: the input each time) into OUT.PNG (a grid,
    whatever the suffix's case) in new nested folders, the prompt under each image."""
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "in.png")
    monkeypatch.setattr(sample_script, "keep_freed_memory", lambda: True)
    out = tmp_path / "a" / "b" / "OUT.PNG"
    assert sample_script.main([str(a) for a in (
        "--checkpoint", fresh_checkpoint, "--prompt", "a red circle", "--num-images", 2,
        "--device", "cpu", "--init-image", tmp_path / "in.png", "--strength", 0,
        "--out", out)]) == 0
    grid = Image.open(out)
    assert grid.size == (2 * (96 + 2), 32 + 12 + 2)  # two 32-pixel cells with caption room
    assert grid.getpixel((5, 5)) == grid.getpixel((98 + 5, 5)) == (0, 255, 0)
    assert grid.crop((0, 32, 98, 44)).getextrema()[0][0] < 255  # the caption's text


def test_generate_image_keeps_each_prompts_images_together(pipeline):
    """num_images per prompt: prompt 0 with seeds s, s + 1, then prompt 1 with s + 2, s + 3."""
    kw = dict(num_inference_steps=1, guidance_scale=3.0)
    pils = pipeline.generate_image(["a red circle", "a blue square"], num_images=2, seed=4, **kw)
    expected = pipeline.generate(["a red circle"] * 2 + ["a blue square"] * 2, [4, 5, 6, 7], **kw)
    assert [p.tobytes() for p in pils] == [to_pil(x).tobytes() for x in expected]


def test_positive_int_accepts_one_and_refuses_zero():
    assert cli_module.positive_int("1") == 1
    for text in ("0", "-2", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_module.positive_int(text)
