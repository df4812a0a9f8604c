"""Throughput run on synthetic CIFAR-shaped data: ResNet-50, H-SCL, no TensorFlow needed.

Random 32x32x3 images and labels generated in numpy, so this runs on a GPU/TPU host with only
jax, flax, optax, orbax and ml_collections installed (no TensorFlow / TFDS). The accuracy it
reports is meaningless (labels are random); read the steps/s in the console and metrics.jsonl.

    python train.py --config=configs/synthetic.py --workdir=/tmp/hscl_synthetic
    python train.py --config=configs/synthetic.py --workdir=/tmp/hscl_synthetic_bf16 \
        --config.model.dtype=bfloat16

Hardware: any accelerator host; on a CPU use a small override such as
--config.model.name=resnet18 --config.model.width=16 --config.global_batch_size=32.
"""

from hscl_jax import config as config_lib


def get_config():
    config = config_lib.base_config("synthetic")
    config.num_steps = 300
    config.log_every_steps = 50
    config.checkpoint_every_steps = 300
    config.eval_every_steps = 0
    return config
