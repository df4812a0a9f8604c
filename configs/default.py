"""Default: H-SCL on the embedded 8x8 digits dataset with a small CNN, on a laptop CPU.

    python train.py --config=configs/default.py --workdir=/tmp/hscl_digits

Small CNN (width 32: 3 convolutions, 128-d features) + the reference head (512 -> 128), H-SCL with
beta = 1, t = 0.5, every other same-label view a positive; Adam 1e-3 with L2 1e-6 (the reference
optimiser); global batch 128 (256 views), 300 steps (~27 epochs of the 1438 training digits);
the "digits" augmentation preset (mild random resized crops, no flips or colour ops); weighted kNN
(k = 200, T = 0.5) on the 359 test digits every 100 steps.

Measured 2026-12-02 on the quiet 2-core CPU VM, jax 0.10.2, streaming ArrayRecord source,
device augmentation (the default, which never imports TensorFlow once digits is prepared):
`python train.py --config=configs/default.py --workdir=DIR` took 41.0 s wall and reached
knn_top1 = 0.9777; with --config.data.augment_on=host 48.5 s, 0.9749. (2026-12-01, before the
TensorBoard writer stopped importing TensorFlow: 52.4 s and 52.0 s.) Earlier code (in-memory
source, host augmentation), on the same VM shared with other jobs: 56 s wall (first step incl.
compilation 6 s, then ~8 steps/s) and reached knn_top1 = 0.9777 (351/359), knn_top5 = 1.0 at step
300 (0.9694 at step 100). Same command with --config.seed=1 --config.data.seed=1: 0.9721; with
seed 2: 0.9777 (those two under heavier machine load, ~1m40-1m55 wall). Overrides on seed 0:
--config.loss.beta=5: 0.9749; --config.loss.name=scl: 0.9749; --config.loss.name=ucl: 0.8468.
Baselines by override, e.g. --config.loss.name=scl, --config.loss.name=ucl,
--config.loss.name=hucl, --config.loss.beta=5.
"""

from hscl_jax import config as config_lib


def get_config():
    config = config_lib.base_config("digits")
    config.model.name = "small_cnn"
    config.global_batch_size = 128
    config.num_epochs = 0
    config.num_steps = 300
    config.loss.beta = 1.0
    config.log_every_steps = 25
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    config.knn.eval_batch_size = 512
    return config
