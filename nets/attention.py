"""Attention for the UNet (Vaswani et al. 2017; latent diffusion, Rombach et al. 2022).

`attention()` is softmax(Q K^T / sqrt(d)) V on top of
`torch.nn.functional.scaled_dot_product_attention` (SDPA), with two knobs every attention
module here carries as attributes (the UNet sets them on all of them at once):

- `slice_size`: compute attention for `slice_size` queries at a time (attention slicing), so
  the (N, M) weight matrix is never held for all N queries; rows are independent, so the
  result is the same as unsliced. "auto" means two slices.
- `backend`: which SDPA kernel to use. None lets PyTorch choose; "math", "flash" and
  "efficient" restrict it (see ATTENTION_BACKENDS); "explicit" is the written-out
  softmax(Q K^T / sqrt(d)) V, the reference the tests and the FLOP count compare against.
  CUDA's flash kernel takes no attention mask, so under "flash" a call with a key padding
  mask (padded prompts in cross-attention) may also use the memory-efficient kernel
  (`sdpa_backends`): it gives the same result and, like flash, never holds the (N, M)
  weights. Calls without a mask (self-attention, unpadded text) stay on flash.

On the CPU, bf16 / fp16 attention that needs gradients runs its kernel in float32 when the
sequences are short (CPU_HALF_BACKWARD_FP32_BELOW), where the half-precision backward is slow.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .blocks import MAX_NORM_GROUPS, Dropout, Normalize

# "efficient" is what `enable_xformers_memory_efficient_attention` selects: PyTorch's
# memory-efficient kernel where it exists (CUDA) and the fused flash kernel otherwise (the
# CPU's memory-efficient SDPA kernel); neither materialises the (N, M) weight matrix.
ATTENTION_BACKENDS = {
    None: None,
    "math": [SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION],
    "explicit": None,
}
AUTO_SLICES = 2  # slice_size="auto" splits the queries in this many slices
FF_MULT = 4  # feed-forward hidden width / model width (Vaswani et al. 2017)
# The CPU's fused SDPA backward in bfloat16 / float16 is slow on short sequences. Forward +
# backward, torch 2.13, AVX-512/AMX Xeon, 2 threads: the shapes model's self-attention (B 32,
# 4 heads of 16, 64 x 64 tokens) 13.6 ms in bf16, 3.5 ms run in float32; the benchmark's small
# cross-attention (B 8, 4 heads of 32, 256 x 77) 8.2 against 3.5 ms. At 256 x 256 tokens
# neither wins (bf16 5.6 against 7.3 ms at 8 heads of 64, 9.6 against 8.4 at 4 of 32), and at
# 1024 x 1024 bf16 is 1.2-1.6x faster. So when gradients are needed on the CPU and queries x
# keys is below this bound, half-precision attention runs the kernel in float32 and casts the
# output back; forward alone stays in half precision, where the kernel is fast.
CPU_HALF_BACKWARD_FP32_BELOW = 256 * 256


def check_backend(backend):
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend={backend!r} is not one of "
                         f"{list(ATTENTION_BACKENDS)}")
    return backend


def check_slice_size(slice_size):
    if slice_size is None or slice_size == "auto":
        return slice_size
    if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
        raise ValueError(f"slice_size={slice_size!r} must be None, 'auto' or a positive int "
                         "(queries per slice)")
    return slice_size


def sdpa_backends(backend, masked: bool):
    """The SDPA kernels `attention()` allows for `backend`, or None (PyTorch picks).

    "flash" with a mask also allows the memory-efficient kernel: CUDA's flash kernel takes
    no mask and SDPA would fail with "No available kernel". PyTorch tries flash first, so the
    CPU (whose flash kernel takes masks) and unmasked calls still run flash.
    """
    kernels = ATTENTION_BACKENDS[backend]
    if backend == "flash" and masked:
        return [*kernels, SDPBackend.EFFICIENT_ATTENTION]
    return kernels


def check_mask_dtype(mask: torch.Tensor, name: str) -> torch.Tensor:
    """A key padding mask as bool: bool (True = real token) or 0/1 integers are accepted; a
    float mask (e.g. an additive 0 / -inf one, which .bool() would invert) is a TypeError."""
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be bool (True = real token) or 0/1 integers; got dtype "
                        f"{mask.dtype}")
    return mask.bool()


def explicit_attention(q, k, v, attn_mask=None):
    """softmax(Q K^T / sqrt(d)) V written out (Vaswani et al. 2017, eq. 1).

    q: (B, h, N, d), k: (B, h, M, d), v: (B, h, M, d_v), attn_mask: bool broadcastable to
    (B, h, N, M), True = attend. Returns (B, h, N, d_v). The softmax runs in float32 for
    half-precision inputs, and a query that may attend to no key gets zeros, as from SDPA.
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, N, M)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = scores.float().softmax(dim=-1)
    if attn_mask is not None:
        weights = weights.masked_fill(~attn_mask.any(dim=-1, keepdim=True), 0.0)
    return weights.to(v.dtype) @ v  # (B, h, N, d_v)


