"""Latent diffusion end to end at micro sizes: AutoencoderTrainer (steps, GAN, exact resume),
the latent scale, a latent run through train.py with save/resume and from_checkpoint, the
pipeline in latent space (sizes, slicing, tiling, image-to-image), reconstruction evaluation,
and every new error."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from diffusion import AutoencoderTrainer, DiffusionConfig, LatentSpace, ShapesDataset, collate
from diffusion.checkpoint import CheckpointError
from diffusion.latent import LATENT_FIT_SEED
from nets import AdvancedUNet, AutoencoderKL
from sampling import AdvancedDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent
AE_FIELDS = dict(stage="autoencoder", sample_size=16, latent_channels=4, ae_channels=8,
                 ae_channel_mult=(1, 2), ae_num_res_blocks=1, ae_attention=True,
                 mixed_precision=False, gradient_checkpointing=False, batch_size=4,
                 learning_rate=1e-3, lr_warmup_steps=0, max_steps=100, ema_decay=0.9)
# The UNet of a latent model sees 8x8 latents of the 16 px images (f = 2).
LATENT_FIELDS = dict(sample_size=8, in_channels=4, out_channels=4, attention_resolutions=(4,),
                     clip_sample=False, prediction_type="v_prediction",
                     latent_scale_images=8, num_inference_steps=3)

pytestmark = pytest.mark.usefixtures("one_thread")


def ae_config(**overrides) -> DiffusionConfig:
    return DiffusionConfig(**{**AE_FIELDS, **overrides})


def shapes_batch(n=4, seed=0, size=16):
    data = ShapesDataset(size=64, sample_size=size, seed=seed)
    return collate([data[i] for i in range(n)])


def ae_trainer(**overrides) -> AutoencoderTrainer:
    torch.manual_seed(0)
    config = ae_config(**overrides)
    return AutoencoderTrainer(AutoencoderKL.from_config(config), config)


@pytest.fixture(scope="module")
def ae_checkpoint(tmp_path_factory) -> Path:
    """A stage=autoencoder checkpoint after a few steps (EMA on)."""
    trainer = ae_trainer()
    for step in range(3):
        trainer.train_step(shapes_batch(seed=step))
    return trainer.save_checkpoint(tmp_path_factory.mktemp("ae") / "last.pt")


def latent_config(ae_path, **overrides) -> DiffusionConfig:
    return tiny_config(**{**LATENT_FIELDS, "autoencoder": str(ae_path), **overrides})


# ---- the autoencoder trainer ----

def test_autoencoder_step_reports_reconstruction_metrics():
    trainer = ae_trainer()
    result = trainer.train_step(shapes_batch())
    assert result["updated"] and result["step"] == 1
    assert {"rec_loss", "kl", "psnr"} <= result.keys() and "disc_loss" not in result
    assert result["loss"] == pytest.approx(result["rec_loss"] + 1e-6 * result["kl"], rel=1e-5)


def test_autoencoder_loss_falls():
    trainer = ae_trainer(learning_rate=3e-3)
    batch = shapes_batch(8)
    first = trainer.train_step(batch)["rec_loss"]
    for _ in range(30):
        last = trainer.train_step(batch)["rec_loss"]
    assert last < 0.5 * first


def test_gan_starts_at_its_step_and_trains_the_discriminator():
    trainer = ae_trainer(ae_gan_weight=0.5, ae_gan_start=1, ae_disc_channels=8, ae_disc_layers=2)
    before = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    first = trainer.train_step(shapes_batch())
    assert "disc_loss" not in first  # step 0 < ae_gan_start
    assert all(torch.equal(v, trainer.discriminator.state_dict()[k]) for k, v in before.items())
    second = trainer.train_step(shapes_batch(seed=1))
    assert second["gan_weight"] > 0 and second["disc_loss"] > 0
    assert any(not torch.equal(v, trainer.discriminator.state_dict()[k])
               for k, v in before.items())


def test_autoencoder_resume_is_exact(tmp_path):
    fields = dict(ae_gan_weight=0.5, ae_gan_start=1, ae_disc_channels=8, ae_disc_layers=2)
    straight = ae_trainer(**fields)
    for step in range(4):
        straight.train_step(shapes_batch(seed=step))
    first = ae_trainer(**fields)
    for step in range(2):
        first.train_step(shapes_batch(seed=step))
    path = first.save_checkpoint(tmp_path / "ae.pt")
    resumed = ae_trainer(**fields)
    resumed.load_checkpoint(path)
    for step in range(2, 4):
        resumed.train_step(shapes_batch(seed=step))
    for a, b in ((straight.model, resumed.model),
                 (straight.discriminator, resumed.discriminator)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


def test_autoencoder_validate_scores_reconstructions():
    trainer = ae_trainer()
    result = trainer.validate([shapes_batch(), shapes_batch(seed=1)])
    assert result["num_batches"] == 2 and result["psnr"] > 0 and -1 <= result["ssim"] <= 1
    with pytest.raises(ValueError, match="empty dataloader"):
        trainer.validate([])


def test_autoencoder_trainer_errors():
    config = ae_config()
    with pytest.raises(ValueError, match="stage='autoencoder'; got stage='diffusion'"):
        AutoencoderTrainer(AutoencoderKL(), DiffusionConfig())
    with pytest.raises(ValueError, match="one process"):
        AutoencoderTrainer(AutoencoderKL.from_config(config), config, distributed=True)
    with pytest.raises(TypeError, match="must be an AutoencoderKL"):
        AutoencoderTrainer(AdvancedUNet(tiny_config()), config)


# ---- the latent space ----

def test_latent_scale_makes_the_training_latents_unit_std(ae_checkpoint):
    space = LatentSpace.from_checkpoint(ae_checkpoint)
    images = shapes_batch(32)["images"]
    fit = space.fit(images)
    assert fit["scale"] == pytest.approx(1 / fit["std"])
    latents = space.encode(images, torch.Generator().manual_seed(LATENT_FIT_SEED))
    assert latents.double().std().item() == pytest.approx(1.0, abs=1e-5)
    shifted = LatentSpace.from_checkpoint(ae_checkpoint)
    shifted.fit(images, shift=True)
    latents = shifted.encode(images, torch.Generator().manual_seed(LATENT_FIT_SEED)).double()
    assert latents.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert latents.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-5)
    decoded = shifted.decode(shifted.encode(images, sample=False))
    expected = shifted.autoencoder.decode(shifted.autoencoder.encode(images).mean)
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)


def test_latent_space_errors(ae_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="does not exist; train one"):
        LatentSpace.from_checkpoint(tmp_path / "missing.pt")
    space = LatentSpace.from_checkpoint(ae_checkpoint)
    with pytest.raises(RuntimeError, match="latent scale is not set"):
        space.encode(shapes_batch()["images"])
    diffusion_ckpt = tmp_path / "diffusion.pt"
    from diffusion import AdvancedDiffusionTrainer
    config = tiny_config()
    AdvancedDiffusionTrainer(AdvancedUNet(config), config).save_checkpoint(diffusion_ckpt)
    with pytest.raises(CheckpointError, match="stage='diffusion' checkpoint"):
        LatentSpace.from_checkpoint(diffusion_ckpt)
    with pytest.raises(ValueError, match="latent_channels=4, but the diffusion config has "
                                         "in_channels=3"):
        space.check_matches(tiny_config())


@pytest.mark.parametrize("fields, match", [
    (dict(autoencoder="x.pt", clip_sample=True), "clip_sample=True clips"),
    (dict(stage="autoencoder", autoencoder="x.pt", clip_sample=False), "takes no autoencoder"),
    (dict(stage="stage1"), "stage='stage1' is not one of"),
    (dict(ae_channel_mult=()), "ae_channel_mult=\\(\\) must have at least one level"),
    (dict(ae_channel_mult=(1, 0)), "ae_channel_mult=\\(1, 0\\) must hold positive ints"),
])
def test_config_errors(fields, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DiffusionConfig(**fields)


# ---- a latent diffusion trainer and pipeline ----

@pytest.fixture(scope="module")
def latent_trainer(ae_checkpoint):
    from diffusion import AdvancedDiffusionTrainer
    config = latent_config(ae_checkpoint)
    torch.manual_seed(0)
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config)
    data = ShapesDataset(size=48, sample_size=trainer.image_size, seed=0)
    assert trainer.image_size == 16 and trainer.image_channels == 3
    trainer.fit_latent_scale(data)
    trainer.train_step(collate([data[i] for i in range(4)]))
    return trainer


def test_latent_trainer_needs_the_scale(ae_checkpoint):
    from diffusion import AdvancedDiffusionTrainer
    config = latent_config(ae_checkpoint)
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config)
    with pytest.raises(RuntimeError, match="call fit"):
        trainer.train_step(shapes_batch())
    with pytest.raises(ValueError, match=r"batch\['images'\] must be a \(B, 3, H, W\)"):
        trainer.train_step({"images": torch.zeros(4, 4, 8, 8), "prompts": [""] * 4})


def test_latent_trainer_errors(ae_checkpoint, tmp_path):
    from diffusion import AdvancedDiffusionTrainer
    with pytest.raises(ValueError, match="does not exist"):
        config = latent_config(tmp_path / "gone.pt")
        AdvancedDiffusionTrainer(AdvancedUNet(config), config)
    config = latent_config(ae_checkpoint, in_channels=3, out_channels=3)
    with pytest.raises(ValueError, match="set both to 4"):
        AdvancedDiffusionTrainer(AdvancedUNet(config), config)


def test_pipeline_samples_latents_and_decodes(latent_trainer):
    with latent_trainer.ema_weights():
        pipe = AdvancedDiffusionPipeline.from_trainer(latent_trainer)
        images = pipe.generate(["a red circle", "a blue cross"], [0, 1])
        assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
        wide = pipe.generate(["a red circle"], [0], height=16, width=32)
        assert wide.shape == (1, 3, 16, 32)
        pipe.enable_vae_slicing()
        torch.testing.assert_close(pipe.generate(["a red circle", "a blue cross"], [0, 1]),
                                   images, rtol=1e-4, atol=1e-4)
        pipe.enable_vae_tiling(tile_size=16, overlap=4)
        torch.testing.assert_close(pipe.generate(["a red circle", "a blue cross"], [0, 1]),
                                   images, rtol=1e-4, atol=1e-4)  # one tile: the same
        assert pipe.generate(["a red circle"], [0], height=48, width=48).shape == (1, 3, 48, 48)
        with pytest.raises(ValueError, match=r"height=10 must be a positive multiple of the "
                                             r"autoencoder's f=2 times the UNet's downsampling "
                                             r"2, i.e. 4"):
            pipe.generate(["a red circle"], [0], height=10, width=16)
        variation = pipe.generate_variations(
            pipe.generate_image("a red circle", seed=0), "a blue circle", strength=0.5, seed=0)
        assert variation.size == (16, 16)
    trainer_autoencoder = latent_trainer.latent_space.autoencoder  # the pipeline's switches
    assert not trainer_autoencoder.use_slicing and trainer_autoencoder.tile_size is None


def test_config_use_vae_slicing_turns_slicing_on(latent_trainer):
    config = latent_trainer.config.with_overrides({"use_vae_slicing": True})
    pipe = AdvancedDiffusionPipeline(config, latent_trainer.model, latent_trainer.text_encoder,
                                     latent_space=latent_trainer.latent_space)
    assert pipe.latent_space.autoencoder.use_slicing
    assert not latent_trainer.latent_space.autoencoder.use_slicing


def test_pipeline_needs_the_latent_space(latent_trainer):
    with pytest.raises(ValueError, match="pass latent_space"):
        AdvancedDiffusionPipeline(latent_trainer.config)


def test_pixel_pipeline_says_it_has_nothing_to_tile():
    pipe = AdvancedDiffusionPipeline(tiny_config())
    with pytest.warns(UserWarning, match="enable_vae_tiling: this pipeline works in pixel space"):
        pipe.enable_vae_tiling()


def test_latent_checkpoint_round_trip(latent_trainer, tmp_path):
    path = latent_trainer.save_checkpoint(tmp_path / "latent.pt")
    state = torch.load(path, weights_only=True)
    assert state["latent"]["scale"] == latent_trainer.latent_space.scale
    with latent_trainer.ema_weights():
        expected = AdvancedDiffusionPipeline.from_trainer(latent_trainer).generate(
            ["a red square"], [3])
    # the autoencoder travels inside the checkpoint: its own file is not needed
    pipe = AdvancedDiffusionPipeline.from_checkpoint(path)
    torch.testing.assert_close(pipe.generate(["a red square"], [3]), expected)
    config = DiffusionConfig.from_dict(state["config"])
    assert config.autoencoder == latent_trainer.config.autoencoder
    from diffusion import AdvancedDiffusionTrainer
    pixel = tiny_config(**{**LATENT_FIELDS, "autoencoder": None})  # the same UNet, in pixels
    with pytest.raises(ValueError, match="cannot resume: the checkpoint is a latent diffusion "
                                         "run and the config has autoencoder=None"):
        AdvancedDiffusionTrainer(AdvancedUNet(pixel), pixel).load_checkpoint(path)
    without = {k: v for k, v in state.items() if k != "latent"}
    torch.save(without, tmp_path / "no_latent.pt")
    with pytest.raises(CheckpointError, match="holds no latent space"):
        AdvancedDiffusionPipeline.from_checkpoint(tmp_path / "no_latent.pt")
    broken = {**state["latent"]}
    del broken["weights"]
    with pytest.raises(CheckpointError, match="latent-space entry is incomplete"):
        LatentSpace.from_checkpoint_state(broken, "x.pt")


def test_pipeline_refuses_an_autoencoder_checkpoint(ae_checkpoint):
    with pytest.raises(CheckpointError, match="is an autoencoder checkpoint"):
        AdvancedDiffusionPipeline.from_checkpoint(ae_checkpoint)


# ---- the scripts ----

def run(*args, check=True):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                         "PATH": "/usr/bin:/bin"})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_script_runs_the_whole_chain(tmp_path):
    """train.py trains the autoencoder (metrics with PSNR, grids), evaluate scores it, train.py
    trains a latent model on it, resumes exactly, and sample.py / evaluate load it."""
    ae_yaml, ae_dir = tmp_path / "ae.yaml", tmp_path / "ae"
    ae_config(output_dir=str(ae_dir), max_steps=4, log_every=2, save_every=2, sample_every=4,
              ae_gan_weight=0.1, ae_gan_start=2, ae_disc_channels=8,
              ae_disc_layers=2).to_yaml(ae_yaml)
    run("train.py", "--config", ae_yaml)
    lines = [json.loads(line) for line in (ae_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4]
    assert {"rec_loss", "kl", "psnr"} <= lines[0].keys() and "disc_loss" in lines[1]
    assert (ae_dir / "samples" / "step_00000004.png").exists()
    out = run("-m", "sampling.evaluate", "--checkpoint", ae_dir / "last.pt", "--num-images", 8)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["num_images"] == 8 and result["psnr"] > 0 and "ssim" in result
    for flags, message in ((("--steps", 3), "--steps does not apply"),
                           (("--seed", 1), "--seed does not apply"),
                           (("--data-dir", tmp_path / "none"), "is not a folder")):
        refused = run("-m", "sampling.evaluate", "--checkpoint", ae_dir / "last.pt", *flags,
                      check=False)
        assert refused.returncode != 0 and message in refused.stderr

    latent_yaml = tmp_path / "latent.yaml"
    fields = dict(dataset="shapes", log_every=1, save_every=2, sample_every=4, keep_last=10,
                  sample_prompts=("a red circle",))
    latent_config(ae_dir / "last.pt", output_dir=str(tmp_path / "straight"), max_steps=4,
                  **fields).to_yaml(latent_yaml)
    run("train.py", "--config", latent_yaml)
    half = tmp_path / "straight" / "checkpoints" / "step_00000002.pt"
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(half, tmp_path / "resumed" / "checkpoints" / half.name)
    # a different latent_scale_images would fit another scale: the resumed run keeps the saved
    run("train.py", "--config", latent_yaml, "--resume", "auto", "--set",
        f"output_dir={tmp_path / 'resumed'}", "latent_scale_images=4")
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert straight["latent"]["scale"] == resumed["latent"]["scale"]
    grid = tmp_path / "grid.png"
    run("sample.py", "--checkpoint", tmp_path / "straight" / "last.pt", "--prompt",
        "a red circle", "--steps", 2, "--out", grid)
    assert grid.exists()
    for control in ((), ("--untrained",)):  # the untrained control keeps the autoencoder
        out = run("-m", "sampling.evaluate", "--checkpoint", tmp_path / "straight" / "last.pt",
                  "--seeds", 1, "--steps", 2, *control)
        assert json.loads(out.stdout.splitlines()[-1])["images"] == 24
