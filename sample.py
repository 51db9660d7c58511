"""`python sample.py --checkpoint PATH --prompt TEXT --out OUT`: not available yet.

Sampling from a trained model needs the networks, the trainer's checkpoints and the pipeline
(the sampling issue); until they land this script says so instead of pretending.
"""

import sys

if __name__ == "__main__":
    sys.exit("sample.py: sampling from a checkpoint is not implemented yet (the sampling "
             "issue); `python -m diffusion` samples with an exact denoiser meanwhile")
