"""How AdvancedDiffusionTrainer composes a training step, checked against docs/design.md directly.

Each test pins one piece that a scale-invariant optimizer (AdamW's first step is
p - lr g / (|g| + eps)) would hide from a test that only compares parameters: the gradient's
scale under accumulation, the min-SNR weights per prediction type, the loss's c, offset noise,
and clipping. The gradient the optimizer receives is read by an optimizer step pre-hook; the
network's inputs and output by a forward hook on the denoiser; neither changes the step.
Expected values are computed here from the docs/design.md formulas, not from the trainer's helpers.
"""

import copy
import math

import pytest
import torch
from helpers import randomize, tiny_config

from diffusion import AdvancedDiffusionTrainer
from nets import AdvancedUNet

PROMPTS = ["a red circle", "a blue square", "a green cross", "a cyan triangle"]
# SNR(t) of the linear schedule runs from ~1e4 (t = 0) to ~4e-5 (t = 999): these timesteps put
# samples on both sides of gamma = 5 (SNR ~ 10 near t = 100, ~ 0.5 near t = 400).
TIMESTEPS = torch.tensor([0, 100, 400, 999])
GAMMA = 5.0


def make_trainer(**overrides):
    config = tiny_config(**{"use_ema": False, "cfg_dropout": 0.0, **overrides})
    torch.manual_seed(0)
    model = AdvancedUNet(config)
    randomize(model)  # non-zero output layers, so the prediction depends on the input
    return AdvancedDiffusionTrainer(model, config)


def fixed_batch(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
            "prompts": (PROMPTS * n)[:n]}


def fixed_draws(shape, seed=1, timesteps=TIMESTEPS):
    g = torch.Generator().manual_seed(seed)
    return timesteps.clone(), torch.randn(shape, generator=g), torch.zeros(shape[0], dtype=bool)


def linear_alphas_cumprod(config):
    """abar_t of docs/design.md's `linear` schedule, float64."""
    betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps,
                           dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def min_snr_weight(snr, gamma, prediction_type):
    """docs/design.md: min(SNR, g)/SNR for eps, min(SNR, g)/(SNR + 1) for v, min(SNR, g) for x0."""
    clipped = torch.clamp(snr, max=gamma)
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1),
            "sample": clipped}[prediction_type]


class Recorder:
    """Records the denoiser's inputs and output (forward hook) and the gradients the optimizer
    receives, by parameter name, after clipping (step pre-hook)."""

    def __init__(self, trainer):
        self.calls, self.grads = [], []
        names = {id(p): n for n, p in trainer.denoiser.named_parameters()}
        self._hooks = [
            trainer.denoiser.register_forward_hook(self._forward),
            trainer.optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: self.grads.append(
                    {names[id(p)]: p.grad.detach().clone() for group in opt.param_groups
                     for p in group["params"] if p.grad is not None})),
        ]

    def _forward(self, module, args, output):
        self.calls.append({"args": tuple(a.detach().clone() for a in args),
                           "pred": output.detach().clone()})

    def remove(self):
        for hook in self._hooks:
            hook.remove()


def total_norm(grads):
    return torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads.values()]))


def assert_grads_close(got, expected, rtol=1e-4):
    """Every gradient within rtol of the expected one, elementwise, with an absolute floor of
    rtol times the largest expected entry (float32 rounding of near-zero entries)."""
    assert got.keys() == expected.keys()
    atol = rtol * max(g.abs().max().item() for g in expected.values())
    for name in got:
        torch.testing.assert_close(got[name], expected[name].to(got[name].dtype), rtol=rtol,
                                   atol=atol, msg=name)


# ---- gradient accumulation ----

