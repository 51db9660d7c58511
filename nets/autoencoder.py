"""The first stage of latent diffusion (Rombach et al. 2022, "LDM"): a KL-regularised
convolutional autoencoder, its diagonal Gaussian posterior, the PatchGAN discriminator its
adversarial loss trains against, and tiled encoding/decoding for images larger than the ones
it was trained on.

Encoder: conv_in, then per level `num_res_blocks` ResBlocks (GroupNorm, SiLU, no timestep)
and a stride-2 conv between levels, a middle of ResBlock [+ self-attention] + ResBlock, and
GroupNorm, SiLU, conv to 2 x latent_channels (mean and log-variance). The decoder mirrors it
with num_res_blocks + 1 ResBlocks per level and nearest-neighbour upsampling. With L =
len(channel_mult) levels the downsampling factor is f = 2^(L-1).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBlock
from .blocks import MAX_NORM_GROUPS, Downsample, Normalize, ResBlock, Upsample

# LDM clamps the log-variance so exp() stays finite in fp32 early in training.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
DEFAULT_TILE_SIZE = 64  # pixels: the shapes autoencoder's training size
DEFAULT_TILE_OVERLAP = 16  # pixels shared by neighbouring tiles, blended linearly
LEAKY_SLOPE = 0.2  # PatchGAN's LeakyReLU (Isola et al. 2017)


def _gaussian_noise(shape, like: torch.Tensor, generator: torch.Generator | None):
    """Standard normal noise of `shape` drawn on the generator's device (the CPU by default, so
    a seed gives the same numbers on any device), then moved to like's device and dtype."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return noise.to(like.device, like.dtype)


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), the encoder's posterior (Kingma & Welling 2014).

    mean, logvar: (B, C, h, w); logvar is clamped to [LOGVAR_MIN, LOGVAR_MAX].
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must "
                             "have the same shape")
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """The encoder's output (B, 2C, h, w): mean channels first, then log-variance."""
        mean, logvar = moments.float().chunk(2, dim=1)  # each (B, C, h, w); fp32 under autocast
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = mean + std * eps (the reparameterisation trick); eps from `generator`, or given."""
        if noise is None:
            noise = _gaussian_noise(self.mean.shape, self.mean, generator)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 1/2 sum(mean^2 + var - 1 - logvar) over C, h, w -> (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


def _middle(channels: int, attention: bool, num_heads: int, groups: int) -> nn.ModuleList:
    """ResBlock, optional self-attention, ResBlock: the bottleneck of encoder and decoder."""
    blocks = [ResBlock(channels, None, max_groups=groups)]
    if attention:
        blocks.append(AttentionBlock(channels, num_heads, groups))
    blocks.append(ResBlock(channels, None, max_groups=groups))
    return nn.ModuleList(blocks)


def _run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


class Encoder(nn.Module):
    """x: (B, in_channels, H, W) -> moments (B, 2 latent_channels, H / f, W / f)."""

    def __init__(self, in_channels: int, latent_channels: int, channels: int,
                 channel_mult: tuple[int, ...], num_res_blocks: int, attention: bool,
                 num_heads: int = 1, max_groups: int = MAX_NORM_GROUPS):
        super().__init__()
        widths = [channels * m for m in channel_mult]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks, c = [], widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, None, width, max_groups=max_groups))
                c = width
            if level < len(widths) - 1:
                blocks.append(Downsample(c))
        self.down = nn.ModuleList(blocks)
        self.mid = _middle(c, attention, num_heads, max_groups)
        self.norm_out = Normalize(c, max_groups)
        self.conv_out = nn.Conv2d(c, 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _run(self.mid, _run(self.down, self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z: (B, latent_channels, h, w) -> (B, out_channels, h f, w f)."""

    def __init__(self, out_channels: int, latent_channels: int, channels: int,
                 channel_mult: tuple[int, ...], num_res_blocks: int, attention: bool,
                 num_heads: int = 1, max_groups: int = MAX_NORM_GROUPS):
        super().__init__()
        widths = [channels * m for m in channel_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.mid = _middle(c, attention, num_heads, max_groups)
        blocks = []
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c, None, widths[level], max_groups=max_groups))
                c = widths[level]
            if level > 0:
                blocks.append(Upsample(c))
        self.up = nn.ModuleList(blocks)
        self.norm_out = Normalize(c, max_groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The output conv's weight: where LDM's adaptive GAN weight compares gradients."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run(self.up, _run(self.mid, self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, size) with at least `overlap` shared
    between neighbours; the last tile ends at `size` (it may overlap its neighbour more)."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_ramp(length: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    """1-D weights of one tile along one axis: rising linearly over `overlap` pixels from
    0.5 / overlap to 1 at a side shared with a neighbour, flat 1 at the image border. Positive
    everywhere, so normalising by the summed weights is always defined. -> (length,)"""
    position = torch.arange(length, dtype=torch.float32) + 0.5
    ramp = torch.ones(length)
    if overlap > 0 and not first:
        ramp = torch.minimum(ramp, position / overlap)
    if overlap > 0 and not last:
        ramp = torch.minimum(ramp, position.flip(0) / overlap)
    return ramp


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int,
                overlap: int, scale: float) -> torch.Tensor:
    """fn applied to overlapping tiles of x and blended: a convex combination at every output
    pixel, so where one tile covers a pixel the output is that tile's value exactly.

    fn maps (B, C, t, t) to (B, C', t * scale, t * scale); tile and overlap are in x's pixels.
    x: (B, C, H, W) -> (B, C', H * scale, W * scale).
    """
    H, W = x.shape[-2:]
    tile_h, tile_w = min(tile, H), min(tile, W)
    rows, cols = tile_starts(H, tile_h, overlap), tile_starts(W, tile_w, overlap)
    out, total = None, None
    for i, y0 in enumerate(rows):
        for j, x0 in enumerate(cols):
            piece = fn(x[..., y0:y0 + tile_h, x0:x0 + tile_w])  # (B, C', th s, tw s)
            ph, pw = piece.shape[-2:]
            oy, ox = round(y0 * scale), round(x0 * scale)
            ov = round(overlap * scale)
            weight = torch.outer(blend_ramp(ph, ov, i == 0, i == len(rows) - 1),
                                 blend_ramp(pw, ov, j == 0, j == len(cols) - 1))
            weight = weight.to(piece.device, piece.dtype)
            if out is None:
                size = (round(H * scale), round(W * scale))
                out = piece.new_zeros(*piece.shape[:2], *size)
                total = piece.new_zeros(size)
            out[..., oy:oy + ph, ox:ox + pw] += piece * weight
            total[oy:oy + ph, ox:ox + pw] += weight
    return out / total


class AutoencoderKL(nn.Module):
    """LDM's KL autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`.

    x: (B, in_channels, H, W) in [-1, 1] with H, W multiples of `downsampling_factor`;
    z: (B, latent_channels, H / f, W / f).
    norm_groups caps the GroupNorm groups: a narrow autoencoder with the UNet's 32 would
    have one channel per group at its widest level, which normalises away each channel's mean
    over the image (its colour), and trains far slower (docs/latent.md).
    `enable_slicing()` runs encode and decode one image at a time (the same numbers, lower
    peak memory); `enable_tiling(tile_size, overlap)` runs them on overlapping tiles of
    tile_size pixels blended across the seams (tiled_apply), so an image larger than the
    training size never passes through the network whole.
    """

    def __init__(self, in_channels: int = 3, latent_channels: int = 4, channels: int = 64,
                 channel_mult: tuple[int, ...] = (1, 2, 4), num_res_blocks: int = 1,
                 attention: bool = True, num_heads: int = 1,
                 norm_groups: int = MAX_NORM_GROUPS):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("latent_channels", latent_channels),
                            ("channels", channels), ("num_res_blocks", num_res_blocks),
                            ("norm_groups", norm_groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AutoencoderKL {name}={value!r} must be a positive int")
        if not channel_mult or any(m < 1 for m in channel_mult):
            raise ValueError(f"AutoencoderKL channel_mult={channel_mult!r} must be a non-empty "
                             "list of positive ints")
        args = (latent_channels, channels, tuple(channel_mult), num_res_blocks, attention,
                num_heads, norm_groups)
        self.encoder = Encoder(in_channels, *args)
        self.decoder = Decoder(in_channels, *args)
        self.in_channels, self.latent_channels = in_channels, latent_channels
        self.downsampling_factor = 2 ** (len(channel_mult) - 1)
        self.use_slicing = False
        self.tile_size: int | None = None
        self.tile_overlap = DEFAULT_TILE_OVERLAP

    @classmethod
    def from_config(cls, config) -> "AutoencoderKL":
        """From a DiffusionConfig's autoencoder fields (read by attribute): in_channels (of the
        images), latent_channels, ae_channels, ae_channel_mult, ae_num_res_blocks,
        ae_attention, ae_norm_groups."""
        return cls(config.in_channels, config.latent_channels, config.ae_channels,
                   tuple(config.ae_channel_mult), config.ae_num_res_blocks, config.ae_attention,
                   norm_groups=config.ae_norm_groups)

    # ---- memory toggles ----

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_size: int = DEFAULT_TILE_SIZE,
                      overlap: int = DEFAULT_TILE_OVERLAP) -> None:
        """Tiles of tile_size pixels sharing `overlap` pixels; both multiples of f, with
        0 <= overlap < tile_size."""
        f = self.downsampling_factor
        for name, value, kind in (("tile_size", tile_size, "positive"),
                                  ("overlap", overlap, "non-negative")):
            low = 1 if kind == "positive" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low or value % f:
                raise ValueError(f"{name}={value!r} must be a {kind} multiple of the "
                                 f"autoencoder's downsampling factor {f}")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"overlap={overlap} must be smaller than tile_size={tile_size}")
        self.tile_size, self.tile_overlap = tile_size, overlap

    def disable_tiling(self) -> None:
        self.tile_size = None

    # ---- encode / decode ----

    def _check(self, x: torch.Tensor, name: str, channels: int, multiple: int) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be a (B, {channels}, H, W) tensor; got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"{name} has height x width {x.shape[-2]} x {x.shape[-1]}; both "
                             f"must be multiples of the downsampling factor {multiple}")

    def _sliced(self, fn, x: torch.Tensor) -> torch.Tensor:
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])
        return fn(x)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) -> the posterior over z (B, latent_channels, H/f, W/f)."""
        f = self.downsampling_factor
        self._check(x, "x", self.in_channels, f)
        fn = self.encoder
        if self.tile_size is not None:
            def fn(piece):
                return tiled_apply(self.encoder, piece, self.tile_size, self.tile_overlap, 1 / f)
        return DiagonalGaussian.from_moments(self._sliced(fn, x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent_channels, h, w) -> (B, in_channels, h f, w f)."""
        self._check(z, "z", self.latent_channels, 1)
        fn = self.decoder
        if self.tile_size is not None:
            f = self.downsampling_factor

            def fn(piece):
                return tiled_apply(self.decoder, piece, self.tile_size // f,
                                   self.tile_overlap // f, f)
        return self._sliced(fn, z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                sample_posterior: bool = True, noise: torch.Tensor | None = None):
        """(reconstruction, posterior); z is a posterior sample (or its mean)."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, as LDM uses it): a real/fake logit for each
    overlapping patch. 4x4 convs, stride 2 for `num_layers` layers (channels doubling, capped
    at 8x), then two stride-1 convs; GroupNorm after every conv but the first and last (LDM
    uses BatchNorm; GroupNorm keeps no running statistics to save and resume).

    x: (B, in_channels, H, W) -> logits (B, 1, H', W').
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1),
                                   nn.LeakyReLU(LEAKY_SLOPE)]
        c = channels
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1
            out = channels * min(2 ** n, 8)
            layers += [nn.Conv2d(c, out, 4, stride, 1, bias=False), Normalize(out),
                       nn.LeakyReLU(LEAKY_SLOPE)]
            c = out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
