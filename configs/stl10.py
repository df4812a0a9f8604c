"""H-SCL on STL-10: the paper's reference recipe, configs/cifar10.py, on STL-10's labelled train
split (5,000 images, trained on 32 px crops as the reference does).

The dataset changes, and with it the epoch: the kNN monitor runs every 5,000 // 256 = 19 steps
and a checkpoint is saved every 5 epochs (95 steps).

Command (the TFDS dataset must already be prepared under DATA_DIR; nothing is downloaded):

    python train.py --config=configs/stl10.py --workdir=/path/to/run \
        --config.data.data_dir=DATA_DIR

Expected: not run to completion in this project (no GPU was available to it): no accuracy or
runtime is claimed. Hardware, beta sweep and baselines: as configs/cifar10.py.
"""

import os

from hscl_jax import config as config_lib

_STEPS_PER_EPOCH = 5_000 // 256  # 19


def get_config():
    config = config_lib.config_from_file(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py")
    )
    config.data = config_lib.base_config("stl10").data
    config.eval_every_steps = _STEPS_PER_EPOCH
    config.checkpoint_every_steps = 5 * _STEPS_PER_EPOCH
    return config
