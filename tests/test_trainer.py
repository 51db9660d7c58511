"""AdvancedDiffusionTrainer: learning, exact resume, non-finite handling, CFG dropout, EMA."""

import math
import os
import types
import warnings

import pytest
import torch
from helpers import randomize, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion import (
    AdvancedDiffusionTrainer,
    EMAModel,
    GlobalBatchSampler,
    NonFiniteLossError,
    get_scheduler,
)
from diffusion.checkpoint import CheckpointError
from diffusion.config import MAX_SEED
from diffusion.data import DATA_ORDER, derived_seed, resume_position
from diffusion.optim import parameter_groups
from diffusion.trainer import (
    VALIDATION_SEED,
    autocast_dtype,
    dropout_seed,
    validation_timesteps,
)
from nets import AdvancedUNet

PROMPTS = ["a red circle", "a blue square", "a green cross", "a cyan triangle"]


def make_trainer(seed=0, **overrides):
    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    return AdvancedDiffusionTrainer(AdvancedUNet(config), config)


def fixed_batch(seed=0, n=4, size=16):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "prompts": (PROMPTS * n)[:n]}


def test_overfits_one_batch():
    """x0-prediction with a distinct prompt per image can reach ~0 loss at every t."""
    trainer = make_trainer(prediction_type="sample", learning_rate=3e-3, lr_scheduler="constant",
                           snr_gamma=None, cfg_dropout=0.0, use_ema=False)
    batch = fixed_batch()
    before = trainer.validate([batch])["val_loss"]
    for _ in range(250):
        metrics = trainer.train_step(batch)
    after = trainer.validate([batch])["val_loss"]
    assert after < before / 10, (before, after)
    assert metrics["step"] == 250 and math.isfinite(metrics["grad_norm"])


def state_of(trainer):
    return {"model": trainer.model.state_dict(), "text": trainer.text_encoder.state_dict(),
            "opt": trainer.optimizer.state_dict()["state"], "ema": trainer.ema.shadow}


def assert_bitwise_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_bitwise_equal(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_resume_is_bitwise_exact(tmp_path):
    """6 steps straight == 3 steps, checkpoint, fresh trainer, load, 3 steps (dropout on, so
    the global RNG state matters too)."""
    kw = dict(dropout=0.1, use_ema=True, ema_decay=0.99, cfg_dropout=0.3, noise_offset=0.05,
              lr_warmup_steps=2, max_steps=6, gradient_accumulation_steps=1)
    batches = [fixed_batch(seed=i) for i in range(6)]
    straight = make_trainer(**kw)
    for batch in batches:
        straight.train_step(batch)
    first = make_trainer(**kw)
    for batch in batches[:3]:
        first.train_step(batch)
    path = first.save_checkpoint(tmp_path / "half.pt", extra={"note": "half"})
    torch.manual_seed(123)  # the fresh process's RNG differs; the checkpoint restores it
    resumed = make_trainer(seed=99, **kw)
    assert resumed.load_checkpoint(path) == {"note": "half"}
    for batch in batches[3:]:
        resumed.train_step(batch)
    assert resumed.global_step == straight.global_step == 6
    assert_bitwise_equal(state_of(resumed), state_of(straight))
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()


def test_resume_inside_an_accumulation_window_is_bitwise_exact(tmp_path):
    """5 micro-steps straight == 3, checkpoint (its window holds one micro-batch's gradients
    and loss), fresh trainer, load, 2: the window's first half is not lost."""
    kw = dict(gradient_accumulation_steps=2, use_ema=True, ema_decay=0.9, max_steps=6)
    batches = [fixed_batch(seed=i) for i in range(5)]
    straight = make_trainer(**kw)
    for batch in batches:
        last = straight.train_step(batch)
    first = make_trainer(**kw)
    for batch in batches[:3]:
        first.train_step(batch)
    assert first.accumulating
    path = first.save_checkpoint(tmp_path / "mid.pt")
    resumed = make_trainer(seed=7, **kw)
    resumed.load_checkpoint(path)
    for batch in batches[3:]:
        metrics = resumed.train_step(batch)
    assert resumed.global_step == straight.global_step == 2
    assert_bitwise_equal(state_of(resumed), state_of(straight))
    assert metrics["loss"] == last["loss"]


def test_logged_loss_is_the_mean_over_the_accumulation_window():
    trainer = make_trainer(gradient_accumulation_steps=3, use_ema=False)
    losses = []
    forward_loss = trainer._forward_loss
    trainer._forward_loss = lambda *a: (lambda v: (losses.append(v.mean().item()), v)[1])(
        forward_loss(*a))
    for i in range(6):  # two windows: the second one's mean starts afresh
        metrics = trainer.train_step(fixed_batch(seed=i))
        window = losses[i - i % 3:]
        assert metrics["loss"] == pytest.approx(sum(window) / len(window), rel=1e-6)
    assert metrics["updated"] and len(set(losses)) == 6


def test_resume_takes_learning_rate_and_weight_decay_from_the_config(tmp_path):
    """config.yaml records the resumed run's config, so the optimizer must follow it."""
    kw = dict(lr_scheduler="cosine", lr_warmup_steps=0, max_steps=10)
    trainer = make_trainer(learning_rate=1e-3, weight_decay=0.01, **kw)
    for i in range(4):
        trainer.train_step(fixed_batch(seed=i))
    path = trainer.save_checkpoint(tmp_path / "c.pt")
    resumed = make_trainer(learning_rate=1e-5, weight_decay=0.0, **kw)
    resumed.load_checkpoint(path)
    factor = 0.5 * (1 + math.cos(math.pi * 4 / 10))
    for group in resumed.optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-5 * factor, rel=1e-12)
        assert group["weight_decay"] == 0.0
    assert resumed.train_step(fixed_batch())["learning_rate"] == pytest.approx(1e-5 * factor)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-5 * 0.5 * (1 + math.cos(math.pi * 5 / 10)), rel=1e-12)


