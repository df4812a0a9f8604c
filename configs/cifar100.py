"""H-SCL on CIFAR-100: the paper's reference recipe, configs/cifar10.py, on CIFAR-100.

Only the dataset changes: CIFAR-100 has as many training images (50,000), so the kNN monitor
still runs every epoch and a checkpoint is still saved every 5 epochs.

Command (the TFDS dataset must already be prepared under DATA_DIR; nothing is downloaded):

    python train.py --config=configs/cifar100.py --workdir=/path/to/run \
        --config.data.data_dir=DATA_DIR

Expected: not run to completion in this project (no GPU was available to it): no accuracy or
runtime is claimed. Hardware, beta sweep and baselines: as configs/cifar10.py.
"""

import os

from hscl_jax import config as config_lib


def get_config():
    config = config_lib.config_from_file(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py")
    )
    config.data = config_lib.base_config("cifar100").data
    return config
