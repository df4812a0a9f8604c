"""H-SCL on STL-10 (labelled train split, 5000 images, 32 px crops): the paper's reference recipe.

ResNet-50 (CIFAR stem) + projection head 2048 -> 512 -> 128, H-SCL with beta = 1 and t = 0.5,
positives = every other same-label view, gradients through the importance weights; Adam lr 1e-3
with L2 weight decay 1e-6 added to the gradient, no schedule; global batch 256 (last partial batch
dropped), 200 epochs; SimCLR augmentation; weighted-kNN (k = 200, T = 0.5) on the test split
every epoch.

Command (the TFDS dataset must already be prepared under --config.data.data_dir; nothing is
downloaded):

    python train.py --config=configs/stl10.py --workdir=/path/to/run \
        --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: a GPU host (memory use and run time of this recipe have not been measured in this
project). Add --config.model.dtype=bfloat16 for bfloat16 compute.
On several GPUs the same command uses all of them (global batch split across devices, negatives
and BatchNorm statistics gathered across them).

Expected: the paper reports downstream-classification gains of H-SCL over SCL (and over UCL and
H-UCL); this recipe has NOT been run to completion in this project (no GPU was available to it),
so no number is claimed here. The paper sweeps beta in {0.5, 1, 5}
(--config.loss.beta=...).

Baselines by override:
    --config.loss.name=scl                             # SCL (beta = 0 equivalent)
    --config.loss.name=ucl                             # UCL / SimCLR
    --config.loss.name=hucl --config.loss.beta=1       # H-UCL (Robinson et al., tau_plus = 0)
    --config.loss.name=supcon --config.loss.temperature=0.1   # SupCon (Khosla et al.)
"""

from hscl_jax import config as config_lib


def get_config():
    config = config_lib.base_config("stl10")
    config.eval_every_steps = 19  # one epoch: 5000 // 256 steps
    config.checkpoint_every_steps = 95  # every 5 epochs
    return config
