"""Training and evaluation streams shaped for pmap: (local devices, per-device batch, ...).

Every global batch is a function of (seed, step): the sampler maps the step to example indices
(one fresh plan per epoch, from (seed, epoch)) and the augmentation parameters come from (seed,
step, view). Each process takes its contiguous slice of the global batch and reads and decodes
only those examples, by random access (hscl_jax.data.grain_source over TFDS ArrayRecord files,
hscl_jax.data.tfds_source), so no split is ever held in memory and the processes together see
exactly what one process would. Decoding runs in the augmentation threads or, with
`decode_workers`, in Grain worker processes.

The augmentation is a TensorFlow graph (tf.function) run by a small pool of Python threads, each
on whole batches, with results consumed in step order (TF releases the GIL, so the threads run in
parallel). This replaces tf.data.Dataset.from_generator, whose PyFunc source hung or logged
errors at interpreter exit with batches in flight, and after which every TF op in the process ran
~2.5x slower (measured here with TF 2.21). TensorFlow is imported only when a TFDS dataset is
augmented; the synthetic source is numpy.

Exact resumption also assumes the same numpy version: the plans and augmentation parameters come
from numpy Generators seeded through SeedSequence, whose streams numpy keeps stable in practice
but does not promise across versions.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import sys
from collections.abc import Callable, Iterator
from concurrent import futures

import jax
import numpy as np

from hscl_jax.data import grain_source, samplers
from hscl_jax.data.info import DatasetInfo, dataset_info


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where this host's share of a global batch lies, and how it splits over local devices."""

    global_batch: int
    host_start: int
    host_stop: int
    num_devices: int
    per_device: int


def _layout(
    global_batch_size: int,
    num_local_devices: int | None,
    what: str,
    process_index: int | None,
    process_count: int | None,
) -> _Layout:
    available = jax.local_device_count()
    devices = available if num_local_devices is None else num_local_devices
    if not 1 <= devices <= available:
        raise ValueError(
            f"num_local_devices must be in [1, {available}] (local devices), got {devices}."
        )
    num_hosts = jax.process_count() if process_count is None else process_count
    host = jax.process_index() if process_index is None else process_index
    if not 0 <= host < num_hosts:
        raise ValueError(f"process_index must be in [0, {num_hosts}), got {host}.")
    if global_batch_size < 1 or global_batch_size % (num_hosts * devices):
        raise ValueError(
            f"{what} {global_batch_size} must be a positive multiple of process_count "
            f"({num_hosts}) x local devices ({devices}) = {num_hosts * devices}."
        )
    host_batch = global_batch_size // num_hosts
    return _Layout(
        global_batch=global_batch_size,
        host_start=host * host_batch,
        host_stop=(host + 1) * host_batch,
        num_devices=devices,
        per_device=host_batch // devices,
    )


def _check_data_config(data_config, info: DatasetInfo | None = None) -> DatasetInfo:
    info = dataset_info(data_config.name) if info is None else info
    if data_config.sampler not in samplers.SAMPLERS:
        raise ValueError(
            f"Unknown sampler {data_config.sampler!r}; expected one of "
            f"{', '.join(samplers.SAMPLERS)}."
        )
    if data_config.eval_image_size < 0:
        raise ValueError(
            f"eval_image_size must be 0 (stored size) or a size in pixels, got "
            f"{data_config.eval_image_size}."
        )
    for field in ("num_workers", "prefetch_batches", "decode_workers"):
        if data_config[field] < 0:
            raise ValueError(
                f"{field} must be >= 0 (0: the default, see default_data_config), got "
                f"{data_config[field]}."
            )
    return info


def _check_seed(seed, start_step: int) -> int:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if not isinstance(start_step, int | np.integer) or start_step < 0:
        raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}.")
    return int(seed)


def _indexer(data_config, num_examples: int, labels, global_batch_size: int, seed: int):
    return samplers.BatchIndexer(
        num_examples=num_examples,
        labels=labels,
        sampler=data_config.sampler,
        batch_size=global_batch_size,
        seed=seed,
        classes_per_batch=data_config.classes_per_batch,
        samples_per_class=data_config.samples_per_class,
    )


def _open_tfds(info: DatasetInfo, data_config, split: str):
    """(records, decode) of a split: images of varying size come encoded, for `decode`."""
    from hscl_jax.data import tfds_source

    grain_source.import_grain()  # missing packages stop the run here, not after compilation
    grain_source.check_decode_workers(data_config.decode_workers)
    records = tfds_source.open_split(
        info, data_config.data_dir, split, decode_images=not info.variable_size
    )
    decode = grain_source.ResizeDecode(info.image_size, info.channels)
    return records, decode if info.variable_size else None


