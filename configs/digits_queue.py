"""H-SCL with a labelled queue of 4,096 negatives on the embedded digits dataset.

    python train.py --config=configs/digits_queue.py --workdir=/tmp/hscl_digits_queue

configs/default.py (small CNN, H-SCL beta 1, t 0.5, global batch 128, 300 steps) plus:

- ``queue``: the last 4,096 key projections (32 global batches, ~3 epochs of the 1,438 training
  digits) and their labels, from a momentum encoder with EMA rate 0.9 (time constant 10 steps:
  MoCo's 0.999 suits runs of 10^5 steps, not 300). Other-class keys are extra negatives; Q stays
  2B - 2 (``queue.q = "fixed"``).
- the theory monitor with the N -> infinity view (``theory.reference_size``): at every logging
  step, the H-SCL loss of the run's first training batch against its own views, against its views
  plus the queue's newest 512 ... 4,096 keys, and against the whole training split embedded by the
  current model (metrics.jsonl keys hscl_batch, hscl_queue_<k>, hscl_reference, gap_<...>).

Measured on this project's 2-core CPU VM (shared with a running sweep and other jobs; jax 0.10.2,
one CPU device), the command above: 8 min 45 s wall (~1 step/s under that load), knn_top1 0.9610
at step 100, 0.9777 at step 200, 0.9638 at step 300 (configs/default.py without the queue:
0.9694, -, 0.9777). The reference view of the same run: docs/results.md, section 4.
"""

import os

from hscl_jax import config as config_lib


def get_config():
    config = config_lib.config_from_file(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    )
    config.queue.size = 4096
    config.queue.momentum = 0.9
    config.theory.enabled = True
    config.theory.reference_size = 1438
    return config