def test_resume_turning_ema_on_starts_it_from_the_loaded_weights(tmp_path):
    """A checkpoint saved with use_ema=False has no average: the EMA must start from the weights
    it holds, not from the fresh trainer's random initialisation (sample grids use the EMA)."""
    trainer = make_trainer(use_ema=False)
    for i in range(2):
        trainer.train_step(fixed_batch(seed=i))
    path = trainer.save_checkpoint(tmp_path / "no_ema.pt")
    resumed = make_trainer(seed=5, use_ema=True, ema_decay=0.9)
    with pytest.warns(UserWarning, match=r"checkpoint \(step 2\) has no EMA weights.*starts "
                                         r"from the loaded weights"):
        resumed.load_checkpoint(path)
    loaded = dict(trainer.denoiser.named_parameters())
    assert_bitwise_equal(resumed.ema.shadow, {n: p.detach() for n, p in loaded.items()})
    assert resumed.ema.num_updates == 0 and resumed.ema.decay == 0.9
    resumed.train_step(fixed_batch(seed=2))
    assert resumed.ema.num_updates == 1


def test_resume_takes_ema_decay_and_warmup_from_the_config(tmp_path):
    """Like the learning rate: config.yaml records the new values, so the EMA must use them;
    the update count (and so the warm-up's progress) comes from the checkpoint."""
    trainer = make_trainer(use_ema=True, ema_decay=0.9, ema_warmup=True)
    for i in range(3):
        trainer.train_step(fixed_batch(seed=i))
    path = trainer.save_checkpoint(tmp_path / "c.pt")
    resumed = make_trainer(use_ema=True, ema_decay=0.5, ema_warmup=False)
    resumed.load_checkpoint(path)
    assert (resumed.ema.decay, resumed.ema.warmup, resumed.ema.num_updates) == (0.5, False, 3)
    assert resumed.ema.current_decay() == 0.5
    assert resumed.state_dict()["ema"]["decay"] == 0.5


def test_resume_after_a_non_finite_step_counts_on(tmp_path):
    """max_nonfinite_steps counts consecutive skips across a resume, as the uninterrupted run
    does: NaN, resume, NaN stops at 2 like NaN, NaN. Older checkpoints (no count) start at 0."""
    kw = dict(max_nonfinite_steps=2, use_ema=False)
    first = make_trainer(**kw)
    with torch.no_grad():
        first.model.unet.conv_out.bias.fill_(float("nan"))
    assert first.train_step(fixed_batch())["updated"] is False
    state = first.state_dict()
    resumed = make_trainer(**kw)
    resumed.load_state_dict(state)
    with pytest.raises(NonFiniteLossError, match="NaN/Inf for 2 consecutive steps"):
        resumed.train_step(fixed_batch(seed=1))
    del state["counters"]["consecutive_skips"]
    older = make_trainer(**kw)
    older.load_state_dict(state)
    assert older.train_step(fixed_batch(seed=1))["skipped_steps"] == 2


def test_non_finite_step_with_a_grad_scaler_keeps_training():
    """fp16 training (GradScaler; a CPU scaler runs the same logic as CUDA's): a NaN loss skips
    the update and backs the scale off, and the next clean step updates as usual."""
    trainer = make_trainer(use_ema=False)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert trainer.train_step(fixed_batch())["updated"]
    bias = trainer.model.unet.conv_out.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.fill_(float("nan"))
    assert trainer.train_step(fixed_batch(seed=1))["updated"] is False
    assert trainer.scaler.get_scale() == 512.0
    with torch.no_grad():
        bias.copy_(saved)
    metrics = trainer.train_step(fixed_batch(seed=2))
    assert metrics["updated"] and metrics["skipped_steps"] == 1 and metrics["step"] == 2


def test_an_fp16_overflow_is_a_skipped_step():
    """An overflow of the scaled gradients (finite loss, Inf gradient) was handed to the
    GradScaler, which skipped the parameters' update while the trainer counted an update: the
    step, the LR schedule and the EMA moved on. It is a skipped step now; it counts toward
    max_nonfinite_steps only once the scale is below 1 (before that the scale is settling)."""
    trainer = make_trainer(use_ema=True, max_nonfinite_steps=2)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)  # CUDA's logic, on the CPU
    trainer.model.unet.conv_out.bias.register_hook(lambda grad: grad * float("inf"))
    before = {n: p.detach().clone() for n, p in trainer.denoiser.named_parameters()}
    for step, scale in enumerate((2.0, 1.0, 0.5)):  # the third is the first counted skip
        metrics = trainer.train_step(fixed_batch(seed=step))
        assert not metrics["updated"] and metrics["step"] == 0
        assert metrics["skipped_steps"] == step + 1 and trainer.scaler.get_scale() == scale
    assert trainer.lr_scheduler.last_epoch == 0 and trainer.ema.num_updates == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.denoiser.named_parameters())
    with pytest.raises(NonFiniteLossError, match="for 2 consecutive steps"):
        trainer.train_step(fixed_batch(seed=3))