def test_accumulated_gradient_equals_the_big_batch_gradient():
    """accumulation 2 x batch 2 hands the optimizer the same gradient (and reports the same
    pre-clip grad_norm) as 1 x batch 4, given the same images, timesteps and noise: each
    micro-batch's mean loss is divided by the accumulation steps before backward."""
    batch = fixed_batch()
    draws = fixed_draws(batch["images"].shape)
    big = make_trainer(max_grad_norm=1e6)  # no clipping: compare the raw gradients
    small = make_trainer(max_grad_norm=1e6, gradient_accumulation_steps=2)
    big._global_draws = lambda shape: draws
    halves = iter([tuple(d[:2] for d in draws), tuple(d[2:] for d in draws)])
    small._global_draws = lambda shape: next(halves)
    big_rec, small_rec = Recorder(big), Recorder(small)
    big_metrics = big.train_step(batch)
    first = small.train_step({"images": batch["images"][:2], "prompts": batch["prompts"][:2]})
    second = small.train_step({"images": batch["images"][2:], "prompts": batch["prompts"][2:]})
    assert (first["updated"], second["updated"], big_metrics["updated"]) == (False, True, True)
    assert math.isnan(first["grad_norm"])
    assert len(big_rec.grads) == len(small_rec.grads) == 1
    assert_grads_close(small_rec.grads[0], big_rec.grads[0])
    assert second["grad_norm"] == pytest.approx(big_metrics["grad_norm"], rel=1e-5)
    assert big_metrics["grad_norm"] == pytest.approx(total_norm(big_rec.grads[0]).item(),
                                                     rel=1e-5)


# ---- the loss: min-SNR weights per prediction type, huber_c, and its gradient ----

