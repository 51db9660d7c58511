"""The UNet (Ronneberger et al. 2015) of DDPM / guided-diffusion / latent diffusion, and
`AdvancedUNet`, the guide's wrapper around it.

Layout, for channel_mult of length L (level i works at sample_size / 2**i pixels):
  conv_in -> down_blocks[0..L-1] -> mid_block -> up_blocks[0..L-1] -> GroupNorm-SiLU-conv_out
- down_blocks[i]: num_res_blocks x (ResBlock [+ attention]), then a Downsample (not on the
  last level). Every output is kept as a skip connection (as is conv_in's).
- mid_block: ResBlock, attention, ResBlock (attention always, whatever the levels).
- up_blocks[j] works on level L-1-j: (num_res_blocks + 1) x (ResBlock on [h, skip]
  [+ attention]), then an Upsample (not on the last block).
"Attention" is a SpatialTransformer (self- and cross-attention to the text states) when
use_spatial_transformer, else a plain self-attention AttentionBlock that takes no text.

Attention placement: `attention_resolutions` are feature-map sizes for an input of
`sample_size` (docs/design.md); they are turned into level indices once, at construction
(level i has size sample_size // 2**i). The model then applies attention at those same
levels for any input size, so a model built for 64x64 runs at 32x32 or 64x96 with the same
weights and the same layout.
"""

import warnings

import torch
from torch import nn

from .attention import (
    AttentionBlock,
    AttentionPool,
    CrossAttention,
    SpatialTransformer,
    check_backend,
    check_mask_dtype,
    check_slice_size,
)
from .blocks import MAX_NORM_GROUPS, Downsample, Normalize, ResBlock, Upsample
from .cpu import cpu_has_fast_low_precision
from .embeddings import TimestepEmbedding, timesteps_as_batch
from .levels import DownBlock, MidBlock, UpBlock

