"""A text encoder trained from scratch: a tokenizer and a small transformer, one component.

Two tokenizers share one id space: bytes 0..255, PAD, BOS, EOS, then (WordTokenizer only) one
id per word of a vocabulary learned from the training captions. `config.tokenizer` picks one:
- "byte" (ByteTokenizer): a prompt is its UTF-8 bytes between BOS and EOS. Needs no
  vocabulary, reads any text, but the encoder must learn to compose words from bytes.
- "word" (WordTokenizer): each word or punctuation mark seen in the training captions is one
  token, so "circle" and "cross", or "digit 3" and "digit 4", differ in a whole token; a word
  it never saw falls back to its bytes, with a warning.
Prompts are padded with PAD to `max_text_length` (the guide's 77). The tokenizer's state (its
vocabulary) is part of the encoder's state_dict (`_extra_state`), so a checkpoint needs no
other file. The transformer is bidirectional (pre-norm blocks of self-attention and a GELU
MLP) and ignores padding through a key padding mask; the UNet's cross-attention ignores padding
the same way. The empty prompt "" (BOS EOS then padding) is the unconditional input of
classifier-free guidance. `build_text_encoder(config, captions)` is the one place an encoder
is built from a config, `TextEncoder.from_state_dict(config, state)` the one place it is loaded.
"""

import re
import warnings
from collections import Counter

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

    def state_dict(self) -> dict:
        """What rebuilds this tokenizer (`tokenizer_from_state`): plain strings and ints."""
        return {"kind": "byte", "max_length": self.max_length}


# A word is a run of letters, digits or underscores; any other non-space character is a token
# of its own ("a red circle." -> a, red, circle, .). Case is kept: "Red" is not "red".
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
DEFAULT_MAX_WORDS = 8192


def split_words(text: str) -> list[str]:
    """The words and punctuation marks of a caption, in order (WORD_PATTERN)."""
    return WORD_PATTERN.findall(text)


