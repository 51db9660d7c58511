"""Timestep embeddings: the sinusoidal features of the Transformer (Vaswani et al. 2017,
sec. 3.5) as used by DDPM (Ho et al. 2020), followed by a two-layer MLP."""

import math
import numbers

import torch
from torch import nn

MAX_PERIOD = 10_000  # longest wavelength of the sinusoids (Vaswani et al. 2017)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = MAX_PERIOD
                       ) -> torch.Tensor:
    """Sinusoidal timestep embedding (Vaswani et al. 2017, sec. 3.5; DDPM, Ho et al. 2020).

    emb[:, i] = cos(t * f_i) and emb[:, half + i] = sin(t * f_i), with
    f_i = max_period ** (-i / half) for i < half = dim // 2 (cos first, as guided-diffusion).

    timesteps: (B,) int or float tensor (fractional timesteps are fine).
    Returns (B, dim) float32; an odd `dim` gets one trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)  # (B, dim)
    return emb


def timesteps_as_batch(timestep, batch_size: int, device: torch.device) -> torch.Tensor:
    """Turn a python number, a 0-d tensor, a (1,) or a (B,) tensor into a (B,) tensor.

    Integer timesteps stay int64; float tensors are kept as they are (continuous-time
    samplers pass fractional t). Raises TypeError/ValueError naming `timestep`.
    """
    if isinstance(timestep, bool) or not isinstance(timestep, (numbers.Real, torch.Tensor)):
        raise TypeError(f"timestep must be a python int, a 0-d tensor or a (B,) tensor; got "
                        f"{type(timestep).__name__}")
    if not isinstance(timestep, torch.Tensor):
        dtype = torch.int64 if isinstance(timestep, numbers.Integral) else torch.float32
        timestep = torch.tensor(timestep, dtype=dtype)
    if timestep.dtype == torch.bool or timestep.is_complex():
        raise TypeError(f"timestep must be an integer or float tensor; got dtype "
                        f"{timestep.dtype}")
    if timestep.dim() == 0 or timestep.shape == (1,):
        return timestep.reshape(1).to(device).expand(batch_size)  # (B,)
    if timestep.shape != (batch_size,):
        raise ValueError(f"timestep must be a python int, a 0-d tensor or a tensor of shape "
                         f"(B,)=({batch_size},) matching the sample's batch; got shape "
                         f"{tuple(timestep.shape)}")
    return timestep.to(device)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of width `model_channels` -> Linear -> SiLU -> Linear.

    The output width `time_embed_dim` is 4 x model_channels in the UNet (guided-diffusion).
    forward(timesteps: (B,)) -> (B, time_embed_dim).
    """

    def __init__(self, model_channels: int, time_embed_dim: int):
        super().__init__()
        self.model_channels = model_channels
        self.linear_1 = nn.Linear(model_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.model_channels)  # (B, model_channels)
        emb = emb.to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))  # (B, time_embed_dim)
