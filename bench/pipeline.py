"""Input-pipeline throughput next to what the training step consumes.

    python bench/pipeline.py             # digits (default config) + mock CIFAR-10, this machine
    python bench/pipeline.py --cifar-step=resnet50   # also time the reference CIFAR step
    python bench/pipeline.py --memory    # peak RSS of a stream, 5,000 vs 100,000 images
    python bench/pipeline.py --augment   # host (TF) vs device (JAX) augmentation, one core

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

With --memory instead: the peak RSS (VmHWM) of a 50-step SimCLR stream (batch 256) over the
random_images TFDS dataset (random 64x64x3 PNGs in ArrayRecord files) of 5,000 and of 100,000
images, each in a fresh process; the last line is `rss_growth_mb: X`, the difference (the
streaming source holds no split in memory, so X should stay well under 100 MB).

--augment measures, instead, the augmentation alone, with the process pinned to one CPU core (so
the figures are per core): pairs/s of the host path (augment.augment_batch in a tf.function, as
the pipeline runs it, views fetched to numpy) against the device path (device_augment.augment_pair
jitted, uint8 images + parameters put on the device, views left there), on one fixed batch of
random uint8 images with SimCLR parameters, at digits, CIFAR and 224 px shape (256 px stored
images cropped to 224). Here the "device" is this CPU. Then the device augmentation's cost as a
fraction of the ResNet-50 train step on the same core (CPU seconds per pair, small batches): at
CIFAR shape with the CIFAR stem, at 224 px with the ImageNet stem. Times are CPU seconds of this
process, so other load on a shared machine does not count.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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


class _RandomCifarRecords:
    """Random uint8 examples of the dataset's true image shape, read by index like TFDS's
    ArrayRecord data source (nothing to decode: this times the augmentation)."""

    def __init__(self, image_shape):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, size=(MOCK_CIFAR_EXAMPLES, *image_shape), dtype=np.uint8)
        self.labels = rng.integers(0, 10, size=MOCK_CIFAR_EXAMPLES)

    def __len__(self):
        return MOCK_CIFAR_EXAMPLES

    def __getitem__(self, index):
        return {"image": self.images[index], "label": self.labels[index]}


def _random_cifar_source(builder, split, decoders=None, **kwargs):
    """mock_data's `as_data_source_fn`: a `_RandomCifarRecords` split."""
    del split, decoders, kwargs
    return _RandomCifarRecords(builder.info.features["image"].shape)


def make_step(config):
    """The trainer's pmapped step for ``config`` on one device, and its replicated state."""
    devices = jax.local_devices()[:1]
    config.parallelism = "pmap"  # the batches here have pmap's (devices, b, ...) layout
    built = step_lib.build_step(config, devices)
    return built.train_step, built.parallel.replicate(built.init_state())


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


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def stream_peak_rss(num_examples: int, image_size: int, cache_dir: str, steps: int, batch: int):
    """Runs `steps` batches of the SimCLR stream over random_images and prints its peak RSS.

    Meant to run alone in a fresh process (`--memory-child`), so that VmHWM is this stream's.
    """
    from hscl_jax.data.random_images_builder import random_images_info

    info = random_images_info(num_examples, image_size)
    config = data.default_data_config("cifar10")
    config.data_dir = cache_dir
    stream = data.train_iterator(
        config, global_batch_size=batch, seed=0, num_local_devices=1, info=info
    )
    for _ in range(steps):
        next(stream)
    stream.close()
    print(f"peak_rss_mb: {peak_rss_mb():.1f}")