def half_backward_in_fp32(q, k, v) -> bool:
    """Whether `attention()` runs this call's SDPA in float32 (CPU_HALF_BACKWARD_FP32_BELOW)."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
            and q.shape[-2] * k.shape[-2] < CPU_HALF_BACKWARD_FP32_BELOW)


def sdpa(q, k, v, attn_mask, backend):
    """F.scaled_dot_product_attention restricted to `backend`'s kernels (`sdpa_backends`)."""
    kernels = sdpa_backends(backend, attn_mask is not None)
    if kernels is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with sdpa_kernel(kernels):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def attention(q, k, v, key_padding_mask=None, slice_size=None, backend=None):
    """softmax(Q K^T / sqrt(d)) V through SDPA, with optional slicing and kernel choice.

    q: (B, h, N, d), k: (B, h, M, d), v: (B, h, M, d_v); key_padding_mask: (B, M) bool,
    True for real tokens (False keys get zero weight). Returns (B, h, N, d_v).
    backend="flash" with a mask may run the memory-efficient kernel (`sdpa_backends`).
    """
    attn_mask = None
    if key_padding_mask is not None:
        attn_mask = rearrange(key_padding_mask, "b m -> b 1 1 m")

    def one(q_part):
        if backend == "explicit":
            return explicit_attention(q_part, k, v, attn_mask)
        if half_backward_in_fp32(q_part, k, v):
            with torch.autocast("cpu", enabled=False):  # else autocast casts back to half
                out = sdpa(q_part.float(), k.float(), v.float(), attn_mask, backend)
            return out.to(v.dtype)
        return sdpa(q_part, k, v, attn_mask, backend)

    n = q.shape[2]
    if slice_size == "auto":
        slice_size = -(-n // AUTO_SLICES)
    if slice_size is None or slice_size >= n:
        return one(q)
    return torch.cat([one(q[:, :, i:i + slice_size]) for i in range(0, n, slice_size)], dim=2)


class CrossAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) as in latent diffusion (Rombach et al. 2022).

    Queries come from `x`; keys and values from `context` (cross-attention, when built with
    `context_dim`) or from `x` itself (self-attention, `context_dim=None`). The Q, K, V
    projections are fused into one matmul (`to_qkv`, or `to_q` + `to_kv` for cross-attention).

    x: (B, N, query_dim), context: (B, M, context_dim), key_padding_mask: (B, M) bool with
    True for real tokens. Returns (B, N, query_dim).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.context_dim = context_dim
        if context_dim is None:
            self.to_qkv = nn.Linear(query_dim, 3 * inner_dim, bias=False)
        else:
            self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
            self.to_kv = nn.Linear(context_dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), Dropout(dropout))
        self.slice_size = None
        self.backend = None

    @property
    def is_cross_attention(self) -> bool:
        return self.context_dim is not None

    def forward(self, x, context=None, key_padding_mask=None):
        if self.context_dim is None:
            if context is not None:
                raise ValueError("context was passed to a self-attention layer (built with "
                                 "context_dim=None); it takes x only")
            q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d",
                                three=3, h=self.heads)
        else:
            if context is None:
                raise ValueError(f"cross-attention needs context (B, M, {self.context_dim}); "
                                 "got None")
            if context.shape[-1] != self.context_dim:
                raise ValueError(f"context width must be context_dim={self.context_dim}; got "
                                 f"context of shape {tuple(context.shape)}")
            q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
            k, v = rearrange(self.to_kv(context), "b m (two h d) -> two b h m d",
                             two=2, h=self.heads)
        out = attention(q, k, v, key_padding_mask, self.slice_size, self.backend)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a * GELU(g), with [a, g] from one matmul.

    x: (..., dim_in) -> (..., dim_out).
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)  # each (..., dim_out)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise feed-forward: GEGLU (`glu=True`, latent diffusion) or Linear-GELU, then
    dropout and Linear back. x: (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, mult: int = FF_MULT, glu: bool = True, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        project_in = (GEGLU(dim, inner_dim) if glu
                      else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()))
        self.net = nn.Sequential(project_in, Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block of latent diffusion (Rombach et al. 2022):
    x += attn1(LN(x));  x += attn2(LN(x), context);  x += ff(LN(x)).

    Without `context_dim` the cross-attention is left out. x: (B, N, dim),
    context: (B, M, context_dim), key_padding_mask: (B, M) bool. Returns (B, N, dim).
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, glu=True, dropout=dropout)

    def forward(self, x, context=None, key_padding_mask=None):
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, key_padding_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (Rombach et al. 2022): GroupNorm,
    linear projection in, `depth` BasicTransformerBlocks, linear projection out, residual.

    x: (B, C, H, W), context: (B, M, context_dim), key_padding_mask: (B, M) bool.
    Returns (B, C, H, W). Works in either memory format; channels_last makes the
    (B, C, H, W) <-> (B, HW, C) rearranges free.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1,
                 dropout: float = 0.0, context_dim: int | None = None,
                 max_groups: int = MAX_NORM_GROUPS):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels, max_groups)
        self.proj_in = nn.Linear(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim)
            for _ in range(depth))
        self.proj_out = nn.Linear(inner_dim, in_channels)  # zero-initialised

    def forward(self, x, context=None, key_padding_mask=None):
        h, w = x.shape[-2:]
        hidden = rearrange(self.norm(x), "b c h w -> b (h w) c")
        hidden = self.proj_in(hidden)  # (B, HW, inner)
        for block in self.transformer_blocks:
            hidden = block(hidden, context, key_padding_mask)
        hidden = self.proj_out(hidden)  # (B, HW, C)
        return x + rearrange(hidden, "b (h w) c -> b c h w", h=h, w=w)