def test_resume_with_a_different_model_lists_the_fields(tmp_path):
    trainer = make_trainer()
    path = trainer.save_checkpoint(tmp_path / "c.pt")
    other = make_trainer(model_channels=32, context_dim=64)
    with pytest.raises(ValueError, match=r"model_channels: checkpoint 16 vs config 32.*"
                                         r"context_dim: checkpoint 32 vs config 64"):
        other.load_checkpoint(path)


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches of 2 with accumulation make the same update as one batch of 4."""
    big = make_trainer(use_ema=False)
    small = make_trainer(use_ema=False, gradient_accumulation_steps=2)
    batch = fixed_batch()
    draws = big._global_draws(batch["images"].shape)  # the same random numbers for both
    big._global_draws = lambda shape: draws
    halves = iter([tuple(d[:2] for d in draws), tuple(d[2:] for d in draws)])
    small._global_draws = lambda shape: next(halves)
    assert big.train_step(batch)["updated"] is True
    first = small.train_step({"images": batch["images"][:2], "prompts": batch["prompts"][:2]})
    second = small.train_step({"images": batch["images"][2:], "prompts": batch["prompts"][2:]})
    assert (first["updated"], second["updated"]) == (False, True)
    assert small.global_step == big.global_step == 1
    for p_big, p_small in zip(big.denoiser.parameters(), small.denoiser.parameters()):
        torch.testing.assert_close(p_small, p_big, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_skips_updates_then_stops():
    trainer = make_trainer(max_nonfinite_steps=3, use_ema=False)
    with torch.no_grad():
        trainer.model.unet.conv_out.bias.fill_(float("nan"))
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v  # and the tokenizer's state
              for k, v in trainer.text_encoder.state_dict().items()}
    for i in range(2):
        metrics = trainer.train_step(fixed_batch())
        assert metrics["updated"] is False and metrics["skipped_steps"] == i + 1
        assert metrics["step"] == 0
    assert_bitwise_equal(trainer.text_encoder.state_dict(), before)  # nothing was updated
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf for 3 consecutive steps.*lower "
                                                 r"learning_rate"):
        trainer.train_step(fixed_batch())


def test_a_skipped_update_leaves_no_trace_and_an_update_resets_the_skip_count():
    """A window with a NaN micro-batch is dropped whole: its gradients are cleared, and neither
    the LR schedule nor the EMA counts it; a clean update then resets the consecutive count
    (NaN, clean, NaN does not stop a run with max_nonfinite_steps=2)."""
    trainer = make_trainer(gradient_accumulation_steps=2, max_nonfinite_steps=2, use_ema=True,
                           lr_warmup_steps=10)
    bias = trainer.model.unet.conv_out.bias
    saved = bias.detach().clone()
    for round_ in range(2):
        trainer.train_step(fixed_batch(seed=0))  # finite: this window now holds gradients
        with torch.no_grad():
            bias.fill_(float("nan"))
        assert trainer.train_step(fixed_batch(seed=1))["updated"] is False
        with torch.no_grad():
            bias.copy_(saved)
        assert all(p.grad is None for p in trainer.denoiser.parameters())
        assert trainer.lr_scheduler.last_epoch == trainer.ema.num_updates == trainer.global_step
        for i in range(2):
            metrics = trainer.train_step(fixed_batch(seed=i))
        assert metrics["updated"] and metrics["step"] == round_ + 1
        saved = bias.detach().clone()
    assert trainer.skipped_steps == 2


def test_offset_noise_shifts_each_channel_separately():
    """noise_offset adds one N(0, 1) shift per (image, channel), not one per image: with a large
    offset an image's channel planes have clearly different means (~100 apart, not ~1/16)."""
    trainer = make_trainer(noise_offset=100.0)
    _, noise, _ = trainer._global_draws(torch.Size((8, 3, 16, 16)))
    assert noise.mean(dim=(2, 3)).std(dim=1).mean() > 10


def test_cfg_dropout_replaces_the_configured_fraction():
    trainer = make_trainer(cfg_dropout=0.3)
    seen = []
    tokenizer = trainer.tokenizer
    trainer.tokenizer = lambda prompts: (seen.extend(prompts), tokenizer(prompts))[1]
    batch = {"images": torch.zeros(50, 3, 16, 16), "prompts": ["a red circle"] * 50}
    for _ in range(10):
        trainer.train_step(batch)
    n = len(seen)
    dropped = sum(p == "" for p in seen) / n
    assert n == 500 and set(seen) == {"", "a red circle"}
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)  # 4 binomial standard errors


def test_validate_is_deterministic_and_restores_train_mode():
    trainer = make_trainer(dropout=0.2)
    randomize(trainer.model)  # non-zero output layer, so train-mode dropout would show
    batches = [fixed_batch(0), fixed_batch(1)]
    a = trainer.validate(batches)
    b = trainer.validate(batches)
    assert a == b and a["num_batches"] == 2
    assert trainer.denoiser.training
    trainer.denoiser.eval()
    trainer.validate(batches[:1])
    assert not trainer.denoiser.training  # back to the mode it was in, not always train
    with pytest.raises(ValueError, match="empty dataloader"):
        trainer.validate([])


