"""Input-pipeline throughput next to what the training step consumes.

    python bench/pipeline.py             # digits (default config) + mock CIFAR-10, this machine
    python bench/pipeline.py --cifar-step=resnet50   # also time the reference CIFAR step

Measured, each alone on this machine (an augmented pair = one image's two views):
  - pipeline pairs/s: `hscl_jax.data.train_iterator` as the trainer uses it, for digits with the
    default config (configs/default.py: digits preset, its global batch) and for CIFAR-10-shaped
    mock data (tfds.testing.mock_data serving random 32x32x3 uint8 images; full SimCLR recipe,
    batch 256; nothing is downloaded);
  - step pairs/s: the trainer's pmapped train step (hscl_jax.step.build_step) on one device for the
    matching model (digits: the default config's small CNN; CIFAR-10, with --cifar-step: the
    named ResNet at a small CPU batch), on a fixed batch (no input pipeline);
  - end to end (digits): steps fed by the pipeline through prefetch_to_device, both sharing the
    CPU as in a real run.
The last line is `ratio pipeline/step: X` for the default digits config (target: X >= 2).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from hscl_jax import config as config_lib
from hscl_jax import data
from hscl_jax import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_CIFAR_EXAMPLES = 8192


def default_config():
    """configs/default.py's config (the default digits run)."""
    return config_lib.config_from_file(os.path.join(REPO, "configs", "default.py"))


def pipeline_pairs_per_second(data_config, batch_size: int, batches: int) -> float:
    iterator = data.train_iterator(
        data_config, global_batch_size=batch_size, seed=0, num_local_devices=1
    )
    for _ in range(3):  # graph tracing and worker start-up
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def _random_cifar_split(self, split, decoders=None, read_config=None, shuffle_files=False):
    """mock_data's `as_dataset_fn`: random uint8 images of the dataset's true shape."""
    import tensorflow as tf

    del split, decoders, read_config, shuffle_files
    rng = np.random.default_rng(0)
    shape = self.info.features["image"].shape
    return tf.data.Dataset.from_tensor_slices(
        {
            "image": rng.integers(0, 256, size=(MOCK_CIFAR_EXAMPLES, *shape), dtype=np.uint8),
            "label": rng.integers(0, 10, size=MOCK_CIFAR_EXAMPLES),
        }
    )


def make_step(config):
    """The trainer's pmapped step for ``config`` on one device, and its replicated state."""
    devices = jax.local_devices()[:1]
    built = step_lib.build_step(config, devices)
    return built.train_step, step_lib.replicate(built.init_state(), devices)


def step_pairs_per_second(step, state, batch, steps: int):
    """(pairs/s, compile seconds, new state) of `step` on one fixed device batch.

    The step donates its state: the caller must continue with the returned one.
    """
    batch = jax.device_put(batch, jax.local_devices()[0])
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    pairs = batch["label"].shape[1]
    return steps * pairs / (time.perf_counter() - start), compile_seconds, state


def end_to_end_pairs_per_second(step, state, data_config, batch_size: int, steps: int) -> float:
    batches = data.prefetch_to_device(
        data.train_iterator(data_config, global_batch_size=batch_size, seed=1, num_local_devices=1)
    )
    for _ in range(3):
        state, metrics = step(state, next(batches))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, next(batches))
    jax.block_until_ready(metrics)
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200, help="timed digits batches")
    parser.add_argument("--cifar-batches", type=int, default=20, help="timed CIFAR batches")
    parser.add_argument("--steps", type=int, default=50, help="timed digits train steps")
    parser.add_argument(
        "--cifar-step",
        default="none",
        help="model whose CIFAR-10 step is also timed: none | resnet18 | resnet50 (the reference; "
        "on a 2-core CPU it compiles for ~100 s and runs at <1 pair/s)",
    )
    parser.add_argument("--cifar-step-batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers (0: one per core)")
    args = parser.parse_args()

    from hscl_jax.data.tfds_source import import_tensorflow

    import_tensorflow()
    print(
        f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}; data workers: {args.workers or os.cpu_count()}"
    )

    # --- CIFAR-10 (mocked TFDS, full SimCLR recipe).
    import tensorflow_datasets as tfds

    cifar_config = config_lib.base_config("cifar10")
    cifar_config.num_steps = 1000  # the schedule's length; nothing reads the dataset for it
    cifar_config.data.data_dir = tempfile.mkdtemp()
    cifar_config.data.num_workers = args.workers
    with tfds.testing.mock_data(as_dataset_fn=_random_cifar_split):
        cifar_pipeline = pipeline_pairs_per_second(cifar_config.data, 256, args.cifar_batches)
    print(f"cifar10 (mock, 32x32x3, SimCLR), batch 256: pipeline {cifar_pipeline:9.0f} pairs/s")
    if args.cifar_step != "none":
        cifar_config.model.name = args.cifar_step
        batch_size = args.cifar_step_batch
        rng = np.random.default_rng(0)
        batch = {
            "view1": rng.normal(size=(1, batch_size, 32, 32, 3)).astype(np.float32),
            "view2": rng.normal(size=(1, batch_size, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 10, size=(1, batch_size)).astype(np.int32),
        }
        train_step, state = make_step(cifar_config)
        cifar_step, compile_seconds, _ = step_pairs_per_second(train_step, state, batch, steps=3)
        print(
            f"cifar10 step: trainer's {args.cifar_step} train step, batch {batch_size}, 1 "
            f"device: {cifar_step:9.1f} pairs/s (compile {compile_seconds:.0f} s); "
            f"pipeline/step {cifar_pipeline / cifar_step:.1f}"
        )

    # --- digits, the default config (configs/default.py).
    config = default_config()
    config.data.data_dir = tempfile.mkdtemp()
    config.data.num_workers = args.workers
    batch_size = config.global_batch_size
    digits_pipeline = pipeline_pairs_per_second(config.data, batch_size, args.batches)
    print(
        f"digits (8x8x1, preset {config.data.augmentation.preset}), batch {batch_size}: "
        f"pipeline {digits_pipeline:9.0f} pairs/s"
    )
    train_step, state = make_step(config)
    batch = next(
        data.train_iterator(config.data, global_batch_size=batch_size, seed=0, num_local_devices=1)
    )
    digits_step, compile_seconds, state = step_pairs_per_second(
        train_step, state, batch, args.steps
    )
    print(
        f"digits step: trainer's {config.model.name} train step ({config.loss.name}), batch "
        f"{batch_size}, 1 device: {digits_step:9.0f} pairs/s ({1e3 * batch_size / digits_step:.1f}"
        f" ms/step, compile {compile_seconds:.0f} s)"
    )
    fed = end_to_end_pairs_per_second(train_step, state, config.data, batch_size, args.steps)
    print(
        f"digits end to end (pipeline -> prefetch_to_device -> step): {fed:9.0f} pairs/s "
        f"({100 * fed / digits_step:.0f}% of the fixed-batch step)"
    )
    print(f"ratio pipeline/step: {digits_pipeline / digits_step:.1f}")


if __name__ == "__main__":
    main()