class AttentionBlock(nn.Module):
    """Plain self-attention over the pixels of a feature map, no text (guided-diffusion):
    x + proj_out(attn(GroupNorm(x))). x: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, num_heads: int, max_groups: int = MAX_NORM_GROUPS):
        super().__init__()
        self.norm = Normalize(channels, max_groups)
        self.attn = CrossAttention(channels, None, num_heads, channels // num_heads)
        # attn.to_out is the block's output projection, zero-initialised

    def forward(self, x, context=None, key_padding_mask=None):
        h, w = x.shape[-2:]
        hidden = rearrange(self.norm(x), "b c h w -> b (h w) c")
        hidden = self.attn(hidden)  # (B, HW, C)
        return x + rearrange(hidden, "b (h w) c -> b c h w", h=h, w=w)


class AttentionPool(nn.Module):
    """Pool a prompt's text states into one vector by attention from a learned query (the
    attention pooling of CLIP's image encoder, Radford et al. 2021, applied to text).

    A masked mean gives every token the weight 1/M, so prompts that differ in one word or one
    character give nearly the same mean; the query's softmax weights are learned and can put
    most of the weight on the tokens that tell prompts apart. `heads` queries of width
    dim // heads attend independently (one may read the colour word, another the shape).

    context: (B, M, dim), key_padding_mask: (B, M) bool, True = real (None: all real)
      -> (B, dim).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"AttentionPool heads={heads} must divide dim={dim}")
        self.query = nn.Parameter(torch.randn(1, 1, dim))  # N(0, 1): logits O(1) at init
        self.attn = CrossAttention(dim, dim, heads, dim // heads)

    def forward(self, context, key_padding_mask=None):
        query = self.query.to(context.dtype).expand(context.shape[0], 1, -1)
        return self.attn(query, context, key_padding_mask=key_padding_mask)[:, 0]
