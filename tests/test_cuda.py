"""The CUDA paths: fp16/bf16 autocast, the fused attention kernels, fp16 training with a
GradScaler (and its overflow), dropout seeded per step on the GPU, model CPU offload,
checkpoints moved between devices both ways and train.py under torchrun with NCCL. Skipped
without a GPU (CI has none); on a GPU machine:

    python -m pytest -q tests/test_cuda.py
"""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import randomize, tiny_config

from diffusion import AdvancedDiffusionTrainer, ShapesDataset, collate
from nets import AdvancedUNet, TextEncoder, attention, explicit_attention
from sampling import AdvancedDiffusionPipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")


@contextmanager
def exact_fp32():
    """TF32 off for matmuls and convolutions, so CUDA fp32 is comparable with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def randomized_model(**overrides):
    torch.manual_seed(0)
    config = tiny_config(attention_resolutions=(16, 8), **overrides)
    model, encoder = AdvancedUNet(config), TextEncoder.from_config(config)
    randomize(model)  # zero-initialised layers would hide whole paths
    return config, model, encoder


def model_inputs(config, batch=3):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size,
                    generator=gen)
    t = torch.randint(0, config.num_train_timesteps, (batch,), generator=gen)
    context = torch.randn(batch, 9, config.context_dim, generator=gen)
    mask = torch.ones(batch, 9, dtype=torch.bool)
    mask[0, 5:] = False  # one prompt with padding
    return x, t, context, mask


def relative_error(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_unet_on_cuda_matches_cpu():
    config, model, _ = randomized_model(pooled_text_conditioning=True)
    inputs = model_inputs(config)
    with torch.no_grad():
        ref = model(*inputs)["sample"]
        with exact_fp32():
            out = model.to(CUDA)(*(v.to(CUDA) for v in inputs))["sample"]
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_close_to_fp32(dtype):
    """Same bound as the CPU's real-bf16 test in test_nets: about 3 significant digits."""
    config, model, _ = randomized_model()
    model.to(CUDA)
    inputs = [v.to(CUDA) for v in model_inputs(config)]
    with torch.no_grad(), exact_fp32():
        ref = model(*inputs)["sample"]
        with torch.autocast("cuda", dtype=dtype):
            out = model(*inputs)["sample"]
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert 1e-5 < relative_error(out, ref) < 0.05


