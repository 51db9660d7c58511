"""`python train.py --config cfg.yaml`: not available yet.

The trainer (AdvancedDiffusionTrainer, data, checkpoints) is the training issue's work; until
it lands this script says so instead of pretending. See README.md.
"""

import sys

if __name__ == "__main__":
    sys.exit("train.py: training is not implemented yet (the training issue); "
             "`python -m diffusion` runs the scheduler demo meanwhile")
