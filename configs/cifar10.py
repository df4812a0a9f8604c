"""H-SCL on CIFAR-10: the paper's reference recipe.

ResNet-50 (CIFAR stem) + projection head 2048 -> 512 -> 128, H-SCL with beta = 1 and t = 0.5,
positives = every other same-label view, gradients through the importance weights; Adam lr 1e-3
with L2 weight decay 1e-6 added to the gradient, no schedule; global batch 256 (last partial batch
dropped), 200 epochs; SimCLR augmentation; weighted kNN (k = 200, T = 0.5) on the test split
every epoch; a checkpoint every 5 epochs.

Command (the TFDS dataset must already be prepared under DATA_DIR; nothing is downloaded):

    python train.py --config=configs/cifar10.py --workdir=/path/to/run \
        --config.data.data_dir=DATA_DIR

Hardware: a GPU host; on several GPUs the same command uses all of them (global batch split
across devices, negatives and BatchNorm statistics gathered across them). Add
--config.model.dtype=bfloat16 for bfloat16 compute.

Expected: the paper reports downstream-classification gains of H-SCL over SCL, UCL and H-UCL.
This recipe has not been run to completion in this project (no GPU was available to it): no
accuracy or runtime is claimed. The paper sweeps beta in {0.5, 1, 5} (--config.loss.beta=...).

Baselines by override:
    --config.loss.name=scl                             # SCL (beta = 0 equivalent)
    --config.loss.name=ucl                             # UCL / SimCLR
    --config.loss.name=hucl --config.loss.beta=1       # H-UCL (Robinson et al., tau_plus = 0)
    --config.loss.name=supcon --config.loss.temperature=0.1   # SupCon (Khosla et al.)

configs/cifar100.py and configs/stl10.py derive from this recipe.
"""

from hscl_jax import config as config_lib

_STEPS_PER_EPOCH = 50_000 // 256  # 195


def get_config():
    config = config_lib.base_config("cifar10")
    config.eval_every_steps = _STEPS_PER_EPOCH
    config.checkpoint_every_steps = 5 * _STEPS_PER_EPOCH
    return config
