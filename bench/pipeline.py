"""Input-pipeline throughput next to what the training step consumes.

    python bench/pipeline.py             # digits (default config) + mock CIFAR-10, this machine
    python bench/pipeline.py --cifar-step=resnet50   # also time the reference CIFAR step
    python bench/pipeline.py --memory    # prepare and stream 5,000 vs 100,000 images: RSS
    python bench/pipeline.py --augment   # augmentation: host parameters vs device (JAX) ops

Measured, each alone on this machine (a pair = one image's two views):
  - pipeline pairs/s: `hscl_jax.data.train_iterator` as the trainer uses it (reading, indexing,
    both views' augmentation parameters; the augmentation itself runs in the step), for digits
    with the default config (configs/default.py: digits preset, its global batch) and for
    CIFAR-10-shaped mock data (tfds.testing.mock_data serving random 32x32x3 uint8 images; full
    SimCLR recipe, batch 256; nothing is downloaded);
  - step pairs/s: the trainer's pmapped train step (hscl_jax.step.build_step, augmentation
    included) on one device for the matching model (digits: the default config's small CNN;
    CIFAR-10, with --cifar-step: the named ResNet at a small CPU batch), on a fixed batch (no
    input pipeline);
  - end to end (digits): steps fed by the pipeline through prefetch_to_device, both sharing the
    CPU as in a real run.
The last line is `ratio pipeline/step: X` for the default digits config (target: X >= 2).

With --memory instead, for image folders of 5,000 and of 100,000 random 64x64x3 PNGs (written
once into --cache-dir): `python -m hscl_jax.data.prepare` on the folder (images/s, and its peak
RSS, VmHWM, without its decoding workers, which hold one chunk of images each), then a 50-step
SimCLR stream (batch 256) over the prepared dataset (peak RSS), each in a fresh process. The last
two lines are `prepare_rss_growth_mb: X` and `rss_growth_mb: Y`, the growth from the smaller to
the larger dataset (neither prepare nor the stream holds a split in memory, so both should stay
well under 100 MB).

--augment measures, instead, the augmentation's two halves alone, with the process pinned to one
CPU core (so the figures are per core), at digits, CIFAR and 224 px shape (256 px stored images
cropped to 224): pairs/s of the host's part (both views' parameters drawn in numpy,
augment_params.view_params, as the pipeline does) and of the device's part (augment.augment_views
jitted on one fixed batch of random uint8 images, images + parameters put on the device, views
left there; here the "device" is this CPU). Then the device augmentation's cost as a fraction of
the ResNet-50 train step on the same core (CPU seconds per pair, small batches): at CIFAR shape
with the CIFAR stem, at 224 px with the ImageNet stem. Times are CPU seconds of this process, so
other load on a shared machine does not count.
"""

from __future__ import annotations

import argparse
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


def image_folder(cache_dir: str, num_examples: int, image_size: int) -> str:
    """cache_dir/images_<N>x<S>px: N random S x S x 3 PNGs in 10 class folders, written once
    (100,000 64x64 PNGs: about 1.2 GB)."""
    import PIL.Image

    root = os.path.join(cache_dir, f"images_{num_examples}x{image_size}px")
    complete = os.path.join(root, ".complete")
    if not os.path.exists(complete):
        rng = np.random.default_rng(0)
        for index in range(num_examples):
            folder = os.path.join(root, f"class_{index % 10}")
            os.makedirs(folder, exist_ok=True)
            pixels = rng.integers(0, 256, (image_size, image_size, 3), np.uint8)
            PIL.Image.fromarray(pixels).save(os.path.join(folder, f"{index:06d}.png"))
        open(complete, "w").close()
    return root


def _dataset_name(num_examples: int, image_size: int) -> str:
    return f"random_{num_examples}x{image_size}px"


def prepare_child(num_examples: int, image_size: int, cache_dir: str) -> None:
    """Prepares the image folder of `num_examples` with hscl_jax.data.prepare and prints its
    seconds and this process's peak RSS (the workers decode one chunk of images at a time).
    Meant to run alone in a fresh process (`--memory-child-prepare`)."""
    from hscl_jax.data import prepare

    root = image_folder(cache_dir, num_examples, image_size)
    name = _dataset_name(num_examples, image_size)
    start = time.perf_counter()
    args = [f"--image_folder={root}", f"--name={name}", f"--data_dir={cache_dir}/tfds"]
    status = prepare.main([*args, "--overwrite"])
    assert status == 0, status
    print(f"prepare_seconds: {time.perf_counter() - start:.3f}")
    print(f"peak_rss_mb: {peak_rss_mb():.1f}")


