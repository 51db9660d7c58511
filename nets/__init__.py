"""The networks, a leaf package (imports nothing from the project): the UNet with its blocks,
attention and timestep embedding, the from-scratch byte-level text encoder, and the KL
autoencoder of latent diffusion with its PatchGAN discriminator."""

from .attention import (
    ATTENTION_BACKENDS,
    GEGLU,
    AttentionBlock,
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
    attention,
    explicit_attention,
)
from .autoencoder import (
    AutoencoderKL,
    DiagonalGaussian,
    PatchDiscriminator,
    blend_ramp,
    tile_starts,
    tiled_apply,
)
from .blocks import Downsample, Dropout, Normalize, ResBlock, Upsample, norm_groups
from .cpu import (
    cpu_has_fast_low_precision,
    keep_freed_memory,
    prepacked_for_cpu_inference,
)
from .denoiser import TextConditionedDenoiser
from .embeddings import TimestepEmbedding, timestep_embedding, timesteps_as_batch
from .levels import DownBlock, MidBlock, UpBlock
from .text_encoder import (
    ByteTokenizer,
    TextEncoder,
    TextTransformerBlock,
    WordTokenizer,
    build_text_encoder,
    trim_padding,
)
from .unet import AdvancedUNet, UNet, attention_levels_for, masked_mean

__all__ = [
    "ATTENTION_BACKENDS",
    "AdvancedUNet",
    "AttentionBlock",
    "AutoencoderKL",
    "DiagonalGaussian",
    "PatchDiscriminator",
    "blend_ramp",
    "tile_starts",
    "tiled_apply",
    "BasicTransformerBlock",
    "ByteTokenizer",
    "CrossAttention",
    "DownBlock",
    "Downsample",
    "Dropout",
    "FeedForward",
    "GEGLU",
    "MidBlock",
    "Normalize",
    "ResBlock",
    "SpatialTransformer",
    "TextEncoder",
    "WordTokenizer",
    "build_text_encoder",
    "TextTransformerBlock",
    "TimestepEmbedding",
    "UNet",
    "UpBlock",
    "Upsample",
    "attention",
    "attention_levels_for",
    "cpu_has_fast_low_precision",
    "explicit_attention",
    "keep_freed_memory",
    "masked_mean",
    "norm_groups",
    "prepacked_for_cpu_inference",
    "timestep_embedding",
    "timesteps_as_batch",
    "trim_padding",
    "TextConditionedDenoiser",
]
