"""The reverse process: sampling loops, classifier-free guidance, the text-to-image pipeline."""

from .pipeline import AdvancedDiffusionPipeline, decode_latents, from_pil, make_grid, to_pil
from .samplers import SAMPLERS, guided_model_fn, sample

__all__ = ["SAMPLERS", "AdvancedDiffusionPipeline", "decode_latents", "from_pil",
           "guided_model_fn", "make_grid", "sample", "to_pil"]