def memory_benchmark(sizes, image_size: int, cache_dir: str, steps: int, batch: int) -> None:
    """Peak RSS of the same stream over datasets of `sizes` examples; last line the growth.

    Each dataset is built once into `cache_dir` (100,000 64x64 PNGs: ~10 min, 1.5 GB) and
    reused; each stream runs in a fresh subprocess.
    """
    import subprocess
    import sys

    from hscl_jax.data.random_images_builder import prepare_random_images

    peaks = []
    for num_examples in sizes:
        prepare_random_images(num_examples, image_size, cache_dir)
        child = [
            sys.executable,
            os.path.abspath(__file__),
            f"--memory-child={num_examples}",
            f"--image-size={image_size}",
            f"--cache-dir={cache_dir}",
            f"--memory-steps={steps}",
            f"--memory-batch={batch}",
        ]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        peak = float(done.stdout.strip().splitlines()[-1].split(":")[1])
        peaks.append(peak)
        in_memory = num_examples * image_size * image_size * 3 / 2**20
        print(
            f"random_images {num_examples:>7} x {image_size}x{image_size}x3 (uint8 split: "
            f"{in_memory:7.0f} MB), {steps} steps of batch {batch}: peak RSS {peak:7.0f} MB"
        )
    print(f"rss_growth_mb: {peaks[-1] - peaks[0]:.1f}")


def _augmentation_batch(info, aug, batch_size: int):
    """Random uint8 images of the stored shape and both views' parameters (numpy)."""
    from hscl_jax.data import augment

    rng = np.random.default_rng(0)
    shape = (batch_size, info.image_size, info.image_size, info.channels)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    params = [augment.view_params(0, 0, view, batch_size, info.image_size, aug) for view in (0, 1)]
    return images, params


def _cpu_seconds_per_call(run, calls: int) -> float:
    """CPU seconds this process spends per run() after one untimed call (compiles, traces).

    With the process pinned to one core this is the time one core needs, unaffected by whatever
    else the machine runs meanwhile (wall time is not, on a shared machine).
    """
    run()
    start = time.process_time()
    for _ in range(calls):
        run()
    return (time.process_time() - start) / calls


def host_augment_seconds(info, aug, batch_size: int, batches: int) -> float:
    """CPU s/batch of the host path: the pipeline's TF graph for both views, results in numpy."""
    from hscl_jax.data import augment
    from hscl_jax.data.tfds_source import import_tensorflow

    tf = import_tensorflow()

    @tf.function(autograph=False, reduce_retracing=True)
    def make_views(images, params1, params2):
        return (
            augment.augment_batch(images, params1, aug, info),
            augment.augment_batch(images, params2, aug, info),
        )

    images, (params1, params2) = _augmentation_batch(info, aug, batch_size)
    return _cpu_seconds_per_call(
        lambda: [view.numpy() for view in make_views(images, params1, params2)], batches
    )


def device_augment_seconds(info, aug, batch_size: int, batches: int) -> float:
    """CPU s/batch of the device path: uint8 images + parameters onto the device, views there."""
    from hscl_jax.data import device_augment

    images, (params1, params2) = _augmentation_batch(info, aug, batch_size)
    shipped = {"image": images, "view1_params": params1, "view2_params": params2, "label": 0}
    augment_pair = jax.jit(functools.partial(device_augment.augment_pair, aug=aug, info=info))
    return _cpu_seconds_per_call(
        lambda: jax.block_until_ready(augment_pair(jax.device_put(shipped))), batches
    )


def step_seconds(model_name: str, stem: str, side: int, batch_size: int, steps: int) -> float:
    """CPU s/step of the trainer's pmapped train step (CIFAR-10 config, `model_name` with `stem`)
    on side x side inputs (a ResNet's parameters do not depend on the input size)."""
    config = config_lib.base_config("cifar10")
    config.num_steps = 1000  # the schedule's length; nothing reads the dataset for it
    config.model.name = model_name
    config.model.stem = stem
    rng = np.random.default_rng(0)
    batch = {
        "view1": rng.normal(size=(1, batch_size, side, side, 3)).astype(np.float32),
        "view2": rng.normal(size=(1, batch_size, side, side, 3)).astype(np.float32),
        "label": rng.integers(0, 10, size=(1, batch_size)).astype(np.int32),
    }
    batch = jax.device_put(batch, jax.local_devices()[0])
    train_step, state = make_step(config)
    states = [state]  # the step donates its state: always continue with the returned one

    def run():
        states[0], metrics = train_step(states[0], batch)
        jax.block_until_ready(metrics)

    return _cpu_seconds_per_call(run, steps)


