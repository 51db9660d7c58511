"""Convolutional blocks of the UNet: ResBlock, Downsample, Upsample (Ho et al. 2020;
Dhariwal & Nichol 2021, "guided-diffusion"), and the GroupNorm rule they share."""

import math
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

MAX_NORM_GROUPS = 32  # GroupNorm groups of guided-diffusion / Stable Diffusion
GROUP_NORM_EPS = 1e-5
DROPOUT_BITS = 16  # resolution of the CPU dropout's random numbers: p is rounded to 1/65536


def norm_groups(channels: int, max_groups: int = MAX_NORM_GROUPS) -> int:
    """Groups for GroupNorm over `channels`: gcd(channels, 32).

    That is 32 for every width the guide uses (multiples of 32) and the largest power of two
    dividing `channels` below that, so tiny test widths (8, 16, 48) still build: 8 -> 8
    groups, 16 -> 16, 48 -> 16, 3 -> 1.
    """
    return math.gcd(channels, max_groups)


def Normalize(channels: int, max_groups: int = MAX_NORM_GROUPS) -> nn.GroupNorm:
    """GroupNorm with `norm_groups(channels, max_groups)` groups (Wu & He 2018)."""
    return nn.GroupNorm(norm_groups(channels, max_groups), channels, eps=GROUP_NORM_EPS)


class Dropout(nn.Module):
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p and
    scale the rest by 1 / (1 - p), in training mode only.

    On CUDA and under torch.compile this is F.dropout. In eager mode on the CPU, F.dropout
    draws one Bernoulli sample per element with a slow generator (~10% of a UNet training step
    at dropout 0.1); here each 64-bit random integer gives four 16-bit uniform numbers
    instead, so p is rounded to a multiple of 2**-16 (0.1 -> 0.100006) and the scale uses that
    rounded p, keeping the expectation exact. The global torch RNG is used, so
    torch.manual_seed and checkpoint recomputation reproduce the mask.
    x: any shape and memory format -> same.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p={p} must be in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)  # fused kernels (CUDA, inductor)
        levels = 2 ** DROPOUT_BITS
        drop_levels = min(round(self.p * levels), levels - 1)  # drop draws below this level
        lanes = 64 // DROPOUT_BITS
        bits = torch.empty(-(-x.numel() // lanes), dtype=torch.int64, device=x.device)
        bits = bits.random_(-2 ** 63, None)
        draws = bits.view(torch.int16)[:x.numel()]  # (numel,) uniform in [-2^15, 2^15)
        # lay the draws out in x's memory order (e.g. channels_last) so the product keeps it
        order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
        draws = draws.view([x.shape[d] for d in order]).permute(
            [order.index(d) for d in range(x.dim())])  # x.shape, x's strides
        keep = draws >= drop_levels - levels // 2
        return x * keep * (levels / (levels - drop_levels))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Downsample(nn.Module):
    """Halve H and W: 3x3 conv with stride 2 (`use_conv`) or 2x2 average pooling.

    x: (B, C, H, W) -> (B, out_channels, H/2, W/2).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError(f"Downsample without a conv keeps the channels; got "
                             f"channels={channels}, out_channels={out_channels}")
        else:
            self.op = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv (`use_conv`).

    x: (B, C, H, W) -> (B, out_channels, 2H, 2W).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError(f"Upsample without a conv keeps the channels; got "
                             f"channels={channels}, out_channels={out_channels}")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """Residual block with timestep conditioning (guided-diffusion, Dhariwal & Nichol 2021).

    h = conv(SiLU(GN(x)));  h = GN(h) * (1 + scale) + shift  with (scale, shift) = Linear(SiLU(emb))
    when `use_scale_shift_norm` (else h = GN(h + Linear(SiLU(emb))));  h = conv(dropout(SiLU(h)));
    return skip(x) + h, where skip is the identity or a 1x1 conv when the channels change.
    `up` / `down` resample both paths inside the block (nearest / average pooling), as
    guided-diffusion's `resblock_updown`. Without scale-shift, GN removes each group's mean,
    so with one channel per group (out_channels <= 32, see norm_groups) the added embedding
    has no effect at all: the block warns.

    emb_channels=None builds the block without conditioning (the autoencoder's, LDM): emb is
    then None and h = GN(h). max_groups caps the GroupNorm groups (norm_groups).

    x: (B, in_channels, H, W), emb: (B, emb_channels) or None -> (B, out_channels, H', W').
    """

    def __init__(self, in_channels: int, emb_channels: int | None,
                 out_channels: int | None = None,
                 dropout: float = 0.0, use_scale_shift_norm: bool = True, up: bool = False,
                 down: bool = False, max_groups: int = MAX_NORM_GROUPS):
        super().__init__()
        if up and down:
            raise ValueError("ResBlock takes up=True or down=True, not both")
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = Normalize(in_channels, max_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if up:
            self.resample = Upsample(in_channels, use_conv=False)
        elif down:
            self.resample = Downsample(in_channels, use_conv=False)
        else:
            self.resample = None
        self.emb_proj = None if emb_channels is None else nn.Linear(
            emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm2 = Normalize(out_channels, max_groups)
        if emb_channels is not None and not use_scale_shift_norm \
                and self.norm2.num_groups == out_channels:
            warnings.warn(f"ResBlock(out_channels={out_channels}, use_scale_shift_norm=False): "
                          f"GroupNorm has one channel per group here and removes the added "
                          f"timestep embedding entirely; use use_scale_shift_norm=True or "
                          f"more than {MAX_NORM_GROUPS} channels", stacklevel=2)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)  # zero-initialised
        self.skip = (nn.Identity() if out_channels == in_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv1(h)  # (B, C_out, H, W)
        if self.emb_proj is None:
            return self.skip(x) + self.conv2(self.dropout(F.silu(self.norm2(h))))
        emb = rearrange(self.emb_proj(F.silu(emb)), "b c -> b c 1 1").to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb.chunk(2, dim=1)  # each (B, C_out, 1, 1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h