def expected_loss(trainer, call, images, noise, per_element):
    """mean_b w_b * mean(per_element(pred_b - target_b)) from docs/design.md, for the recorded
    network call; returns it with the target used."""
    cfg = trainer.config
    x_t, t = call["args"][0], call["args"][1]
    abar = linear_alphas_cumprod(cfg)[t].reshape(-1, 1, 1, 1)  # (B, 1, 1, 1) float64
    x0, eps = images.double(), noise.double()
    target = {"epsilon": eps, "sample": x0,
              "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[cfg.prediction_type]
    torch.testing.assert_close(x_t.double(), abar.sqrt() * x0 + (1 - abar).sqrt() * eps,
                               rtol=1e-5, atol=1e-5)
    weight = torch.ones(len(t), dtype=torch.float64)
    if cfg.snr_gamma is not None:
        snr = abar.flatten() / (1 - abar.flatten())
        weight = min_snr_weight(snr, cfg.snr_gamma, cfg.prediction_type)
    return lambda pred: (weight * per_element(pred.double() - target).mean(dim=(1, 2, 3))).mean()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("snr_gamma", [GAMMA, None])
def test_step_loss_and_gradient_are_the_min_snr_weighted_mse(prediction_type, snr_gamma):
    """The reported loss is mean_b w_b ||pred_b - target_b||^2 / n with docs/design.md's min-SNR
    weight for the prediction type, and the gradient the optimizer receives is that loss's
    gradient (max_grad_norm large: no clipping)."""
    trainer = make_trainer(prediction_type=prediction_type, snr_gamma=snr_gamma,
                           max_grad_norm=1e6)
    batch = fixed_batch()
    draws = fixed_draws(batch["images"].shape)
    trainer._global_draws = lambda shape: draws
    reference = copy.deepcopy(trainer.denoiser)  # the weights before the update
    recorder = Recorder(trainer)
    metrics = trainer.train_step(batch)
    (call,) = recorder.calls
    loss_of = expected_loss(trainer, call, batch["images"], draws[1], lambda d: d**2)
    assert metrics["loss"] == pytest.approx(loss_of(call["pred"]).item(), rel=1e-5)

    pred = reference(*call["args"])
    torch.testing.assert_close(pred.detach(), call["pred"], rtol=1e-5, atol=1e-6)
    loss_of(pred).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    (got,) = recorder.grads
    assert_grads_close(got, expected)


def test_min_snr_weights_differ_between_prediction_types_here():
    """Guard for the test above: at these timesteps the three weightings (and no weighting)
    are all different, so using one prediction type's weights for another fails it."""
    snr = linear_alphas_cumprod(tiny_config())[TIMESTEPS]
    snr = snr / (1 - snr)
    assert snr.max() > GAMMA > snr.min()
    weights = [min_snr_weight(snr, GAMMA, p) for p in ("epsilon", "v_prediction", "sample")]
    weights.append(torch.ones_like(snr))
    for i in range(len(weights)):
        for j in range(i):
            assert (weights[i] - weights[j]).abs().max() > 0.1


@pytest.mark.parametrize("huber_c", [0.05, 2.0])
def test_huber_c_from_the_config_reaches_the_loss(huber_c):
    """loss_type='huber' uses the config's huber_c: sqrt(d^2 + c^2) - c per element."""
    trainer = make_trainer(loss_type="huber", huber_c=huber_c, snr_gamma=GAMMA,
                           prediction_type="v_prediction")
    batch = fixed_batch()
    draws = fixed_draws(batch["images"].shape)
    trainer._global_draws = lambda shape: draws
    recorder = Recorder(trainer)
    metrics = trainer.train_step(batch)
    (call,) = recorder.calls
    loss_of = expected_loss(trainer, call, batch["images"], draws[1],
                            lambda d: torch.sqrt(d**2 + huber_c**2) - huber_c)
    assert metrics["loss"] == pytest.approx(loss_of(call["pred"]).item(), rel=1e-5)
    other_c = expected_loss(trainer, call, batch["images"], draws[1],
                            lambda d: torch.sqrt(d**2 + 1e-6) - 1e-3)(call["pred"]).item()
    assert abs(other_c - metrics["loss"]) > 0.01 * metrics["loss"]  # c matters at these d


# ---- offset noise ----

@pytest.mark.parametrize("noise_offset", [0.0, 0.5])
def test_noise_offset_adds_one_gaussian_shift_per_image_and_channel(noise_offset):
    """Offset noise (docs/design.md): eps = N(0, I) + noise_offset * N(0, 1) per (B, C, 1, 1),
    used both to make x_t and as the epsilon target. Recover eps from the recorded x_t: the
    spatial means of its (B, C) planes have variance noise_offset^2 + 1/(HW), and what is left
    after removing them has variance ~1."""
    trainer = make_trainer(noise_offset=noise_offset, prediction_type="epsilon", snr_gamma=None)
    recorder = Recorder(trainer)
    images = torch.zeros(32, 3, 16, 16)  # x0 = 0: x_t = sqrt(1 - abar) eps
    metrics = trainer.train_step({"images": images, "prompts": ["a red circle"] * 32})
    (call,) = recorder.calls
    x_t, t = call["args"][0].double(), call["args"][1]
    abar = linear_alphas_cumprod(trainer.config)[t].reshape(-1, 1, 1, 1)
    eps = x_t / (1 - abar).sqrt()  # (B, C, H, W)
    plane_means = eps.mean(dim=(2, 3))  # (B, C)
    expected_var = noise_offset**2 + 1 / (16 * 16)
    # 96 planes: the sample variance's relative standard error is sqrt(2/95) ~ 0.15
    assert plane_means.var().item() == pytest.approx(expected_var, rel=0.6)
    residual = eps - plane_means[:, :, None, None]
    assert residual.var().item() == pytest.approx(1.0, rel=0.05)
    # the epsilon target is the offset noise itself
    mse = ((call["pred"].double() - eps) ** 2).mean().item()
    assert metrics["loss"] == pytest.approx(mse, rel=1e-4)


# ---- gradient clipping ----

def test_clipping_reports_the_pre_clip_norm_and_hands_the_optimizer_the_clipped_gradient():
    """grad_norm is the norm before clipping; the optimizer receives g * max_grad_norm / |g|
    when |g| > max_grad_norm, and g unchanged when it is not."""
    batch = fixed_batch()
    draws = fixed_draws(batch["images"].shape)
    free = make_trainer(max_grad_norm=1e6)
    free._global_draws = lambda shape: draws
    free_rec = Recorder(free)
    free_metrics = free.train_step(batch)
    (raw,) = free_rec.grads
    raw_norm = total_norm(raw).item()
    assert free_metrics["grad_norm"] == pytest.approx(raw_norm, rel=1e-5)

    max_norm = raw_norm / 10
    clipped = make_trainer(max_grad_norm=max_norm)
    clipped._global_draws = lambda shape: draws
    clipped_rec = Recorder(clipped)
    clipped_metrics = clipped.train_step(batch)
    assert clipped_metrics["grad_norm"] == pytest.approx(raw_norm, rel=1e-5)  # pre-clip
    (got,) = clipped_rec.grads
    assert total_norm(got).item() == pytest.approx(max_norm, rel=1e-4)
    scale = max_norm / raw_norm
    assert_grads_close(got, {n: g * scale for n, g in raw.items()})