def augmentation_benchmark(args) -> None:
    """--augment: host vs device augmentation per core, and its share of the ResNet-50 step."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from hscl_jax.data.augment import resolve_augmentation

    print(
        f"augmentation, pinned to 1 CPU core, CPU seconds; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind} (the 'device' here is this CPU)"
    )
    cifar = data.dataset_info("cifar10")
    large = dataclasses.replace(cifar, name="224px", image_size=256, crop_size=224)
    cases = [
        ("digits 8x8x1, digits preset", data.dataset_info("digits"), "digits", 128, 50),
        ("cifar 32x32x3, SimCLR", cifar, "simclr", 256, args.cifar_batches),
        ("224 px (256 px stored), SimCLR", large, "simclr", 16, args.large_batches),
    ]
    device_seconds_per_pair = {}
    for title, info, preset, batch_size, batches in cases:
        aug = resolve_augmentation(data.augmentation_config(preset), info)
        host = batch_size / host_augment_seconds(info, aug, batch_size, batches)
        device = batch_size / device_augment_seconds(info, aug, batch_size, batches)
        device_seconds_per_pair[info.name] = 1.0 / device
        faster = "device" if device > host else "host"
        print(
            f"augment {title}, batch {batch_size}: host (TF) {host:8.1f} pairs/s/core, device "
            f"(JAX) {device:8.1f} pairs/s/core; faster on CPU: {faster} "
            f"({max(host, device) / min(host, device):.1f}x)"
        )
    if args.augment_step == "none":
        return
    for name, stem, side, batch_size in (
        ("cifar10", "cifar", 32, 8),
        ("224px", "imagenet", 224, 2),
    ):
        seconds = step_seconds(args.augment_step, stem, side, batch_size, args.augment_steps)
        share = device_seconds_per_pair[name] * batch_size / seconds
        print(
            f"device augmentation / {args.augment_step} train step ({stem} stem), {name}, batch "
            f"{batch_size}, 1 CPU core ({seconds / batch_size:.3f} s/pair): {100 * share:.2f}%"
        )


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
    parser.add_argument(
        "--memory",
        action="store_true",
        help="instead: peak RSS of a stream over random_images of --memory-sizes examples",
    )
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[5_000, 100_000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--memory-steps", type=int, default=50)
    parser.add_argument("--memory-batch", type=int, default=256)
    parser.add_argument(
        "--cache-dir",
        default=os.path.join(tempfile.gettempdir(), "hscl_jax_random_images"),
        help="TFDS data dir where the random_images datasets are built once and reused",
    )
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--augment",
        action="store_true",
        help="only time host vs device augmentation on one core (see the module docstring)",
    )
    parser.add_argument("--large-batches", type=int, default=3, help="timed 224 px batches")
    parser.add_argument("--augment-steps", type=int, default=2, help="timed steps (--augment)")
    parser.add_argument(
        "--augment-step",
        default="resnet50",
        help="model whose step --augment compares against: resnet50 | resnet18 | none",
    )
    args = parser.parse_args()
    if args.augment:
        augmentation_benchmark(args)
        return

    if args.memory_child:
        stream_peak_rss(
            args.memory_child, args.image_size, args.cache_dir, args.memory_steps, args.memory_batch
        )
        return
    if args.memory:
        memory_benchmark(
            args.memory_sizes, args.image_size, args.cache_dir, args.memory_steps, args.memory_batch
        )
        return

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
    with tfds.testing.mock_data(as_data_source_fn=_random_cifar_source):
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
