"""Small shared pieces of the tests: a tiny configuration that trains in milliseconds."""

from diffusion import DiffusionConfig

TINY = dict(
    model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
    num_heads=2, context_dim=32, text_encoder_width=32, text_encoder_layers=1, sample_size=16,
    dropout=0.0, mixed_precision=False, gradient_checkpointing=False, learning_rate=1e-3,
    lr_warmup_steps=0, max_steps=100, batch_size=4, num_inference_steps=5,
)


def tiny_config(**overrides) -> DiffusionConfig:
    return DiffusionConfig(**{**TINY, **overrides})
