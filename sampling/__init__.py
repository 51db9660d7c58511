"""The reverse process: sampling loops and classifier-free guidance (samplers.py), the
text-to-image pipeline (pipeline.py), tensors <-> PIL images and grids (images.py), the shapes
checker (shapes_checker.py), what the scripts share (cli.py), the prompt-adherence script
(evaluate.py), and evaluation against any image folder: Frechet distance, KID and adherence
(metrics.py) in the features of a net trained on the real images (features.py, reference.py)."""

from .images import from_pil, make_grid, to_pil
from .metrics import frechet_distance, kernel_inception_distance, sqrtm_psd
from .pipeline import AdvancedDiffusionPipeline, decode_latents
from .reference import RealReference, compare_folders, evaluate_pipeline
from .samplers import SAMPLERS, guided_model_fn, sample
from .shapes_checker import classify_shape_image, shapes_adherence

__all__ = ["SAMPLERS", "AdvancedDiffusionPipeline", "decode_latents", "from_pil",
           "guided_model_fn", "make_grid", "sample", "to_pil", "classify_shape_image",
           "shapes_adherence", "RealReference", "compare_folders", "evaluate_pipeline",
           "frechet_distance", "kernel_inception_distance", "sqrtm_psd"]
