"""The method study on the embedded digits dataset: do the paper's claims hold at a small scale?

    python -m hscl_jax.sweep --config=configs/study.py --workdir=/tmp/hscl_study

Grid: UCL, SCL, SupCon, H-UCL and H-SCL (beta in {0.5, 1, 5}) x seeds 0-4 = 45 runs, one after
another; a finished run is skipped when the command is started again. Every run uses the same
model, pipeline and budget: configs/default.py (small CNN, global batch 128, Adam 1e-3 + L2 1e-6,
t = 0.5, digits augmentation preset) trained for 100 steps (~9 epochs) instead of 300, because at
300 steps every supervised method sits within noise of 97-98% kNN top-1 (configs/default.py's
docstring). The seed sets both the model init and the data order/augmentation. SupCon uses its
own default temperature, 0.1. Each run is evaluated on its final checkpoint: weighted kNN (k=200,
T=0.5) and a linear probe (Adam 1e-3, 100 epochs, batch 512) on the frozen encoder features.

Results and the wall time of the committed study (35 min for the 45 runs on a 2-core CPU VM):
docs/results.md.
"""

import os

import ml_collections

from hscl_jax import config as config_lib


def get_config():
    config = config_lib.config_from_file(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    )
    config.num_steps = 100
    config.log_every_steps = 50
    config.eval_every_steps = 0  # the kNN monitor runs once, at the end
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 1
    config.sweep = ml_collections.ConfigDict(
        {
            "methods": ("ucl", "scl", "supcon", "hucl", "hscl"),
            "betas": (0.5, 1.0, 5.0),
            "seeds": (0, 1, 2, 3, 4),
            "supcon_temperature": 0.1,
        }
    )
    return config