TEXT_POOLINGS = ("mean", "attention", "bag")  # how pooled_text_conditioning pools the prompt
TIME_EMBED_MULT = 4  # timestep-embedding width / model_channels (guided-diffusion)
# input dtypes autocast converts to its compute dtype (float64 it leaves alone)
AUTOCAST_INPUT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def attention_levels_for(attention_resolutions, sample_size: int, num_levels: int
                         ) -> tuple[int, ...]:
    """Level indices whose feature-map size (sample_size // 2**level) is listed in
    `attention_resolutions`. Entries that match no level are reported with one warning."""
    if sample_size % 2 ** (num_levels - 1):
        raise ValueError(
            f"sample_size={sample_size} must be divisible by the total downsampling "
            f"{2 ** (num_levels - 1)} of {num_levels} levels (len(channel_mult))")
    sizes = [sample_size // 2 ** level for level in range(num_levels)]
    unmatched = sorted(set(attention_resolutions) - set(sizes))
    if unmatched:
        warnings.warn(
            f"attention_resolutions entries {unmatched} match no level: the feature-map sizes "
            f"for sample_size={sample_size} are {sizes}; those entries are ignored (the mid "
            f"block always has attention)", stacklevel=3)
    return tuple(level for level, size in enumerate(sizes) if size in attention_resolutions)


def masked_mean(context, key_padding_mask):
    """Mean over the real tokens: context (B, M, D), key_padding_mask (B, M) bool (True = real)
    or None (all real) -> (B, D)."""
    if key_padding_mask is None:
        return context.mean(dim=1)
    weights = key_padding_mask.to(context.dtype)[..., None]  # (B, M, 1)
    return (context * weights).sum(dim=1) / weights.sum(dim=1)


class UNet(nn.Module):
    """Timestep- and text-conditioned UNet; see the module docstring for the layout.

    forward(sample: (B, in_channels, H, W), timestep: int | 0-d | (B,) tensor,
            context: (B, M, context_dim) | None, key_padding_mask: (B, M) bool | None)
      -> (B, out_channels, H, W). H and W must be divisible by 2**(L-1).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, model_channels: int = 128,
                 num_res_blocks: int = 2, attention_levels=(), dropout: float = 0.0,
                 channel_mult=(1, 2, 4, 8), num_heads: int = 8,
                 use_spatial_transformer: bool = True, transformer_depth: int = 1,
                 context_dim: int | None = 768, use_scale_shift_norm: bool = True,
                 pooled_text: bool = False, text_pooling: str = "mean",
                 norm_groups: int = MAX_NORM_GROUPS):
        super().__init__()
        num_levels = len(channel_mult)
        widths = [model_channels * m for m in channel_mult]
        for width in widths:
            if width % num_heads:
                raise ValueError(f"num_heads={num_heads} must divide every level's channels "
                                 f"model_channels * channel_mult = {widths}")
        bad_levels = [lv for lv in attention_levels if not 0 <= lv < num_levels]
        if bad_levels:
            raise ValueError(f"attention_levels={tuple(attention_levels)} must be level "
                             f"indices in 0..{num_levels - 1}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_levels = num_levels
        self.attention_levels = tuple(sorted(set(attention_levels)))
        if text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling={text_pooling!r} must be one of {TEXT_POOLINGS}")
        if pooled_text and not use_spatial_transformer:
            raise ValueError("pooled_text=True needs use_spatial_transformer=True (a model "
                             "without text input has no prompt to pool)")
        self.context_dim = context_dim if use_spatial_transformer else None
        emb_dim = TIME_EMBED_MULT * model_channels

        def res(c_in, c_out):
            return ResBlock(c_in, emb_dim, c_out, dropout, use_scale_shift_norm,
                            max_groups=norm_groups)

        def attn(channels):
            if use_spatial_transformer:
                return SpatialTransformer(channels, num_heads, channels // num_heads,
                                          transformer_depth, dropout, context_dim, norm_groups)
            return AttentionBlock(channels, num_heads, norm_groups)

        self.time_embedding = TimestepEmbedding(model_channels, emb_dim)
        # Optional: the prompt's pooled text state, projected, is added to the timestep
        # embedding (Imagen's pooled text embedding, Saharia et al. 2022), so every ResBlock
        # is conditioned on the prompt, not only the attention levels. Pooled by the masked
        # mean, by attention from a learned query (AttentionPool, num_heads heads), or ("bag")
        # read off the first state, where the text encoder puts its caption summary.
        self.text_pool_proj = nn.Linear(context_dim, emb_dim) if pooled_text else None
        self.text_pooling = text_pooling
        self.text_pool = AttentionPool(context_dim, num_heads) if (
            pooled_text and text_pooling == "attention") else None
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        skip_widths = [model_channels]
        ch = model_channels
        self.down_blocks = nn.ModuleList()
        for level, width in enumerate(widths):
            resnets, attentions = [], []
            for _ in range(num_res_blocks):
                resnets.append(res(ch, width))
                ch = width
                if level in self.attention_levels:
                    attentions.append(attn(ch))
                skip_widths.append(ch)
            downsample = None
            if level < num_levels - 1:
                downsample = Downsample(ch)
                skip_widths.append(ch)
            self.down_blocks.append(DownBlock(resnets, attentions, downsample))

        self.mid_block = MidBlock(res(ch, ch), attn(ch), res(ch, ch))

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(num_levels)):
            width = widths[level]
            resnets, attentions = [], []
            for _ in range(num_res_blocks + 1):
                resnets.append(res(ch + skip_widths.pop(), width))
                ch = width
                if level in self.attention_levels:
                    attentions.append(attn(ch))
            upsample = Upsample(ch) if level > 0 else None
            self.up_blocks.append(UpBlock(resnets, attentions, upsample))

        self.norm_out = Normalize(ch, norm_groups)
        self.act_out = nn.SiLU()
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)  # zero-initialised
        self._said_xformers = False  # enable_xformers_memory_efficient_attention says so once

    @classmethod
    def from_config(cls, config) -> "UNet":
        """Build from a DiffusionConfig-like object (read by attribute)."""
        levels = attention_levels_for(config.attention_resolutions, config.sample_size,
                                      len(config.channel_mult))
        return cls(
            in_channels=config.in_channels, out_channels=config.out_channels,
            model_channels=config.model_channels, num_res_blocks=config.num_res_blocks,
            attention_levels=levels, dropout=config.dropout,
            channel_mult=tuple(config.channel_mult), num_heads=config.num_heads,
            use_spatial_transformer=config.use_spatial_transformer,
            transformer_depth=config.transformer_depth, context_dim=config.context_dim,
            use_scale_shift_norm=config.use_scale_shift_norm,
            pooled_text=config.pooled_text_conditioning, text_pooling=config.text_pooling,
            norm_groups=config.norm_groups)

    @property
    def downsampling_factor(self) -> int:
        """Total downsampling 2**(L-1): H and W of the input must be multiples of it."""
        return 2 ** (self.num_levels - 1)

    @property
    def has_cross_attention(self) -> bool:
        return self.context_dim is not None

    def pooled_text(self, context, key_padding_mask=None):
        """The prompt's pooled text state (B, context_dim) that text_pool_proj reads: the
        masked mean of context (B, M, context_dim), AttentionPool's output, or ("bag") the
        first state, where TextEncoder(summary=True) puts its bag-of-tokens summary."""
        if self.text_pool is not None:
            return self.text_pool(context, key_padding_mask)
        if self.text_pooling == "bag":
            return context[:, 0]
        return masked_mean(context, key_padding_mask)

    # ---- toggles ----
    def _level_blocks(self):
        return [*self.down_blocks, self.mid_block, *self.up_blocks]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each ResBlock and attention block in the backward pass instead of
        storing its activations (torch.utils.checkpoint, non-reentrant): only block inputs
        and skip connections stay in memory."""
        for block in self._level_blocks():
            block.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        for block in self._level_blocks():
            block.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(block.gradient_checkpointing for block in self._level_blocks())

    def _attention_layers(self):
        return [m for m in self.modules() if isinstance(m, CrossAttention)]

    def set_attention_slice(self, slice_size) -> None:
        """Attention slicing: None (off), 'auto' (two slices) or queries per slice."""
        slice_size = check_slice_size(slice_size)
        for layer in self._attention_layers():
            layer.slice_size = slice_size

    def enable_attention_slicing(self, slice_size="auto") -> None:
        self.set_attention_slice(slice_size)

    def disable_attention_slicing(self) -> None:
        self.set_attention_slice(None)

    def set_attention_backend(self, backend) -> None:
        """SDPA kernel choice for every attention layer: None (PyTorch picks), 'math',
        'flash', 'efficient' or 'explicit' (see nets.attention.ATTENTION_BACKENDS)."""
        backend = check_backend(backend)
        for layer in self._attention_layers():
            layer.backend = backend

    def enable_xformers_memory_efficient_attention(self) -> None:
        """xformers is not a dependency: this selects PyTorch's memory-efficient SDPA kernel
        (the fused flash kernel on CPU) and says so, once per model."""
        self.set_attention_backend("efficient")
        if not self._said_xformers:
            self._said_xformers = True
            warnings.warn("enable_xformers_memory_efficient_attention: xformers is not a "
                          "dependency; attention uses PyTorch's memory-efficient SDPA kernel "
                          "instead (the fused flash kernel on CPU)", stacklevel=2)

    def disable_xformers_memory_efficient_attention(self) -> None:
        self.set_attention_backend(None)

    # ---- forward ----
    def _check_dtypes(self, sample, context) -> None:
        """sample and context must be floating and in the parameters' dtype (a float64 array
        from numpy would otherwise fail inside the first conv). Under autocast on their
        device float32, float16 and bfloat16 are also accepted: autocast casts those (never
        float64) to the compute dtype. Other checks are _check_inputs'."""
        dtype = self.conv_in.weight.dtype
        for name, x in (("sample", sample), ("encoder_hidden_states", context)):
            if not isinstance(x, torch.Tensor):
                continue  # None, or not a tensor: _check_inputs says what is wrong
            allowed = {dtype}
            if torch.is_autocast_enabled(x.device.type):
                allowed |= AUTOCAST_INPUT_DTYPES
            if x.dtype not in allowed:
                under = " under autocast" if len(allowed) > 1 else ""
                raise TypeError(
                    f"{name} must be a float tensor of dtype "
                    f"{' or '.join(sorted(str(d) for d in allowed))} (the model's parameters "
                    f"are {dtype}{under}); got dtype {x.dtype}. Convert it, e.g. "
                    f"{name}.to({dtype})")

    def _check_inputs(self, sample, context, key_padding_mask):
        """Validate the inputs; return key_padding_mask as bool, or None when all real."""
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a (B, C, H, W) tensor; got "
                            f"{type(sample).__name__}")
        if sample.dim() != 4 or sample.shape[1] != self.in_channels:
            raise ValueError(f"sample must have shape (B, in_channels={self.in_channels}, H, W);"
                             f" got {tuple(sample.shape)}")
        factor = self.downsampling_factor
        if sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(
                f"sample height and width must be divisible by the total downsampling "
                f"{factor} (2**(len(channel_mult)-1)); got H, W = {tuple(sample.shape[-2:])}")
        batch = sample.shape[0]
        if not self.has_cross_attention:
            if context is not None or key_padding_mask is not None:
                raise ValueError(
                    "encoder_hidden_states/encoder_attention_mask were passed to a model built "
                    "without cross-attention (use_spatial_transformer=False); pass None")
            return None
        if context is None:
            raise ValueError(
                f"encoder_hidden_states is required by a model with cross-attention "
                f"(use_spatial_transformer=True): a (B, M, context_dim={self.context_dim}) "
                f"tensor; got None. For unconditional inputs pass the encoding of the empty "
                f"prompt ''")
        if (not isinstance(context, torch.Tensor) or context.dim() != 3
                or context.shape[-1] != self.context_dim):
            shape = tuple(context.shape) if isinstance(context, torch.Tensor) else context
            raise ValueError(f"encoder_hidden_states must have shape (B, M, context_dim="
                             f"{self.context_dim}); got {shape}")
        if context.shape[0] != batch:
            raise ValueError(f"encoder_hidden_states batch must equal the sample's batch "
                             f"{batch}; got {context.shape[0]} (shape {tuple(context.shape)})")
        if key_padding_mask is None:
            return None
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.shape != (
                batch, context.shape[1]):
            shape = (tuple(key_padding_mask.shape) if isinstance(key_padding_mask, torch.Tensor)
                     else key_padding_mask)
            raise ValueError(f"encoder_attention_mask must have shape (B, M)=({batch}, "
                             f"{context.shape[1]}); got {shape}")
        key_padding_mask = check_mask_dtype(key_padding_mask, "encoder_attention_mask")
        real = key_padding_mask.sum(dim=1)  # (B,)
        if bool((real == 0).any()):
            raise ValueError("encoder_attention_mask has a row with no real token (all False);"
                             " every prompt keeps at least BOS and EOS")
        if bool((real == key_padding_mask.shape[1]).all()):
            return None  # nothing to mask: lets SDPA take its unmasked fast path
        return key_padding_mask

    # Under CPU autocast to a dtype this CPU cannot run natively, compute in fp32 instead (with
    # one warning): same numbers as fp32, never the 4-100x slowdown. Set to False to force
    # the emulated low-precision path (the tests do, to check it).
    fp32_when_cpu_autocast_is_slow = True

    def forward(self, sample, timestep, context=None, key_padding_mask=None):
        self._check_dtypes(sample, context)  # before the fallback below casts to fp32
        if (self.fp32_when_cpu_autocast_is_slow and isinstance(sample, torch.Tensor)
                and sample.device.type == "cpu"
                and self.conv_in.weight.dtype == torch.float32  # a bf16 model runs as it is
                and torch.is_autocast_enabled("cpu")
                and not cpu_has_fast_low_precision(torch.get_autocast_dtype("cpu"))):
            warnings.warn(
                f"autocast to {torch.get_autocast_dtype('cpu')} is emulated on this CPU (no "
                "native support in oneDNN) and would be several times slower than fp32; the "
                "UNet runs in fp32 instead (UNet.fp32_when_cpu_autocast_is_slow)", stacklevel=2)
            with torch.autocast("cpu", enabled=False):
                return self._forward(sample.float(), timestep,
                                     None if context is None else context.float(),
                                     key_padding_mask)
        return self._forward(sample, timestep, context, key_padding_mask)

    def _forward(self, sample, timestep, context, key_padding_mask):
        """forward() without the autocast check; same arguments and result."""
        key_padding_mask = self._check_inputs(sample, context, key_padding_mask)
        timesteps = timesteps_as_batch(timestep, sample.shape[0], sample.device)
        emb = self.time_embedding(timesteps)  # (B, 4 * model_channels)
        if self.text_pool_proj is not None:
            emb = emb + self.text_pool_proj(self.pooled_text(context, key_padding_mask))

        h = self.conv_in(sample)  # (B, model_channels, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context, key_padding_mask)
            skips.extend(block_skips)
        h = self.mid_block(h, emb, context, key_padding_mask)
        for block in self.up_blocks:
            h = block(h, skips, emb, context, key_padding_mask)
        out = self.conv_out(self.act_out(self.norm_out(h)))  # (B, out_channels, H, W)
        return out