class WordTokenizer(ByteTokenizer):
    """A word-level tokenizer whose vocabulary is learned from the training captions.

    Ids: the byte tokenizer's 0..258, then VOCAB_SIZE + i for `words[i]`. A word in the
    vocabulary is one token; a word outside it is a space and its UTF-8 bytes (the byte
    tokenizer's ids; the space keeps two unseen words in a row apart), with one warning per
    word, so a prompt with an unseen word still encodes. Spaces between words are not tokens.
    `max_length` counts BOS and EOS; longer prompts are truncated with a warning.

    WordTokenizer.from_captions(captions, max_length, max_words) keeps the `max_words` most
    frequent words (ties in sorted order); `words` is that list, saved in the checkpoint.
    """

    def __init__(self, words, max_length: int = 77):
        super().__init__(max_length)
        words = list(words)
        bad = [w for w in words if not isinstance(w, str) or split_words(w) != [w]]
        if bad:
            raise ValueError(f"words must be single words or punctuation marks (as "
                             f"split_words gives them); got {bad[:3]!r}")
        if len(set(words)) != len(words):
            raise ValueError("words must not repeat: each word has one id")
        self.words = words
        self.word_ids = {word: VOCAB_SIZE + i for i, word in enumerate(words)}
        self.vocab_size = VOCAB_SIZE + len(words)
        self._warned: set[str] = set()

    @classmethod
    def from_captions(cls, captions, max_length: int = 77,
                      max_words: int = DEFAULT_MAX_WORDS) -> "WordTokenizer":
        counts = Counter(word for caption in captions for word in split_words(caption))
        if not counts:
            raise ValueError("the training captions hold no words to learn a vocabulary "
                             "from (all are empty); use tokenizer='byte' for uncaptioned data")
        ranked = sorted(counts, key=lambda word: (-counts[word], word))
        return cls(ranked[:max_words], max_length)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of one prompt, BOS and EOS included, unpadded."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str; got {type(prompt).__name__}")
        ids = []
        for word in split_words(prompt):
            if word in self.word_ids:
                ids.append(self.word_ids[word])
                continue
            if word not in self._warned:
                self._warned.add(word)
                warnings.warn(f"word {word!r} of prompt {prompt[:40]!r} is not in the "
                              f"tokenizer's vocabulary ({len(self.words)} words of the "
                              "training captions); it is read as its bytes", stacklevel=3)
            ids.extend(super().encode(" " + word)[1:-1])  # the space: where a word starts
        room = self.max_length - 2
        if len(ids) > room:
            warnings.warn(f"prompt of {len(ids)} tokens truncated to {room} "
                          f"(max_text_length={self.max_length} minus BOS and EOS): "
                          f"{prompt[:40]!r}...", stacklevel=3)
            ids = ids[:room]
        return [BOS_ID, *ids, EOS_ID]

    def decode(self, ids) -> str:
        """Back to text: the words joined by spaces."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        pieces, run = [], []
        for i in [*ids, PAD_ID]:
            if i < NUM_BYTES:
                run.append(i)
                continue
            if run:
                pieces.append(bytes(run).decode("utf-8", errors="replace").strip())
                run = []
            if i >= VOCAB_SIZE:
                pieces.append(self.words[i - VOCAB_SIZE])
        return " ".join(pieces)

    def state_dict(self) -> dict:
        return {"kind": "word", "max_length": self.max_length, "words": list(self.words)}


TOKENIZERS = ("byte", "word")  # config.tokenizer


def tokenizer_from_state(state: dict) -> ByteTokenizer:
    """Rebuild a tokenizer from its `state_dict()`; ValueError for anything else."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "byte":
        return ByteTokenizer(state["max_length"])
    if kind == "word":
        return WordTokenizer(state["words"], state["max_length"])
    raise ValueError(f"not a tokenizer state: kind={kind!r}, expected one of {TOKENIZERS}")


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
    """Transformer text encoder with its tokenizer, trained from scratch with the UNet.

    Token + learned position embeddings (width), `num_layers` TextTransformerBlocks, a final
    LayerNorm and a linear projection to `context_dim`, the width the UNet's cross-attention
    expects. `tokenizer`: a ByteTokenizer (the default) or WordTokenizer of `max_length`; the
    token embedding has one row per id of its vocabulary. Build it from a config with
    `build_text_encoder(config, captions)`, load it with `TextEncoder.from_state_dict`.

    forward(input_ids: (B, L) int64 ids in [0, vocab_size) (other integer dtypes are cast),
            attention_mask: (B, L) bool | None, trim: bool = False)
      -> (hidden_states: (B, L, context_dim), attention_mask: (B, L) bool, True = real);
    with `trim`, L is cut to the batch's longest prompt first (trim_padding).
    `encode(prompts)` tokenises and runs forward in one call.
    """

    def __init__(self, context_dim: int = 768, width: int = 256, num_layers: int = 2,
                 max_length: int = 77, dropout: float = 0.0,
                 tokenizer: ByteTokenizer | None = None, summary: bool = False):
        super().__init__()
        if tokenizer is None:
            tokenizer = ByteTokenizer(max_length)
        if tokenizer.max_length != max_length:
            raise ValueError(f"tokenizer.max_length={tokenizer.max_length} must equal "
                             f"max_length={max_length}")
        self.tokenizer = tokenizer
        self.max_length, self.context_dim = max_length, context_dim
        self.token_embedding = nn.Embedding(tokenizer.vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, width))
        self.blocks = nn.ModuleList(TextTransformerBlock(width, text_heads(width), dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, context_dim)
        # The caption summary: one learned context_dim vector per token id, summed over the
        # prompt's real tokens and added to the first output state (BOS), which the UNet's
        # text_pooling="bag" reads as the pooled vector. A token that tells two prompts apart
        # moves the sum by its whole vector, however long the prompt, as a lookup table would.
        self.summary = nn.Embedding(tokenizer.vocab_size, context_dim) if summary else None
        self._init_weights()

    @classmethod
    def from_config(cls, config, tokenizer: ByteTokenizer | None = None) -> "TextEncoder":
        """The encoder of config's sizes around `tokenizer` (a ByteTokenizer when None)."""
        return cls(context_dim=config.context_dim, width=config.text_encoder_width,
                   num_layers=config.text_encoder_layers, max_length=config.max_text_length,
                   tokenizer=tokenizer, summary=config.text_pooling == "bag")

    @classmethod
    def from_state_dict(cls, config, state_dict: dict) -> "TextEncoder":
        """An encoder of config's sizes with the tokenizer stored in `state_dict` (its
        vocabulary sizes the embedding), the weights loaded."""
        stored = state_dict.get(EXTRA_STATE_KEY, {}).get("tokenizer")
        if stored is None:
            raise ValueError("the text encoder's state_dict holds no tokenizer state "
                             f"({EXTRA_STATE_KEY!r})")
        encoder = cls.from_config(config, tokenizer_from_state(stored))
        encoder.load_state_dict(state_dict)
        return encoder

    def sizes(self) -> dict:
        """The config fields this encoder was built with (compare with a config's)."""
        return {"context_dim": self.context_dim,
                "text_encoder_width": self.token_embedding.embedding_dim,
                "text_encoder_layers": len(self.blocks), "max_text_length": self.max_length,
                "tokenizer": self.tokenizer.state_dict()["kind"]}

    @property
    def has_summary(self) -> bool:
        """Whether the first output state holds the bag-of-tokens summary (text_pooling="bag")."""
        return self.summary is not None

    def get_extra_state(self) -> dict:
        return {"tokenizer": self.tokenizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Loading a state_dict checks its tokenizer is this one: the embedding's rows mean the
        tokens of that vocabulary (a different one needs TextEncoder.from_state_dict)."""
        if state.get("tokenizer") != self.tokenizer.state_dict():
            stored = state.get("tokenizer") or {}
            raise ValueError(
                f"the state_dict's tokenizer ({stored.get('kind')!r}, "
                f"{len(stored.get('words', []))} words) differs from this encoder's "
                f"({self.tokenizer.state_dict()['kind']!r}, "
                f"{len(getattr(self.tokenizer, 'words', []))} words): the training captions "
                "changed; load it with TextEncoder.from_state_dict")

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Embeddings N(0, 0.02); Linear Xavier-uniform, biases 0; LayerNorm 1/0; the last
        layer of each residual branch zero so every block starts as the identity; the summary
        table zero, so the untrained encoder's states are those of one without it."""
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
        if self.summary is not None:
            nn.init.zeros_(self.summary.weight)

    def forward(self, input_ids, attention_mask=None, trim: bool = False):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, L) int64 tensor; got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or (
                input_ids.dtype == torch.bool):
            raise TypeError(f"input_ids must be a (B, L) int64 tensor of token ids; got dtype "
                            f"{input_ids.dtype}")
        if input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            vocab = self.tokenizer.vocab_size
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise ValueError(f"input_ids must be token ids in [0, {vocab}) (bytes "
                                 f"0..255, PAD {PAD_ID}, BOS {BOS_ID}, EOS {EOS_ID}, then "
                                 f"the tokenizer's words); got {bad}")
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"input_ids length must be at most max_text_length="
                             f"{self.max_length}; got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = input_ids != PAD_ID
        else:
            attention_mask = check_attention_mask(input_ids, attention_mask)
        if trim:
            input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids.long())  # (B, L, width)
        x = x + self.position_embedding[:length]
        for block in self.blocks:
            x = block(x, key_padding_mask=attention_mask)
        states = self.proj(self.norm(x))  # (B, L, context_dim)
        if self.summary is not None:
            bag = (self.summary(input_ids.long()) * attention_mask[..., None]).sum(1)
            states = torch.cat([states[:, :1] + bag[:, None].to(states.dtype), states[:, 1:]],
                               dim=1)
        return states, attention_mask  # (B, L, context_dim), (B, L)

    def encode(self, prompts, trim: bool = False):
        """prompts: str or list of str -> (hidden_states (B, L, context_dim), mask (B, L));
        L = max_length, or the longest prompt's length with `trim` (trim_padding)."""
        input_ids, mask = self.tokenizer(prompts)
        device = self.proj.weight.device
        return self.forward(input_ids.to(device), mask.to(device), trim=trim)


EXTRA_STATE_KEY = "_extra_state"  # where nn.Module.state_dict keeps get_extra_state()


def build_text_encoder(config, captions=None) -> TextEncoder:
    """The text encoder `config` describes: its sizes and `config.tokenizer`.

    captions: the training captions, or a function returning them (called only when needed),
    from which tokenizer="word" learns its vocabulary (at most config.text_vocab_size words);
    tokenizer="byte" needs none.
    """
    if config.tokenizer == "byte":
        return TextEncoder.from_config(config)
    if captions is None:
        raise ValueError("tokenizer='word' learns its vocabulary from the training captions; "
                         "pass captions")
    captions = captions() if callable(captions) else captions
    tokenizer = WordTokenizer.from_captions(captions, config.max_text_length,
                                            config.text_vocab_size)
    return TextEncoder.from_config(config, tokenizer)
