"""Default: H-SCL on the embedded 8x8 digits dataset with a small CNN, on a laptop CPU.

    python train.py --config=configs/default.py --workdir=/tmp/hscl_digits

Small CNN (width 32: 3 convolutions, 128-d features) + the reference head (512 -> 128), H-SCL with
beta = 1, t = 0.5, every other same-label view a positive; Adam 1e-3 with L2 1e-6 (the reference
optimiser); global batch 128 (256 views), 300 steps (~27 epochs of the 1,438 training digits);
the "digits" augmentation preset (mild random resized crops, no flips or colour ops); weighted kNN
(k = 200, T = 0.5) on the 359 test digits every 100 steps.

Expected: knn_top1 0.975 to 0.978 at step 300 (0.9749 on this project's 2-core x86_64 CPU VM,
0.9777 on another VM of the same kind: float32 rounding differs across CPUs), in 41 s wall on a
quiet 2-core VM (jax 0.10.2), about 50 s with other jobs running. Figures and commands:
docs/benchmarks.md.

Baselines by override: --config.loss.name=scl, --config.loss.name=ucl, --config.loss.name=hucl,
--config.loss.beta=5 (the method study on digits: configs/study.py, docs/results.md).
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