class AdvancedUNet(nn.Module):
    """The guide's model: `AdvancedUNet(config)(sample, timestep, encoder_hidden_states)`
    returns {"sample": (B, out_channels, H, W)}; the network itself is `.unet`.

    The config is applied at construction: `gradient_checkpointing` enables checkpointing
    (it only acts while autograd records, so inference is unaffected; the guide's explicit
    `model.unet.enable_gradient_checkpointing()` is then a harmless repeat),
    `use_attention_slicing` turns slicing on ("auto"), `use_xformers` selects the
    memory-efficient SDPA kernel, and `compile` compiles `.unet` in place
    (`nn.Module.compile`, so state_dict keys are unchanged).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        # Built on the meta device (no memory, no default init), then allocated once:
        # _init_weights() is the only place weights get values, and the ~400M parameters of
        # the guide's default are not randomly initialised twice.
        with torch.device("meta"):
            self.unet = UNet.from_config(config)
        self.unet.to_empty(device=torch.get_default_device())
        self._init_weights()
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if config.use_attention_slicing:
            self.unet.enable_attention_slicing()
        if config.use_xformers:
            self.unet.enable_xformers_memory_efficient_attention()
        if config.compile:
            self.unet.compile()

    @property
    def has_cross_attention(self) -> bool:
        """Whether the network reads text (use_spatial_transformer=True); without it the model
        is unconditional and takes no encoder_hidden_states."""
        return self.unet.has_cross_attention

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The one place weights are set (the guide's "Weight Initialization").

        Linear: Xavier-uniform; Conv2d: Kaiming-normal (fan-in, ReLU gain); biases zero;
        GroupNorm/LayerNorm: weight 1, bias 0. Then the last layer of every residual branch
        (ResBlock.conv2, SpatialTransformer.proj_out, AttentionBlock's output projection) and
        the output conv are zeroed.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
            elif isinstance(module, AttentionPool):
                nn.init.normal_(module.query)
            elif any(True for _ in module.parameters(recurse=False)):
                raise TypeError(f"_init_weights does not know how to initialise "
                                f"{type(module).__name__}; add a rule for it here")
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        for module in self.modules():
            # Zero residual branches start every block as the identity, so the signal's scale
            # does not grow with depth and early training is stable (Goyal et al. 2017;
            # guided-diffusion's zero_module; Rombach et al. 2022's proj_out).
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.conv2.weight)
            elif isinstance(module, SpatialTransformer):
                nn.init.zeros_(module.proj_out.weight)
            elif isinstance(module, AttentionBlock):
                nn.init.zeros_(module.attn.to_out[0].weight)
        # A zero output conv makes the untrained model predict 0, the mean of the noise
        # (and velocity) targets, so the first loss is the target's variance, not a blow-up.
        nn.init.zeros_(self.unet.conv_out.weight)

    def forward(self, sample, timestep, encoder_hidden_states=None,
                encoder_attention_mask=None) -> dict:
        """sample: (B, in_channels, H, W); timestep: int, 0-d or (B,) tensor;
        encoder_hidden_states: (B, M, context_dim); encoder_attention_mask: (B, M) bool,
        True for real tokens. Returns {"sample": (B, out_channels, H, W)}."""
        out = self.unet(sample, timestep, encoder_hidden_states, encoder_attention_mask)
        return {"sample": out}

    # Convenience: the toggles live on `.unet`; these forward to it.
    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()

    def enable_attention_slicing(self, slice_size="auto") -> None:
        self.unet.enable_attention_slicing(slice_size)

    def disable_attention_slicing(self) -> None:
        self.unet.disable_attention_slicing()

    def enable_xformers_memory_efficient_attention(self) -> None:
        self.unet.enable_xformers_memory_efficient_attention()