def stream_peak_rss(num_examples: int, image_size: int, cache_dir: str, steps: int, batch: int):
    """Runs `steps` batches of the SimCLR stream over the prepared folder; prints its peak RSS.

    Meant to run alone in a fresh process (`--memory-child`), so that VmHWM is this stream's.
    """
    config = data.default_data_config(_dataset_name(num_examples, image_size))
    config.data_dir = f"{cache_dir}/tfds"
    stream = data.train_iterator(config, global_batch_size=batch, seed=0, num_local_devices=1)
    for _ in range(steps):
        next(stream)
    stream.close()
    print(f"peak_rss_mb: {peak_rss_mb():.1f}")


def memory_benchmark(sizes, image_size: int, cache_dir: str, steps: int, batch: int) -> None:
    """Per size: prepare throughput and peak RSS, and the stream's peak RSS, each in a fresh
    subprocess; then the growth of each peak from the smallest to the largest size."""
    import subprocess
    import sys

    def child(flag: str, num_examples: int) -> dict[str, float]:
        command = [
            sys.executable,
            os.path.abspath(__file__),
            f"{flag}={num_examples}",
            f"--image-size={image_size}",
            f"--cache-dir={cache_dir}",
            f"--memory-steps={steps}",
            f"--memory-batch={batch}",
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        figures = {}
        for line in done.stdout.splitlines():
            key, _, value = line.partition(": ")
            if key in ("prepare_seconds", "peak_rss_mb"):
                figures[key] = float(value)
        return figures

    prepare_peaks, stream_peaks = [], []
    for num_examples in sizes:
        image_folder(cache_dir, num_examples, image_size)
        prepared = child("--memory-child-prepare", num_examples)
        stream = child("--memory-child", num_examples)
        prepare_peaks.append(prepared["peak_rss_mb"])
        stream_peaks.append(stream["peak_rss_mb"])
        in_memory = num_examples * image_size * image_size * 3 / 2**20
        rate = num_examples / prepared["prepare_seconds"]
        print(
            f"images {num_examples:>7} x {image_size}x{image_size}x3 PNG (uint8: {in_memory:6.0f} "
            f"MB): prepare {rate:7.0f} images/s, peak RSS {prepare_peaks[-1]:6.0f} MB; stream "
            f"{steps} steps of batch {batch}: peak RSS {stream_peaks[-1]:6.0f} MB"
        )
    print(f"prepare_rss_growth_mb: {prepare_peaks[-1] - prepare_peaks[0]:.1f}")
    print(f"rss_growth_mb: {stream_peaks[-1] - stream_peaks[0]:.1f}")


def random_train_batch(aug, batch_size: int, num_classes: int = 10) -> dict:
    """A training batch of random uint8 images of the stored shape (numpy, no device axis)."""
    rng = np.random.default_rng(0)
    shape = (batch_size, aug.image_size, aug.image_size, aug.channels)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return data.train_batch(images, rng.integers(0, num_classes, size=batch_size), aug)


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


def host_params_seconds(aug, batch_size: int, batches: int) -> float:
    """CPU s/batch of the host's part: both views' parameters, as the pipeline draws them."""
    step = iter(range(10**9))
    return _cpu_seconds_per_call(
        lambda: [data.view_params(0, next(step), view, batch_size, aug) for view in (0, 1)],
        batches,
    )


def device_augment_seconds(aug, batch_size: int, batches: int) -> float:
    """CPU s/batch of the device's part: uint8 images + parameters onto the device, views there."""
    batch = random_train_batch(aug, batch_size)
    augment_views = jax.jit(functools.partial(data.augment_views, augmentation=aug))
    return _cpu_seconds_per_call(
        lambda: jax.block_until_ready(augment_views(jax.device_put(batch))), batches
    )


def _device_batch(aug, batch_size: int) -> dict:
    """`random_train_batch` with a leading axis of one device, on that device."""
    batch = jax.tree.map(lambda x: x[None], random_train_batch(aug, batch_size))
    return jax.device_put(batch, jax.local_devices()[0])


def step_seconds(model_name: str, stem: str, dataset: str, batch_size: int, steps: int) -> float:
    """CPU s/step of the trainer's pmapped train step (augmentation included) for `dataset`'s
    shapes, `model_name` with `stem`."""
    config = config_lib.base_config(dataset)
    config.num_steps = 1000  # the schedule's length; nothing reads the dataset for it
    config.model.name = model_name
    config.model.stem = stem
    train_step, state = make_step(config)
    batch = _device_batch(data.augmentation_for(config.data), batch_size)
    states = [state]  # the step donates its state: always continue with the returned one

    def run():
        states[0], metrics = train_step(states[0], batch)
        jax.block_until_ready(metrics)

    return _cpu_seconds_per_call(run, steps)


def augmentation_benchmark(args) -> None:
    """--augment: the host's and the device's part of the augmentation per core, and the
    device part's share of the ResNet-50 step."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    print(
        f"augmentation, pinned to 1 CPU core, CPU seconds; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind} (the 'device' here is this CPU)"
    )
    cases = [
        ("digits 8x8x1, digits preset", "digits", 128, 50),
        ("cifar 32x32x3, SimCLR", "cifar10", 256, args.cifar_batches),
        ("224 px (256 px stored), SimCLR", "imagenette", 16, args.large_batches),
    ]
    device_seconds_per_pair = {}
    for title, dataset, batch_size, batches in cases:
        aug = data.augmentation_for(data.default_data_config(dataset))
        host = batch_size / host_params_seconds(aug, batch_size, batches)
        device = batch_size / device_augment_seconds(aug, batch_size, batches)
        device_seconds_per_pair[dataset] = 1.0 / device
        print(
            f"augment {title}, batch {batch_size}: host (parameters) {host:10.1f} pairs/s/core, "
            f"device (JAX) {device:8.1f} pairs/s/core"
        )
    if args.augment_step == "none":
        return
    for dataset, stem, batch_size in (("cifar10", "cifar", 8), ("imagenette", "imagenet", 2)):
        seconds = step_seconds(args.augment_step, stem, dataset, batch_size, args.augment_steps)
        share = device_seconds_per_pair[dataset] * batch_size / seconds
        print(
            f"device augmentation / {args.augment_step} train step ({stem} stem), {dataset}, "
            f"batch {batch_size}, 1 CPU core ({seconds / batch_size:.3f} s/pair): "
            f"{100 * share:.2f}%"
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
        "slow to compile and to run on a CPU)",
    )
    parser.add_argument("--cifar-step-batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers (0: one per core)")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="instead: prepare and stream image folders of --memory-sizes images (peak RSS)",
    )
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[5_000, 100_000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--memory-steps", type=int, default=50)
    parser.add_argument("--memory-batch", type=int, default=256)
    parser.add_argument(
        "--cache-dir",
        default=os.path.join(tempfile.gettempdir(), "hscl_jax_random_images"),
        help="where the image folders are written once and reused, and prepared (tfds/)",
    )
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--memory-child-prepare", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--augment",
        action="store_true",
        help="only time the augmentation's host and device parts on one core (module docstring)",
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

    if args.memory_child_prepare:
        prepare_child(args.memory_child_prepare, args.image_size, args.cache_dir)
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

    print(
        f"machine: {os.cpu_count()} CPU cores; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}; data workers: {args.workers or os.cpu_count()}"
    )

    # --- CIFAR-10 (mocked TFDS, full SimCLR recipe).
    import tensorflow_datasets as tfds

    cifar_config = config_lib.base_config("cifar10")
    cifar_config.num_steps = 1000  # the schedule's length; nothing reads the dataset for it
    cifar_config.data.num_workers = args.workers
    with tempfile.TemporaryDirectory() as data_dir:
        cifar_config.data.data_dir = data_dir
        with tfds.testing.mock_data(as_data_source_fn=_random_cifar_source):
            cifar_pipeline = pipeline_pairs_per_second(cifar_config.data, 256, args.cifar_batches)
    print(f"cifar10 (mock, 32x32x3, SimCLR), batch 256: pipeline {cifar_pipeline:9.0f} pairs/s")
    if args.cifar_step != "none":
        cifar_config.model.name = args.cifar_step
        batch_size = args.cifar_step_batch
        batch = _device_batch(data.augmentation_for(cifar_config.data), batch_size)
        train_step, state = make_step(cifar_config)
        cifar_step, compile_seconds, _ = step_pairs_per_second(train_step, state, batch, steps=3)
        print(
            f"cifar10 step: trainer's {args.cifar_step} train step, batch {batch_size}, 1 "
            f"device: {cifar_step:9.1f} pairs/s (compile {compile_seconds:.0f} s); "
            f"pipeline/step {cifar_pipeline / cifar_step:.1f}"
        )

    # --- digits, the default config (configs/default.py).
    with tempfile.TemporaryDirectory() as data_dir:
        digits_benchmark(args, data_dir)


def digits_benchmark(args, data_dir: str) -> None:
    """Pipeline, step and end-to-end pairs/s of the default config, digits built in data_dir."""
    config = default_config()
    config.data.data_dir = data_dir
    config.data.num_workers = args.workers
    batch_size = config.global_batch_size
    digits_pipeline = pipeline_pairs_per_second(config.data, batch_size, args.batches)
    preset = data.dataset_info("digits").augmentation_preset
    print(
        f"digits (8x8x1, preset {preset}), batch {batch_size}: "
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