def test_validate_noises_batch_b_with_its_seed_at_spread_timesteps():
    """Batch b gets randn from seed VALIDATION_SEED + b at stratified timesteps (one per
    stratum of width T / B, offset by frac(b x golden ratio)); val_loss is the mean over
    samples (a smaller batch weighs less); max_batches=2 stops at 2."""
    trainer = make_trainer()
    batches = [fixed_batch(0, n=6), fixed_batch(1, n=2), fixed_batch(2)]
    seen = []
    hook = trainer.denoiser.register_forward_hook(lambda m, args, out: seen.append(args[:2]))
    result = trainer.validate(batches, max_batches=2)
    hook.remove()
    assert result["num_batches"] == len(seen) == 2
    T, abar = trainer.config.num_train_timesteps, trainer.noise_scheduler.alphas_cumprod_float64
    losses = []
    for b, ((x_t, t), batch) in enumerate(zip(seen, batches)):
        images, B = batch["images"], len(batch["prompts"])
        offset = b * (5 ** 0.5 - 1) / 2 % 1
        assert t.tolist() == [math.floor((i + offset) * T / B) for i in range(B)]
        g = torch.Generator().manual_seed(VALIDATION_SEED + b)
        eps = torch.randn(images.shape, generator=g)
        a = abar[t].reshape(-1, 1, 1, 1)
        torch.testing.assert_close(x_t.double(), a.sqrt() * images + (1 - a).sqrt() * eps,
                                   rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            losses.append(trainer._forward_loss(images, batch["prompts"], t, eps))
    assert result["val_loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-6)


@given(st.integers(0, 10_000), st.integers(1, 64), st.sampled_from([1, 2, 50, 1000]))
def test_validation_timesteps_are_stratified(batch_index, B, T):
    t = validation_timesteps(batch_index, B, T)
    assert t.dtype == torch.int64 and t.shape == (B,)
    assert ((t >= 0) & (t < T)).all()
    strata = torch.arange(B)
    assert ((t >= (strata * T) // B) & (t <= ((strata + 1) * T) // B)).all()


def test_validation_batches_of_one_cover_the_timesteps():
    """linspace(0, T-1, 1) is [0]: every one-sample batch was scored at t = 0 only."""
    t = torch.cat([validation_timesteps(b, 1, 1000) for b in range(100)])
    assert len(t.unique()) == 100
    assert torch.histc(t.double(), bins=10, min=0, max=1000).min() >= 8  # ~10 per tenth


def test_dropout_masks_are_seeded_per_micro_step_and_rank():
    """Every rank seeds the global RNG alike, so dropout (which draws from it) gave all ranks
    the same masks. Each micro-batch now seeds it from (seed, micro-step, rank) and puts it
    back: the step does not depend on, or consume, the caller's global RNG."""
    seeds = {dropout_seed(s, m, r) for s in (0, 1) for m in range(50) for r in range(4)}
    assert len(seeds) == 400 and all(0 <= x < 2 ** 64 for x in seeds)
    losses = []
    for global_seed in (1, 2):
        trainer = make_trainer(dropout=0.5)
        randomize(trainer.model)  # zero-initialised outputs would hide the dropout
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        losses.append([trainer.train_step(fixed_batch(seed=i))["loss"] for i in range(2)])
        assert torch.equal(torch.get_rng_state(), state)
    assert losses[0] == losses[1]
    for rank in (0, 1):  # the same data and draws as rank 0's first step, rank 1's masks
        trainer = make_trainer(dropout=0.5)
        randomize(trainer.model)
        first_draws = trainer._global_draws(fixed_batch(seed=0)["images"].shape)
        trainer._global_draws = lambda shape, draws=first_draws: draws
        trainer.rank = rank
        loss = trainer.train_step(fixed_batch(seed=0))["loss"]
        assert (loss == losses[0][0]) == (rank == 0)


def test_resuming_with_another_gradient_accumulation_starts_a_full_window():
    """Saved between windows with accumulation 2 (micro-step 2) and resumed with 3, the first
    window used to update after one micro-batch; a checkpoint saved inside a window can only
    resume with the accumulation it was saved with."""
    trainer = make_trainer(gradient_accumulation_steps=2, use_ema=False)
    for i in range(2):
        trainer.train_step(fixed_batch(seed=i))
    between = trainer.state_dict()
    trainer.train_step(fixed_batch(seed=2))
    inside = trainer.state_dict()
    resumed = make_trainer(gradient_accumulation_steps=3, use_ema=False)
    resumed.load_state_dict(between)
    assert not resumed.accumulating
    updates = [resumed.train_step(fixed_batch(seed=i))["updated"] for i in range(3)]
    assert updates == [False, False, True] and resumed.global_step == 2
    with pytest.raises(ValueError, match=r"inside an accumulation window of "
                                         r"gradient_accumulation_steps=2; resume it with that "
                                         r"value \(got 3\)"):
        make_trainer(gradient_accumulation_steps=3, use_ema=False).load_state_dict(inside)


def test_stretching_the_lr_schedule_at_resume_warns_with_both_rates():
    """--max-steps on resume re-stretches the schedule: the LR jumped without a word (a
    finished cosine run extended to twice its length went from ~0 to half the peak)."""
    trainer = make_trainer(lr_scheduler="cosine", lr_warmup_steps=0, max_steps=4,
                           use_ema=False)
    for i in range(4):
        trainer.train_step(fixed_batch(seed=i))
    state = trainer.state_dict()
    longer = make_trainer(lr_scheduler="cosine", lr_warmup_steps=0, max_steps=8, use_ema=False)
    with pytest.warns(UserWarning, match=r"the cosine LR schedule now spans max_steps=8 "
                                         r"\(warm-up 0\) instead of 4 \(0\): at step 4 the "
                                         r"LR moves from 0 to 0\.0005"):
        longer.load_state_dict(state)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(lr_scheduler="cosine", lr_warmup_steps=0, max_steps=4,
                     use_ema=False).load_state_dict(state)


def test_resume_position_when_the_global_batch_or_the_data_changed():
    """The saved (epoch, batch) counts the saving run's global batches: resumed under 2
    processes instead of 1, it named other items (4 of the epoch were never seen)."""
    saved = {"global_batch": 4, "dataset_size": 40, "seed": 0, "data_order": DATA_ORDER}
    same = resume_position(2, 3, saved, dict(saved), 10)
    assert same == (2, 3, "")
    assert resume_position(2, 0, saved, {**saved, "dataset_size": 41}, 10) == (2, 0, "")
    # a checkpoint without data_order was shuffled by rule 1 (seed + epoch): the rest of its
    # epoch is another order now; one without the other keys keeps its position otherwise
    for older in ({}, {k: v for k, v in saved.items() if k != "data_order"}):
        epoch, batch, message = resume_position(2, 3, older, dict(saved), 10)
        assert (epoch, batch) == (3, 0) and f"data_order 1 -> {DATA_ORDER}" in message
    for change in ({"dataset_size": 41}, {"seed": 1}, {"dataset_size": 41, "global_batch": 8},
                   {"data_order": DATA_ORDER + 1}):
        epoch, batch, message = resume_position(2, 3, saved, {**saved, **change}, 10)
        assert (epoch, batch) == (3, 0) and "goes on from the start of epoch 3" in message
    # a new global batch (4 -> 8): after the 12 items seen, at batch 2 (items 16..), skipping 4
    epoch, batch, message = resume_position(2, 3, saved, {**saved, "global_batch": 8}, 5)
    assert (epoch, batch) == (2, 2) and "goes on after its first 12 items, at batch 2" in message
    one = GlobalBatchSampler(40, 4, seed=0)
    one.set_position(2, 0)
    first = [i for b, items in zip(range(3), one) for i in items]
    ranks = [GlobalBatchSampler(40, 4, world_size=2, rank=r, seed=0) for r in range(2)]
    rest = []
    for sampler in ranks:
        sampler.set_position(epoch, batch)
        rest += [i for items in sampler for i in items]
    assert not set(first) & set(rest) and len(set(first) | set(rest)) == 40 - 4
    # 4 -> 16 at batch 9 of 10: past the epoch's last batch of 16, the next epoch
    assert resume_position(2, 9, saved, {**saved, "global_batch": 16}, 2)[:2] == (3, 0)


def test_loading_a_checkpoint_drops_the_window_in_progress():
    """Rolling back to a between-windows checkpoint mid-window discards that window's gradients
    and losses: the next update matches a fresh trainer loaded from the same checkpoint."""
    kw = dict(gradient_accumulation_steps=2, use_ema=False)
    trainer = make_trainer(**kw)
    state = trainer.state_dict()
    trainer.train_step(fixed_batch(seed=5))
    assert trainer.accumulating
    trainer.load_state_dict(state)
    fresh = make_trainer(seed=3, **kw)
    fresh.load_state_dict(state)
    last = []
    for t in (trainer, fresh):
        for i in range(2):
            metrics = t.train_step(fixed_batch(seed=i))
        last.append(metrics)
    assert last[0] == last[1] and last[0]["updated"]
    assert_bitwise_equal(trainer.denoiser.state_dict(), fresh.denoiser.state_dict())


def test_parameter_groups_hold_each_trainable_parameter_once():
    """Tied weights go in one group only (AdamW refuses duplicates); frozen ones in none."""
    linear, embedding, norm = torch.nn.Linear(4, 4), torch.nn.Embedding(4, 4), torch.nn.LayerNorm(4)
    embedding.weight = linear.weight
    norm.bias.requires_grad_(False)
    groups = parameter_groups(torch.nn.Sequential(linear, embedding, norm), 0.1)
    ids = [id(p) for group in groups for p in group["params"]]
    assert sorted(ids) == sorted({id(linear.weight), id(linear.bias), id(norm.weight)})
    torch.optim.AdamW(groups)


def test_parameter_groups_by_module_type():
    trainer = make_trainer()
    decay, no_decay = parameter_groups(trainer.denoiser, 0.01)
    decayed = {id(p) for p in decay["params"]}
    for module in trainer.denoiser.modules():
        for name, p in module.named_parameters(recurse=False):
            expect = isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name == "weight"
            assert (id(p) in decayed) == expect, (type(module).__name__, name)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    # the text encoder's position embedding is a bare Parameter: no decay, whatever its name
    assert id(trainer.text_encoder.position_embedding) not in decayed


def test_autocast_dtype_follows_mixed_precision():
    """True means bf16 on the CPU and fp16 on CUDA; False/"no" mean full precision."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(False, cpu) is None and autocast_dtype("no", cuda) is None
    assert autocast_dtype(True, cpu) == torch.bfloat16
    assert autocast_dtype(True, cuda) == torch.float16
    assert autocast_dtype("fp16", cpu) == torch.float16
    assert autocast_dtype("bf16", cuda) == torch.bfloat16


def test_first_update_is_adamw_closed_form():
    """AdamW's first step (Loshchilov & Hutter 2019; both moments bias-corrected, so m = g and
    v = g^2): p <- p (1 - lr wd) - lr g / (|g| + eps), with each group's weight decay, through
    the kernel the trainer picked (fused on the CPU)."""
    trainer = make_trainer(weight_decay=0.1)
    assert all(group["fused"] for group in trainer.optimizer.param_groups)
    g = torch.Generator().manual_seed(0)
    expected = []
    for group in trainer.optimizer.param_groups:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        assert lr > 0
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
            p0, grad = p.detach().double(), p.grad.double()
            expected.append((p, p0 * (1 - lr * wd) - lr * grad / (grad.abs() + eps)))
    assert {group["weight_decay"] for group in trainer.optimizer.param_groups} == {0.1, 0.0}
    trainer.optimizer.step()
    for p, want in expected:
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-8)


def test_resume_keeps_this_devices_adamw_kernel(tmp_path):
    """The fused flag travels in the optimizer's saved groups; a checkpoint written with the
    per-parameter loop (before the trainer chose the fused kernel, or on another device)
    resumes fused on the CPU and still trains."""
    trainer = make_trainer()
    trainer.train_step(fixed_batch())
    for group in trainer.optimizer.param_groups:
        group["fused"] = None
    path = trainer.save_checkpoint(tmp_path / "loop.pt")
    resumed = make_trainer()
    resumed.load_checkpoint(path)
    assert all(group["fused"] is True for group in resumed.optimizer.param_groups)
    before = {n: p.detach().clone() for n, p in resumed.denoiser.named_parameters()}
    assert resumed.train_step(fixed_batch(seed=1))["updated"]
    assert any(not torch.equal(before[n], p) for n, p in resumed.denoiser.named_parameters())


def test_denoiser_cuts_the_text_at_the_longest_prompt():
    """The UNet and the text encoder see the batch's text cut by trim_padding (BOS, the
    longest prompt's bytes, EOS), not all max_text_length positions."""
    trainer = make_trainer(cfg_dropout=0.0)
    lengths = []
    hook = trainer.text_encoder.token_embedding.register_forward_pre_hook(
        lambda module, args: lengths.append(args[0].shape[1]))
    trainer.train_step(fixed_batch())
    hook.remove()
    assert lengths == [max(len(p) for p in PROMPTS) + 2]
    assert lengths[0] < trainer.config.max_text_length


@pytest.mark.parametrize("batch, message", [
    ({"images": torch.zeros(2, 1, 16, 16), "prompts": ["a", "b"]}, r"\(B, 3, H, W\)"),
    ({"images": torch.zeros(2, 3, 16, 16), "prompts": ["a"]}, r"2 images but 1 prompts"),
    ({"images": torch.full((2, 3, 16, 16), 255.0), "prompts": ["a", "b"]},
     r"must lie in \[-1, 1\]; got values in \[255, 255\]"),
    ({"images": torch.full((2, 3, 16, 16), float("nan")), "prompts": ["a", "b"]}, "NaN"),
    ({"pixels": torch.zeros(2, 3, 16, 16)}, r"'images'.*'prompts'.*got a dict with keys "
                                            r"\['pixels'\]"),
    ([torch.zeros(2, 3, 16, 16)], r"'prompts' \(list of B strings\); got list"),
])
def test_bad_batches_are_rejected_before_any_update(batch, message):
    trainer = make_trainer()
    with pytest.raises(ValueError, match=message):
        trainer.train_step(batch)
    assert trainer.global_step == 0 and trainer._micro_step == 0


# ---- LR schedules ----

@given(st.sampled_from(["constant", "constant_with_warmup", "linear", "cosine"]),
       st.integers(0, 50), st.integers(1, 200), st.floats(1e-5, 1e-2))
def test_lr_schedules(name, warmup, total, lr):
    total = max(total, warmup + 1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    values = []
    for _ in range(total + 5):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert all(-1e-15 <= v <= lr * (1 + 1e-12) for v in values)
    if name != "constant" and warmup > 0:
        for step in range(warmup):  # linear from 0
            assert values[step] == pytest.approx(lr * step / warmup, abs=lr * 1e-9)
    if name in ("linear", "cosine"):
        assert values[total] == pytest.approx(0.0, abs=lr * 1e-9)
        assert values[warmup] == pytest.approx(lr)
        for step in range(warmup, total + 5):  # then the closed form, 0 from `total` on
            progress = min((step - warmup) / (total - warmup), 1.0)
            factor = 1 - progress if name == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
            assert values[step] == pytest.approx(lr * factor, abs=lr * 1e-9)
    if name == "constant":
        assert values == [lr] * len(values)


def test_lr_schedule_errors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"name='step' is not one of"):
        get_scheduler("step", optimizer, 0, 10)
    with pytest.raises(ValueError, match=r"num_warmup_steps=-1 must be an int >= 0"):
        get_scheduler("linear", optimizer, -1, 10)
    with pytest.raises(ValueError, match=r"num_training_steps=0 must be an int >= 1"):
        get_scheduler("cosine", optimizer, 0, 0)


def test_warmup_as_long_as_the_run_warns_once_per_trainer():
    """The LR would peak at half and the cosine never decay: a warning naming both numbers
    (not an error, so a few-step smoke run with the default warm-up still runs)."""
    message = r"num_warmup_steps=100 >= num_training_steps=50 \(the config's lr_warmup_steps"
    with pytest.warns(UserWarning, match=message) as record:
        trainer = make_trainer(lr_warmup_steps=100, max_steps=50, use_ema=False)
    assert sum("num_warmup_steps" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train_step(fixed_batch())
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        get_scheduler("constant", optimizer, 100, 50)  # ignores the warm-up
        get_scheduler("cosine", optimizer, 49, 50)
    with pytest.warns(UserWarning, match="num_warmup_steps=50 >= num_training_steps=50"):
        get_scheduler("linear", optimizer, 50, 50)  # as long as the run: never decays either


# ---- EMA ----

@given(st.floats(0.5, 0.999), st.integers(1, 30), st.booleans())
def test_ema_closed_form(decay, k, warmup):
    """Fixed model theta, shadow theta0: after k steps, theta + prod(d_i) (theta0 - theta)."""
    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model, decay=decay, warmup=warmup)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    product = 1.0
    for n in range(k):
        product *= min(decay, (1 + n) / (10 + n)) if warmup else decay
        ema.step(model)
    for name, p in model.named_parameters():
        expected = p.detach() + product * (theta0[name] - p.detach())
        torch.testing.assert_close(ema.shadow[name], expected, rtol=1e-5, atol=1e-6)
    assert ema.num_updates == k


def test_ema_store_copy_restore_is_bitwise():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    ema = EMAModel(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.14159).add_(0.1)
    trained = {n: p.detach().clone() for n, p in model.state_dict().items()}
    ema.step(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ema.average_parameters(model):
            assert not torch.equal(model[0].weight, trained["0.weight"])
            raise RuntimeError("boom")
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name])


def test_trainer_ema_weights_never_leak_into_training():
    trainer = make_trainer(use_ema=True, ema_decay=0.9)
    for i in range(3):
        trainer.train_step(fixed_batch(i))
    trained = {k: v.clone() if isinstance(v, torch.Tensor) else v
               for k, v in trainer.denoiser.state_dict().items()}
    with trainer.ema_weights():
        inside = {k: v.clone() if isinstance(v, torch.Tensor) else v
                  for k, v in trainer.denoiser.state_dict().items()}
    assert any(not torch.equal(inside[k], trained[k]) for k in trained
               if isinstance(trained[k], torch.Tensor))
    assert_bitwise_equal(trainer.denoiser.state_dict(), trained)


def test_ema_state_dict_is_a_snapshot_that_round_trips():
    """state_dict copies the shadow (later steps do not change it); load_state_dict restores
    decay, warm-up, update count and shadow, so the loaded EMA steps like the original."""
    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model, decay=0.8, warmup=False)
    ema.step(model)
    state = ema.state_dict()
    saved = {k: v.clone() for k, v in state["shadow"].items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    other = EMAModel(model, decay=0.3, warmup=True)
    other.load_state_dict(state)
    ema.step(model)
    assert_bitwise_equal(state["shadow"], saved)
    assert (other.decay, other.warmup, other.num_updates) == (0.8, False, 1)
    other.step(model)
    assert_bitwise_equal(other.state_dict(), ema.state_dict())


def test_ema_decay_bounds():
    """decay 0 follows the weights exactly; decay 1 (no warm-up) never moves."""
    model = torch.nn.Linear(3, 2)
    follow, frozen = EMAModel(model, decay=0, warmup=False), EMAModel(model, decay=1, warmup=False)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    follow.step(model)
    frozen.step(model)
    assert_bitwise_equal(follow.shadow, {n: p.detach() for n, p in model.named_parameters()})
    assert_bitwise_equal(frozen.shadow, theta0)


def test_ema_errors():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"decay=1.5 must be a number in \[0, 1\]"):
        EMAModel(model, decay=1.5)
    ema = EMAModel(model)
    with pytest.raises(RuntimeError, match="without a matching store"):
        ema.restore(model)
    with ema.average_parameters(model):
        pass
    with pytest.raises(RuntimeError, match="without a matching store"):
        ema.restore(model)  # a second restore would roll the weights back to a stale copy
    with pytest.raises(ValueError, match="does not match"):
        ema.step(torch.nn.Linear(3, 3, bias=False))
    state = EMAModel(torch.nn.Linear(3, 2)).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatches \['weight: saved \(2, 3\) vs "
                                         r"model \(2, 2\)'\]"):
        ema.load_state_dict(state)
    del state["shadow"]["bias"]
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        ema.load_state_dict(state)


# ---- data order ----

def test_global_batch_sampler_is_resumable_and_splits_ranks():
    full = GlobalBatchSampler(20, 4, seed=3)
    batches = list(full)
    assert len(batches) == 5 and sorted(sum(batches, [])) == list(range(20))
    resumed = GlobalBatchSampler(20, 4, seed=3)
    resumed.set_position(0, 2)
    assert list(resumed) == batches[2:] and len(resumed) == 3
    ranks = [list(GlobalBatchSampler(20, 2, world_size=2, rank=r, seed=3)) for r in (0, 1)]
    for b, batch in enumerate(batches):  # rank r holds the interleaved slice [r::2]
        assert ranks[0][b] == batch[0::2] and ranks[1][b] == batch[1::2]
    other_epoch = GlobalBatchSampler(20, 4, seed=3)
    other_epoch.set_position(1, 0)
    assert list(other_epoch) != batches
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        GlobalBatchSampler(5, 4, world_size=2)
    ragged = list(GlobalBatchSampler(22, 4, seed=3))  # the last 2 items are dropped
    assert len(ragged) == 5 and all(len(batch) == 4 for batch in ragged)
    assert list(GlobalBatchSampler(8, 4, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_each_rank_draws_its_slice_of_the_global_batch_noise():
    """Rank r of N draws the whole global batch's timesteps, noise and dropout and keeps the
    slice GlobalBatchSampler gives it of the data, so N ranks train like one process."""
    trainer = make_trainer(noise_offset=0.1, cfg_dropout=0.5)
    full = trainer._global_draws(torch.Size((6, 3, 16, 16)))
    for rank in range(3):
        trainer.generator.manual_seed(trainer.config.seed)
        trainer.rank, trainer.world_size = rank, 3
        part = trainer._global_draws(torch.Size((2, 3, 16, 16)))
        (index,) = GlobalBatchSampler(6, 2, world_size=3, rank=rank, shuffle=False)
        for mine, whole in zip(part, full):
            assert torch.equal(mine, whole[index])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, MAX_SEED), st.integers(0, 10**6))
def test_adjacent_seeds_do_not_share_epoch_orders(seed, epoch):
    """Epoch e + 1 of seed s - 1 is not epoch e of seed s (with seed + epoch it was, so runs of
    a seed sweep saw the same data orders one epoch apart), and the order is fixed by
    (seed, epoch) alone, through derived_seed, up to the largest config seed."""
    def order(seed, epoch):
        sampler = GlobalBatchSampler(64, 64, seed=seed)
        sampler.set_position(epoch, 0)
        return next(iter(sampler))
    mine = order(seed, epoch)
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch))
    expected = torch.randperm(64, generator=generator)
    assert mine == expected.tolist() == order(seed, epoch)
    assert mine != order(seed - 1, epoch + 1) and mine != order(seed, epoch + 1)


