"""H-SCL on Imagenette (10 ImageNet classes, 9,469 training images): the ImageNet recipe at a size
one GPU trains in hours.

The recipe of configs/imagenet.py, which this file loads and changes (ResNet-50 with the
ImageNet stem, 256 px host decode, 224 px random resized crops, bfloat16 compute, H-SCL
beta = 1, temperature 0.1, LARS with warm-up + cosine, no decay on BatchNorm and biases), with
SimCLR's small-batch settings: global batch 256, learning rate 0.075 x sqrt(256) = 1.2
(square-root scaling), 10 warm-up epochs, 200 epochs of 36 steps; weighted kNN on the 3,925
validation images every 20 epochs.

TFDS `imagenette/320px-v2` (shorter side 320 px, 0.33 GB) must be prepared first, on a machine
with network access: `tfds build imagenette/320px-v2 --data_dir=DATA_DIR
--file_format=array_record`. Then

    python train.py --config=configs/imagenette.py --workdir=/path/to/run \
        --config.data.data_dir=DATA_DIR --config.data.decode_workers=8

Hardware: one GPU. Throughput and accuracy: NOT run in this project (no accelerator host was
available with this dataset); no number is claimed. The mock-data end-to-end test
(tests/test_trainer.py::test_mock_imagenette_tiny_resnet_run) runs this config at a tiny size.
"""

import math
import os

from hscl_jax import config as config_lib

_BATCH = 256
_STEPS_PER_EPOCH = 9_469 // _BATCH  # 36, the last partial batch dropped


def get_config():
    config = config_lib.config_from_file(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet.py")
    )
    config.data = config_lib.base_config("imagenette").data
    config.data.eval_image_size = 224
    config.global_batch_size = _BATCH
    config.num_epochs = 200
    config.optim.learning_rate = 0.075 * math.sqrt(_BATCH)
    config.optim.warmup_steps = 10 * _STEPS_PER_EPOCH
    config.eval_every_steps = 20 * _STEPS_PER_EPOCH
    config.checkpoint_every_steps = 5 * _STEPS_PER_EPOCH
    return config
