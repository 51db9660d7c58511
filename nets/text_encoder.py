"""A text encoder trained from scratch: a byte-level tokenizer and a small transformer.

No vocabulary file and no pretrained weights: a prompt is its UTF-8 bytes (ids 0..255) between
BOS and EOS, padded with PAD to `max_text_length` (the guide's 77). The transformer is
bidirectional (pre-norm blocks of self-attention and a GELU MLP) and ignores padding through
a key padding mask; the UNet's cross-attention ignores padding the same way. The empty
prompt "" (BOS EOS then padding) is the unconditional input of classifier-free guidance.
"""

import warnings

import torch
from torch import nn

from .attention import CrossAttention, FeedForward, check_mask_dtype

NUM_BYTES = 256
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259
HEAD_DIM = 64  # target width per attention head
EMBED_INIT_STD = 0.02  # embedding init (GPT-2, Radford et al. 2019)


class ByteTokenizer:
    """UTF-8 bytes plus BOS/EOS/PAD. `max_length` counts BOS and EOS; longer prompts are
    truncated (to max_length - 2 bytes) with a warning.

    tokenizer(prompts: str | list[str]) -> (input_ids: (B, max_length) int64,
                                            attention_mask: (B, max_length) bool, True = real)
    """

    pad_id, bos_id, eos_id, vocab_size = PAD_ID, BOS_ID, EOS_ID, VOCAB_SIZE

    def __init__(self, max_length: int = 77):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r} must be an int >= 2 (BOS and EOS "
                             "count)")
        self.max_length = max_length

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, BOS and EOS included, unpadded."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str; got {type(prompt).__name__}")
        try:
            ids = list(prompt.encode("utf-8"))
        except UnicodeEncodeError as err:  # a lone surrogate, e.g. from bad file decoding
            raise ValueError(f"prompt {prompt[:40]!r} is not valid Unicode text ({err.reason} "
                             f"at character {err.start})") from None
        room = self.max_length - 2
        if len(ids) > room:
            cut = room
            while cut > 0 and ids[cut] & 0xC0 == 0x80:  # never split a character's bytes
                cut -= 1
            warnings.warn(f"prompt of {len(ids)} UTF-8 bytes truncated to {cut} "
                          f"(max_text_length={self.max_length} minus BOS and EOS, at a "
                          f"character boundary): {prompt[:40]!r}...", stacklevel=3)
            ids = ids[:cut]
        return [BOS_ID, *ids, EOS_ID]

    def decode(self, ids) -> str:
        """Back to text: the byte ids between BOS and EOS (malformed UTF-8 is replaced)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if i < NUM_BYTES).decode("utf-8", errors="replace")

    def __call__(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str; got "
                            f"{type(prompts).__name__}")
        input_ids = torch.full((len(prompts), self.max_length), PAD_ID, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            input_ids[row, :len(ids)] = torch.tensor(ids)
        return input_ids, input_ids != PAD_ID


def check_attention_mask(input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
    """attention_mask as bool: a tensor of input_ids' shape, bool (True = real token) or 0/1
    integers; TypeError or ValueError naming it otherwise."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor of the shape of input_ids; got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}; got {tuple(attention_mask.shape)}")
    return check_mask_dtype(attention_mask, "attention_mask")


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Drop the last positions where every row is padding: (B, L) -> (B, L'), L' >= 1.

    Every reader of the text states masks padding out (the encoder's self-attention, the
    UNet's cross-attention, the pooled embedding), so the real tokens' results do not depend
    on those positions; cutting them at the longest prompt of the batch saves their work
    (configs/shapes.yaml: 77 -> at most 20 positions; its training step went from 230 to 208
    ms on a 2-core AMD EPYC, AVX2). attention_mask: (B, L) bool, True = real.
    """
    attention_mask = check_attention_mask(input_ids, attention_mask)
    real = attention_mask.any(dim=0).nonzero()  # (n, 1) positions real in some row
    length = int(real[-1]) + 1 if len(real) else 1
    return input_ids[:, :length], attention_mask[:, :length]


def text_heads(width: int) -> int:
    """Heads of width ~HEAD_DIM: the largest divisor of `width` not above width // 64
    (at least 1): 256 -> 4, 512 -> 8, 96 -> 1."""
    for heads in range(max(1, width // HEAD_DIM), 0, -1):
        if width % heads == 0:
            return heads
    return 1


class TextTransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: x += attn(LN(x)); x += MLP(LN(x)).
    x: (B, L, width), key_padding_mask: (B, L) bool -> (B, L, width)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CrossAttention(width, None, heads, width // heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, glu=False, dropout=dropout)

    def forward(self, x, key_padding_mask=None):
        x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Byte-level transformer text encoder, trained from scratch with the UNet.

    Token + learned position embeddings (width), `num_layers` TextTransformerBlocks, a final
    LayerNorm and a linear projection to `context_dim`, the width the UNet's cross-attention
    expects. Build it with `TextEncoder.from_config(config)` (text_encoder_width,
    text_encoder_layers, max_text_length, context_dim).

    forward(input_ids: (B, L) int64 ids in [0, VOCAB_SIZE) (other integer dtypes are cast),
            attention_mask: (B, L) bool | None)
      -> (hidden_states: (B, L, context_dim), attention_mask: (B, L) bool, True = real).
    `encode(prompts)` tokenises and runs forward in one call.
    """

    def __init__(self, context_dim: int = 768, width: int = 256, num_layers: int = 2,
                 max_length: int = 77, dropout: float = 0.0):
        super().__init__()
        self.tokenizer = ByteTokenizer(max_length)
        self.max_length, self.context_dim = max_length, context_dim
        self.token_embedding = nn.Embedding(VOCAB_SIZE, width)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, width))
        self.blocks = nn.ModuleList(TextTransformerBlock(width, text_heads(width), dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, context_dim)
        self._init_weights()

    @classmethod
    def from_config(cls, config) -> "TextEncoder":
        return cls(context_dim=config.context_dim, width=config.text_encoder_width,
                   num_layers=config.text_encoder_layers, max_length=config.max_text_length)

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Embeddings N(0, 0.02); Linear Xavier-uniform, biases 0; LayerNorm 1/0; the last
        layer of each residual branch zero so every block starts as the identity."""
        nn.init.normal_(self.token_embedding.weight, std=EMBED_INIT_STD)
        nn.init.normal_(self.position_embedding, std=EMBED_INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            # residual branches start at zero: the encoder starts as embed -> LN -> proj
            nn.init.zeros_(block.attn.to_out[0].weight)
            nn.init.zeros_(block.mlp.net[-1].weight)

    def forward(self, input_ids, attention_mask=None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, L) int64 tensor; got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or (
                input_ids.dtype == torch.bool):
            raise TypeError(f"input_ids must be a (B, L) int64 tensor of token ids; got dtype "
                            f"{input_ids.dtype}")
        if input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= VOCAB_SIZE:
                bad = low if low < 0 else high
                raise ValueError(f"input_ids must be token ids in [0, {VOCAB_SIZE}) (bytes "
                                 f"0..255, PAD {PAD_ID}, BOS {BOS_ID}, EOS {EOS_ID}); got "
                                 f"{bad}")
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"input_ids length must be at most max_text_length="
                             f"{self.max_length}; got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = input_ids != PAD_ID
        else:
            attention_mask = check_attention_mask(input_ids, attention_mask)
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids.long())  # (B, L, width)
        x = x + self.position_embedding[:length]
        for block in self.blocks:
            x = block(x, key_padding_mask=attention_mask)
        return self.proj(self.norm(x)), attention_mask  # (B, L, context_dim), (B, L)

    def encode(self, prompts, trim: bool = False):
        """prompts: str or list of str -> (hidden_states (B, L, context_dim), mask (B, L));
        L = max_length, or the longest prompt's length with `trim` (trim_padding)."""
        input_ids, mask = self.tokenizer(prompts)
        if trim:
            input_ids, mask = trim_padding(input_ids, mask)
        device = self.proj.weight.device
        return self.forward(input_ids.to(device), mask.to(device))