def _per_device(array: np.ndarray, layout: _Layout) -> np.ndarray:
    return array.reshape(layout.num_devices, layout.per_device, *array.shape[1:])


def _ordered_parallel_map(
    function: Callable, items: Iterator, data_config
) -> Iterator[dict[str, np.ndarray]]:
    """function(item) for each item, computed by worker threads ahead of time, yielded in order.

    Closes `items` (and so any Grain workers behind it) when the stream is closed.
    """
    num_workers = data_config.num_workers or os.cpu_count() or 1
    depth = data_config.prefetch_batches or 2 * num_workers
    executor = futures.ThreadPoolExecutor(num_workers, thread_name_prefix="hscl_jax.data")
    pending = collections.deque()
    try:
        for item in itertools.islice(items, depth):
            pending.append(executor.submit(function, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(items, 1):
                pending.append(executor.submit(function, item))
            yield result
    finally:
        # At interpreter exit the executor's own exit hook joins the workers; shutting down from
        # here then would only trip over half-torn-down modules. Otherwise the batches in
        # flight finish first, so that nothing reads the data after the stream is closed.
        if not sys.is_finalizing():
            executor.shutdown(wait=True, cancel_futures=True)
            close = getattr(items, "close", None)
            if close is not None:
                close()


def _num_examples(info: DatasetInfo, data_config, split: str) -> int:
    if info.name == "synthetic":
        return info.num_train if split == info.train_split else info.num_test
    return len(_open_tfds(info, data_config, split)[0])


def steps_per_epoch(data_config, global_batch_size: int, *, info: DatasetInfo | None = None) -> int:
    """Full global batches per training epoch (the last partial batch is dropped)."""
    info = _check_data_config(data_config, info)
    num_examples = _num_examples(info, data_config, info.train_split)
    return samplers.steps_per_epoch_for(num_examples, global_batch_size)


def train_iterator(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    num_local_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    info: DatasetInfo | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless stream of augmented pairs for this process, from step `start_step` on.

    Yields {"view1": float32 (D, b, crop, crop, C), "view2": same, "label": int32 (D, b)} with
    D local devices and b = global_batch_size // (process_count * D). Batch n depends only on
    (seed, n, data_config): starting at start_step=n gives exactly the batches an uninterrupted
    stream gives from step n on. process_index / process_count default to jax's; this process
    reads only the examples of its slice of each global batch. `info` describes a TFDS dataset
    outside DATASET_NAMES (default: dataset_info(data_config.name)).

    Bad config values and unreadable data raise here, before the first batch is asked for.
    """
    info = _check_data_config(data_config, info)
    seed = _check_seed(seed, start_step)
    layout = _layout(
        global_batch_size, num_local_devices, "global_batch_size", process_index, process_count
    )
    if info.name == "synthetic":
        from hscl_jax.data.synthetic import synthetic_split

        images, labels = synthetic_split(info, info.train_split)
        indexer = _indexer(data_config, len(labels), labels, global_batch_size, seed)
        return _synthetic_train(images, labels, indexer, layout, start_step)
    from hscl_jax.data import tfds_source
    from hscl_jax.data.augment import resolve_augmentation

    records, decode = _open_tfds(info, data_config, info.train_split)
    labels = None
    if data_config.sampler == "class_balanced":
        labels = tfds_source.split_labels(info, data_config.data_dir, info.train_split)
    indexer = _indexer(data_config, len(records), labels, global_batch_size, seed)
    reader = grain_source.TrainBatchReader(
        records, indexer, layout.host_start, layout.host_stop, decode
    )
    aug = resolve_augmentation(data_config.augmentation, info)
    return _tfds_train(reader, layout, info, aug, data_config, seed, start_step)


def _synthetic_train(images, labels, indexer, layout: _Layout, start_step: int):
    from hscl_jax.data.synthetic import synthetic_pair

    for step in itertools.count(start_step):
        indices = indexer(step)[layout.host_start : layout.host_stop]
        view1, view2 = synthetic_pair(images, indices)
        yield {
            "view1": _per_device(view1, layout),
            "view2": _per_device(view2, layout),
            "label": _per_device(labels[indices], layout),
        }


def _tfds_train(reader, layout, info, aug, data_config, seed, start_step):
    from hscl_jax.data import augment
    from hscl_jax.data.tfds_source import import_tensorflow

    tf = import_tensorflow()

    def view_params(step: int, view: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, samplers.AUGMENT_STREAM, step, view])
        params = augment.sample_params(rng, layout.global_batch, info.image_size, aug)
        return augment.slice_params(params, layout.host_start, layout.host_stop)

    @tf.function(autograph=False, reduce_retracing=True)
    def make_views(batch_images, params1, params2):
        return (
            augment.augment_batch(batch_images, params1, aug, info),
            augment.augment_batch(batch_images, params2, aug, info),
        )

    def make_batch(step_and_loader) -> dict[str, np.ndarray]:
        step, load = step_and_loader
        host = load()
        view1, view2 = make_views(host["image"], view_params(step, 0), view_params(step, 1))
        return {
            "view1": _per_device(view1.numpy(), layout),
            "view2": _per_device(view2.numpy(), layout),
            "label": _per_device(host["label"], layout),
        }

    # The loaders run the sampler in step order in the consumer's thread or in Grain's workers.
    loaders = grain_source.batch_loaders(
        reader, start=start_step, stop=None, decode_workers=data_config.decode_workers
    )
    yield from _ordered_parallel_map(make_batch, loaders, data_config)


def eval_iterator(
    data_config,
    *,
    split: str,
    batch_size: int,
    num_local_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    info: DatasetInfo | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `split` exactly once, unaugmented, in order.

    `batch_size` is global (over all processes); each process reads only its slice. Yields
    {"image": float32 (D, b, H, W, C), "label": int32 (D, b), "mask": bool (D, b)}; the last
    batch is padded with zero images, label 0 and mask False. Images keep their stored size
    unless `eval_image_size` is set. Arguments after `num_local_devices` as in train_iterator.
    """
    info = _check_data_config(data_config, info)
    layout = _layout(batch_size, num_local_devices, "batch_size", process_index, process_count)
    if info.name == "synthetic":
        from hscl_jax.data.synthetic import synthetic_split

        images, labels = synthetic_split(info, split)
        return _synthetic_eval(images, labels, layout)
    records, decode = _open_tfds(info, data_config, split)
    reader = grain_source.EvalBatchReader(
        records, batch_size, layout.host_start, layout.host_stop, decode
    )
    num_batches = math.ceil(len(records) / batch_size)
    return _tfds_eval(reader, num_batches, layout, info, data_config)


def _synthetic_eval(images: np.ndarray, labels: np.ndarray, layout: _Layout):
    for batch in range(math.ceil(len(labels) / layout.global_batch)):
        positions = batch * layout.global_batch + np.arange(layout.host_start, layout.host_stop)
        mask = positions < len(labels)
        indices = np.where(mask, positions, 0)
        batch_images = images[indices]
        batch_images[~mask] = 0
        yield {
            "image": _per_device(batch_images, layout),
            "label": _per_device(np.where(mask, labels[indices], 0).astype(np.int32), layout),
            "mask": _per_device(mask, layout),
        }


def _tfds_eval(reader, num_batches: int, layout: _Layout, info: DatasetInfo, data_config):
    from hscl_jax.data import augment
    from hscl_jax.data.tfds_source import import_tensorflow

    tf = import_tensorflow()

    @tf.function(autograph=False, reduce_retracing=True)
    def preprocess(batch_images):
        return augment.eval_preprocess(batch_images, info, data_config.eval_image_size)

    def make_batch(batch_and_loader) -> dict[str, np.ndarray]:
        _, load = batch_and_loader
        host = load()
        return {
            "image": _per_device(preprocess(host["image"]).numpy(), layout),
            "label": _per_device(host["label"], layout),
            "mask": _per_device(host["mask"], layout),
        }

    loaders = grain_source.batch_loaders(
        reader, start=0, stop=num_batches, decode_workers=data_config.decode_workers
    )
    yield from _ordered_parallel_map(make_batch, loaders, data_config)


def prefetch_to_device(iterator, size: int = 2, devices=None):
    """Moves each (D, ...) batch onto D local devices (pmap's layout), `size` batches ahead.

    `devices` defaults to the first D of `jax.local_devices()`, the devices pmap uses.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}.")
    iterator = iter(iterator)

    def to_devices(batch):
        num_devices = jax.tree_util.tree_leaves(batch)[0].shape[0]
        targets = list(devices) if devices is not None else jax.local_devices()[:num_devices]
        if len(targets) != num_devices:
            raise ValueError(
                f"Batch leading axis {num_devices} does not match the {len(targets)} devices given."
            )
        mesh = jax.sharding.Mesh(np.array(targets), ("devices",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
        return jax.tree_util.tree_map(lambda array: jax.device_put(array, sharding), batch)

    queue = collections.deque()
    for batch in itertools.islice(iterator, size):
        queue.append(to_devices(batch))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(iterator, 1):
            queue.append(to_devices(batch))