@pytest.mark.parametrize("backend, masked", [("flash", False), ("flash", True),
                                             ("efficient", True), ("efficient", False),
                                             ("math", True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_attention_kernels_match_explicit_softmax(backend, masked, dtype):
    """CUDA's flash kernel takes no mask: "flash" with padded keys runs the memory-efficient
    kernel (nets.attention.sdpa_backends) instead of failing with "No available kernel"."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, n, 32, generator=gen) for n in (64, 77, 77))
    mask = torch.ones(2, 77, dtype=torch.bool)
    if masked:
        mask[1, 10:] = False
    attn_mask = mask[:, None, None, :]
    with exact_fp32():
        ref = explicit_attention(q.to(CUDA), k.to(CUDA), v.to(CUDA), attn_mask.to(CUDA))
    low = [t.to(CUDA, dtype) for t in (q, k, v)]
    out = attention(*low, key_padding_mask=mask.to(CUDA) if masked else None, backend=backend)
    # one rounding of the inputs and the output: a few units of the 8/11-bit mantissa
    assert relative_error(out, ref) < (2e-2 if dtype == torch.bfloat16 else 3e-3)


def test_unet_with_flash_backend_and_padded_prompts_runs_and_matches_the_default():
    """The UNet under fp16 autocast with set_attention_backend("flash") and a padded prompt:
    self-attention runs flash, the masked cross-attention falls back to the efficient kernel."""
    config, model, _ = randomized_model()
    model.to(CUDA)
    inputs = [v.to(CUDA) for v in model_inputs(config)]  # row 0 of the mask is padded
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        ref = model(*inputs)["sample"]
        model.unet.set_attention_backend("flash")
        out = model(*inputs)["sample"]
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < 1e-2


def shapes_batch(config, size=8):
    dataset = ShapesDataset(size=size, sample_size=config.sample_size)
    return collate([dataset[i] for i in range(size)])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_learns_and_keeps_fp32_master_weights(precision):
    config = tiny_config(mixed_precision=precision, max_steps=60, learning_rate=2e-3,
                         lr_warmup_steps=0, use_ema=True, ema_decay=0.9)
    torch.manual_seed(0)
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config, device=CUDA)
    assert (trainer.scaler is not None) == (precision == "fp16")
    batch = shapes_batch(config)
    metrics = [trainer.train_step(batch) for _ in range(60)]
    losses = [m["loss"] for m in metrics]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all()
               for p in trainer.denoiser.parameters())
    # gradient_accumulation_steps=1: every call closes a window, which either updates or is
    # counted as skipped, never both and never neither; only updates step the LR and the EMA.
    assert [m["step"] + m["skipped_steps"] for m in metrics] == list(range(1, 61))
    assert trainer.global_step == sum(m["updated"] for m in metrics)
    assert trainer.lr_scheduler.last_epoch == trainer.ema.num_updates == trainer.global_step
    if precision == "bf16":  # no GradScaler: a skip would mean a NaN/Inf gradient
        assert trainer.skipped_steps == 0 and trainer.global_step == 60
    else:  # each fp16 overflow halves the scale (2**16 at first; it grows after 2000 clean steps)
        assert trainer.scaler.get_scale() == 2.0**16 / 2**trainer.skipped_steps
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)  # one repeated batch: the loss must fall


def test_model_cpu_offload_gives_the_same_images_and_parks_the_models():
    config, model, encoder = randomized_model()
    pipe = AdvancedDiffusionPipeline(config, model, encoder, device=CUDA)
    prompts, seeds = ["a red circle", "a blue cross"], [0, 1]
    with exact_fp32():
        ref = pipe.generate(prompts, seeds, num_inference_steps=4)
        pipe.enable_model_cpu_offload()
        assert next(pipe.unet.parameters()).device.type == "cpu"
        out = pipe.generate(prompts, seeds, num_inference_steps=4)
    assert out.device.type == "cuda"
    assert next(pipe.unet.parameters()).device.type == "cpu"
    assert next(pipe.text_encoder.parameters()).device.type == "cpu"
    torch.testing.assert_close(out, ref)


def test_checkpoint_saved_on_cuda_loads_on_cpu(tmp_path):
    config = tiny_config(max_steps=2, mixed_precision="fp16")
    torch.manual_seed(0)
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config, device=CUDA)
    trainer.train_step(shapes_batch(config, size=4))
    path = trainer.save_checkpoint(tmp_path / "cuda.pt")
    pipe = AdvancedDiffusionPipeline.from_checkpoint(path, device="cpu")
    assert next(pipe.unet.parameters()).device.type == "cpu"
    images = pipe.generate(["a red circle"], [0], num_inference_steps=2)
    assert images.shape == (1, 3, config.sample_size, config.sample_size)


def test_train_script_under_torchrun_with_nccl(tmp_path):
    config = tiny_config(output_dir=str(tmp_path / "run"), dataset="shapes", max_steps=3,
                         log_every=1, save_every=3, sample_every=3, mixed_precision="bf16")
    path = tmp_path / "tiny.yaml"
    config.to_yaml(path)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         "train.py", "--config", str(path)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend nccl" in result.stderr
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["step"] == 3


def test_checkpoint_saved_on_cpu_loads_on_cuda_and_gives_the_cpu_images(tmp_path):
    config = tiny_config(max_steps=2)
    torch.manual_seed(0)
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config)  # on the CPU
    trainer.train_step(shapes_batch(config, size=4))
    randomize(trainer.model)  # trained 1 step, the zero-initialised output would hide errors
    path = trainer.save_checkpoint(tmp_path / "cpu.pt")
    args = (["a red circle", "a blue cross"], [0, 1])
    ref = AdvancedDiffusionPipeline.from_checkpoint(path, use_ema=False, device="cpu").generate(
        *args, num_inference_steps=3)
    pipe = AdvancedDiffusionPipeline.from_checkpoint(path, use_ema=False, device="cuda")
    assert next(pipe.unet.parameters()).device.type == "cuda"
    assert next(pipe.text_encoder.parameters()).device.type == "cuda"
    with exact_fp32():
        out = pipe.generate(*args, num_inference_steps=3)
    assert out.device.type == "cuda"
    # One forward agrees to 1e-4 (test_unet_on_cuda_matches_cpu); guidance 7.5 scales the
    # cond-uncond difference, and so its rounding, at each of the 3 steps: 1e-3 here (seen:
    # 1.2e-4 at worst). Wrong weights or noise drawn on the GPU would differ by ~0.1-1.
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)


def test_fp16_overflow_on_cuda_skips_the_update_and_halves_the_scale():
    """The real CUDA GradScaler (the CPU test stands one in): an Inf gradient skips the
    update, leaves the weights, the LR schedule and the EMA alone, and halves the scale."""
    config = tiny_config(mixed_precision="fp16", use_ema=True, max_nonfinite_steps=2)
    torch.manual_seed(0)
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config, device=CUDA)
    batch = shapes_batch(config, size=4)
    scale = trainer.scaler.get_scale()
    hook = trainer.model.unet.conv_out.bias.register_hook(lambda grad: grad * float("inf"))
    before = {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters()}
    metrics = trainer.train_step(batch)
    assert not metrics["updated"] and metrics["step"] == 0 and metrics["skipped_steps"] == 1
    assert trainer.scaler.get_scale() == scale / 2
    assert trainer.lr_scheduler.last_epoch == 0 and trainer.ema.num_updates == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.denoiser.named_parameters())
    hook.remove()
    metrics = trainer.train_step(batch)
    assert metrics["updated"] and metrics["step"] == 1 and trainer.ema.num_updates == 1


def test_dropout_on_cuda_is_seeded_per_step_and_leaves_the_callers_rng_alone():
    """Two identical trainers draw the same dropout masks on the GPU (train_step seeds CUDA's
    generator from (seed, micro_step, rank)), and a step does not advance the caller's CPU
    or CUDA generator."""
    config = tiny_config(dropout=0.5, use_ema=False)
    batch = shapes_batch(config, size=4)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config, device=CUDA)
        randomize(trainer.model)  # so that dropout inside the residual branches shows
        torch.manual_seed(123)  # the caller's own state, different for each trainer
        torch.cuda.manual_seed(123 + len(losses))
        cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
        with exact_fp32():
            losses.append(trainer.train_step(batch)["loss"])
        assert torch.equal(torch.get_rng_state(), cpu_state)
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
