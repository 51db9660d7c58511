"""A trained micro model's pooled text vectors tell apart captions that differ in one word or
one character.

The pooled vector (`text_pool_proj(unet.pooled_text(...))`) is what every ResBlock receives,
and the only view of the prompt at a level without cross-attention. The micro model of
tests/test_end_to_end.py is trained on the shapes with numbered captions, "a red shape 0" for
a red circle, "a red shape 1" for a red square and so on, so the shape is told by one
character, the colour by one word. The separation leaves out what every caption shares;
docs/shapes-results.md ("A caption summary...") has the measurements behind the bars.
"""

import itertools

import torch
from helpers import micro_config, train_micro

from diffusion import DiffusionConfig
from diffusion.shapes import SHAPE_COLOURS, SHAPES, ShapesDataset, parse_caption

STEPS = 300
# Measured with `pooled_vectors` and `separations` (1 thread, a 2-core CPU), smallest
# separation over the pairs of each kind, training seeds 0 / 1 / 2:
#   text_pooling="bag":       one character 0.062 / 0.075 / 0.080, one word 0.49 / 0.83 / 0.77
#   text_pooling="attention": one character 0.0014 (seed 0),        one word 0.45
#   text_pooling="mean":      one character 0.0014 (seed 0),        one word 0.07
# The bars are 3x (one character) and 2.5x (one word) below the bag's weakest seed, and 14x
# (one character) or 3x (one word, the mean) above the poolings that lose the caption; the
# attention pool does tell the colour words apart.
ONE_CHARACTER_BAR = 0.02
ONE_WORD_BAR = 0.2


def numbered(text: str) -> str:
    """"a red circle" -> "a red shape 0": the shape as the digit of its index in SHAPES."""
    colour, shape = parse_caption(text)
    return f"a {colour} shape {SHAPES.index(shape)}"


class NumberedShapes(ShapesDataset):
    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        return {**item, "text": numbered(item["text"])}


def separation_config(**overrides) -> DiffusionConfig:
    """The micro model with the pooled text vector, bag-pooled, STEPS steps, no EMA."""
    return micro_config(**{**dict(max_steps=STEPS, use_ema=False,
                                  pooled_text_conditioning=True, text_pooling="bag"),
                           **overrides})


def pooled_vectors(config: DiffusionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train the micro model for config.max_steps on NumberedShapes; {caption: pooled vector}."""
    data = NumberedShapes(size=config.max_steps * config.batch_size, sample_size=16, seed=seed)
    trainer = train_micro(config, data, seed)
    captions = [f"a {colour} shape {k}" for colour in SHAPE_COLOURS for k in range(len(SHAPES))]
    unet = trainer.model.unet
    with torch.no_grad():
        states, mask = trainer.text_encoder.encode(captions, trim=True)
        pooled = unet.text_pool_proj(unet.pooled_text(states, mask))
    return dict(zip(captions, pooled))


def pair_kind(a: str, b: str) -> str | None:
    """"one character" for captions that differ only in the digit, "one word" for only the
    colour word, else None."""
    wa, wb = a.split(), b.split()
    differ = [i for i in range(len(wa)) if wa[i] != wb[i]]
    if len(differ) != 1:
        return None
    return "one character" if differ[0] == len(wa) - 1 else "one word"


def separations(vectors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per kind of pair, the smallest ||p_a - p_b|| / spread, where spread is the rms distance
    of the pooled vectors from their mean over all captions. An offset that every caption
    shares (the projection's bias, the states of "a", BOS and EOS) tells no prompt apart, so
    it is left out, as a raw cosine would not: 0 means the pair is indistinguishable."""
    stacked = torch.stack(list(vectors.values()))
    spread = (stacked - stacked.mean(0)).pow(2).sum(1).mean().sqrt()
    smallest = {"one character": float("inf"), "one word": float("inf")}
    for a, b in itertools.combinations(vectors, 2):
        kind = pair_kind(a, b)
        if kind is not None:
            gap = (vectors[a] - vectors[b]).norm() / spread
            smallest[kind] = min(smallest[kind], gap.item())
    return smallest


def largest_cosines(vectors: dict[str, torch.Tensor]) -> dict[str, float]:
    """The largest raw cosine over the pairs of each kind (what probe_conditioning prints)."""
    largest = {"one character": -1.0, "one word": -1.0}
    for a, b in itertools.combinations(vectors, 2):
        kind = pair_kind(a, b)
        if kind is not None:
            cos = torch.cosine_similarity(vectors[a], vectors[b], dim=0).item()
            largest[kind] = max(largest[kind], cos)
    return largest


def test_pooled_vectors_separate_one_character_and_one_word():
    smallest = separations(pooled_vectors(separation_config()))
    assert smallest["one character"] > ONE_CHARACTER_BAR, smallest
    assert smallest["one word"] > ONE_WORD_BAR, smallest


def test_separation_oracle():
    """Vectors c + u_colour + v_digit: a pair's separation is its gap over the spread, and a
    shared offset c, however large, changes nothing (a raw cosine would go to 1)."""
    torch.manual_seed(0)
    colours = {name: torch.randn(8) for name in ("red", "blue")}
    digits = {k: torch.randn(8) * 0.1 for k in "01"}
    for offset in (0.0, 1e4):
        vectors = {f"a {c} shape {k}": offset + colours[c] + digits[k]
                   for c in colours for k in digits}
        stacked = torch.stack(list(vectors.values()))
        spread = (stacked - stacked.mean(0)).pow(2).sum(1).mean().sqrt()
        result = separations(vectors)
        assert abs(result["one character"]
                   - ((digits["0"] - digits["1"]).norm() / spread).item()) < 1e-3
        assert abs(result["one word"]
                   - ((colours["red"] - colours["blue"]).norm() / spread).item()) < 1e-3
    assert largest_cosines(vectors)["one character"] > 0.9999  # the offset fools the cosine
