"""The queue and hardening study on the embedded digits dataset.

    python -m hscl_jax.sweep --config=configs/study_queue.py --workdir=/tmp/hscl_study_queue

The budget of configs/study.py (small CNN, global batch 128, Adam 1e-3 + L2 1e-6, t = 0.5, digits
augmentation, 100 steps; kNN and linear probe on the final checkpoint), seeds 0-4, and:

- SCL and H-SCL (beta 1), each with no queue and with a labelled queue of 1,024 and 4,096 keys
  (8 and 32 global batches; the training split holds 1,438 images, so 4,096 keys are ~3 epochs);
- H-SCL's three hardening functions at their natural settings, without a queue: "exp" at beta 1
  (the no-queue H-SCL cell above); "topk" with k = 32, the hardest eighth of the ~230 other-class
  views an anchor meets in a batch of 128; "poly" (w = (1 + cos)^beta) at beta 2, whose slope
  d log w / d cos at cos = 0 equals that of "exp" at beta 1 and t 0.5 (beta / t = 2).

That is 40 runs: the "exp" cell is shared.

The momentum encoder's EMA rate is 0.9, not MoCo's 0.999: its time constant (10 steps) must be
short against a 100-step run, or the keys would come from a model close to the initial one. Chosen
once, before any run. Results and wall times: docs/results.md.
"""

import os

import ml_collections

from hscl_jax import config as config_lib


def get_config():
    config = config_lib.config_from_file(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.py")
    )
    config.queue.momentum = 0.9
    config.sweep = ml_collections.ConfigDict(
        {
            "methods": ("scl", "hscl"),
            "betas": (1.0,),
            "seeds": (0, 1, 2, 3, 4),
            "queue_sizes": (0, 1024, 4096),
            "hardenings": ("exp", "topk", "poly"),
            "hardening_options": {"topk": {"top_k": 32}, "poly": {"beta": 2.0}},
        }
    )
    return config
