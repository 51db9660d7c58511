"""Small shared pieces of the tests: a tiny configuration that trains in milliseconds, the
micro model that the trained-model tests train for minutes, and a way to give a model
non-zero weights."""

import torch

from diffusion import DiffusionConfig

TINY = dict(
    model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
    num_heads=2, context_dim=32, text_encoder_width=32, text_encoder_layers=1, sample_size=16,
    dropout=0.0, mixed_precision=False, gradient_checkpointing=False, learning_rate=1e-3,
    lr_warmup_steps=0, max_steps=100, batch_size=4, num_inference_steps=5,
)


# The guide's DiffusionConfig call, field by field (advanced-diffusion-guide.md, Core Components).
GUIDE_DEFAULTS = dict(
    in_channels=3, out_channels=3, model_channels=128, num_res_blocks=2,
    attention_resolutions=(8, 16), dropout=0.1, channel_mult=(1, 2, 4, 8), num_heads=8,
    use_spatial_transformer=True, transformer_depth=1, context_dim=768,
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    prediction_type="epsilon", learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0,
    mixed_precision=True, gradient_checkpointing=True, use_ema=True, ema_decay=0.9999,
    loss_type="l2", snr_gamma=5.0, v_prediction=False, num_inference_steps=50,
    guidance_scale=7.5, eta=0.0,
)


def tiny_config(**overrides) -> DiffusionConfig:
    return DiffusionConfig(**{**TINY, **overrides})


# The micro text-conditioned model of tests/test_end_to_end.py and test_prompt_separation.py.
MICRO = dict(
    sample_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(8,), num_heads=4, context_dim=64, text_encoder_width=64,
    text_encoder_layers=1, dropout=0.0, prediction_type="v_prediction",
    beta_schedule="cosine", learning_rate=2e-3, lr_warmup_steps=50, batch_size=32,
    mixed_precision="no", gradient_checkpointing=False, cfg_dropout=0.1,
)


def micro_config(**overrides) -> DiffusionConfig:
    return DiffusionConfig(**{**MICRO, **overrides})


def train_micro(config: DiffusionConfig, dataset, seed: int = 0):
    """Train a fresh AdvancedUNet on `dataset` (config.max_steps batches, one pass, data order
    `seed`) after torch.manual_seed(seed); returns the AdvancedDiffusionTrainer."""
    from diffusion import AdvancedDiffusionTrainer, GlobalBatchSampler, collate
    from nets import AdvancedUNet

    torch.manual_seed(seed)
    trainer = AdvancedDiffusionTrainer(AdvancedUNet(config), config)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=GlobalBatchSampler(len(dataset), config.batch_size, seed=seed),
        collate_fn=collate)
    for batch in loader:
        trainer.train_step(batch)
    return trainer


def randomize(model: torch.nn.Module, seed=1) -> None:
    """Overwrite every parameter with noise, so zero-initialised layers do not hide paths."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