def test_derived_seeds_are_64_bit_and_tell_tuples_apart():
    seeds = {derived_seed(*parts) for parts in [(0, 1), (1, 0), (0, 1, 0), (1,), (MAX_SEED, 10**9)]}
    assert len(seeds) == 5 and all(0 <= s < 2**64 for s in seeds)
    assert dropout_seed(3, 4, 5) == derived_seed(3, 4, 5)


def test_trainer_construction_errors():
    config = tiny_config()
    with pytest.raises(TypeError, match="config must be a DiffusionConfig; got dict"):
        AdvancedDiffusionTrainer(AdvancedUNet(config), config.to_dict())
    with pytest.raises(RuntimeError, match=r"distributed=True needs torch.distributed"):
        AdvancedDiffusionTrainer(AdvancedUNet(config), config, distributed=True)


def test_state_dict_inside_an_accumulation_window_under_ddp_is_an_error():
    """Each rank's window gradients differ until the update's all-reduce: no checkpoint then.
    DDP is detected as a wrapped network (trainer.net is not the bare denoiser); a stand-in
    wrapper plays it here."""
    trainer = make_trainer(gradient_accumulation_steps=2, use_ema=False)
    ddp_stand_in = types.SimpleNamespace(module=trainer.denoiser)
    trainer.net = ddp_stand_in
    assert trainer.state_dict()["accumulation_window"] is None  # between windows: fine
    trainer.net = trainer.denoiser
    trainer.train_step(fixed_batch())
    trainer.net = ddp_stand_in
    with pytest.raises(ValueError, match=r"middle of an accumulation window under DDP "
                                         r"\(micro-step 1, gradient_accumulation_steps 2\)"):
        trainer.state_dict()


@pytest.mark.parametrize("key", ["optimizer", "model", "rng.generator", "counters.micro_step"])
def test_checkpoint_missing_a_key_names_it(tmp_path, key):
    trainer = make_trainer()
    state = trainer.state_dict()
    section, _, inner = key.rpartition(".")
    del (state[section] if section else state)[inner]
    fresh = make_trainer(seed=3)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"missing \['{key}'\]"):
        fresh.load_state_dict(state)
    assert_bitwise_equal(fresh.model.state_dict(), before)  # nothing was half-loaded


def test_load_checkpoint_errors(tmp_path):
    trainer = make_trainer()
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a plain-tensor"):
        trainer.load_checkpoint(tmp_path / "junk.pt")


def test_deterministic_turns_on_deterministic_kernels(monkeypatch):
    """config.deterministic: torch.use_deterministic_algorithms (warn-only: an op without a
    deterministic kernel warns) and cuBLAS's fixed workspace, which it needs for that."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")  # so that teardown removes it
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda mode, *, warn_only=False: calls.append((mode, warn_only)))
    make_trainer(deterministic=False)
    assert calls == [] and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    make_trainer(deterministic=True)
    assert calls == [(True, True)] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
