"""The reverse process: sampling loops and classifier-free guidance (samplers.py), the
text-to-image pipeline (pipeline.py), tensors <-> PIL images and grids (images.py), the shapes
checker (shapes_checker.py), what the scripts share (cli.py) and the prompt-adherence script
(evaluate.py)."""

from .images import from_pil, make_grid, to_pil
from .pipeline import AdvancedDiffusionPipeline, decode_latents
from .samplers import SAMPLERS, guided_model_fn, sample
from .shapes_checker import classify_shape_image, shapes_adherence

__all__ = ["SAMPLERS", "AdvancedDiffusionPipeline", "decode_latents", "from_pil",
           "guided_model_fn", "make_grid", "sample", "to_pil", "classify_shape_image",
           "shapes_adherence"]
