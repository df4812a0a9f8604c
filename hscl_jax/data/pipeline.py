"""Training and evaluation streams shaped for pmap: (local devices, per-device batch, ...).

A split is read once into memory; every global batch is then a function of (seed, step): the
sampler maps the step to example indices (one fresh plan per epoch, from (seed, epoch)) and the
augmentation parameters come from (seed, step, view). Each host takes its contiguous slice of the
global batch, so the hosts together see exactly what one host would.

With augment_on="host" the augmentation is a TensorFlow graph (tf.function) run by a small pool of
Python threads, each on whole batches, with results consumed in step order (TF releases the GIL, so
the threads run in parallel). This replaces tf.data.Dataset.from_generator, whose PyFunc source
hung or logged errors at interpreter exit with batches in flight, and after which every TF op in
the process ran ~2.5x slower (measured here with TF 2.21). With augment_on="device" the same
threads only index the uint8 images and draw the parameters; the augmentation runs in the train
step. TensorFlow is imported only when a TFDS dataset is used; the synthetic source is numpy.

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

from hscl_jax.data import samplers
from hscl_jax.data.config import check_augment_on
from hscl_jax.data.info import DatasetInfo, dataset_info


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where this host's share of a global batch lies, and how it splits over local devices."""

    global_batch: int
    host_start: int
    host_stop: int
    num_devices: int
    per_device: int


def _layout(global_batch_size: int, num_local_devices: int | None, what: str) -> _Layout:
    available = jax.local_device_count()
    devices = available if num_local_devices is None else num_local_devices
    if not 1 <= devices <= available:
        raise ValueError(
            f"num_local_devices must be in [1, {available}] (local devices), got {devices}."
        )
    num_hosts, host = jax.process_count(), jax.process_index()
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


def _check_data_config(data_config) -> DatasetInfo:
    info = dataset_info(data_config.name)
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
    for field in ("num_workers", "prefetch_batches"):
        if data_config[field] < 0:
            raise ValueError(f"{field} must be >= 0 (0: automatic), got {data_config[field]}.")
    check_augment_on(data_config.augment_on)
    return info


def _check_seed(seed, start_step: int) -> int:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if not isinstance(start_step, int | np.integer) or start_step < 0:
        raise ValueError(f"start_step must be a non-negative integer, got {start_step!r}.")
    return int(seed)


def _split_arrays(info: DatasetInfo, data_config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a split: uint8 from TFDS, or normalised float32 for "synthetic"."""
    if info.name == "synthetic":
        from hscl_jax.data.synthetic import synthetic_split

        return synthetic_split(info, split)
    from hscl_jax.data.tfds_source import load_split

    return load_split(info, data_config.data_dir, split)


def _indexer(data_config, labels: np.ndarray, global_batch_size: int, seed: int):
    return samplers.BatchIndexer(
        labels,
        sampler=data_config.sampler,
        batch_size=global_batch_size,
        seed=seed,
        classes_per_batch=data_config.classes_per_batch,
        samples_per_class=data_config.samples_per_class,
    )


def _per_device(array: np.ndarray, layout: _Layout) -> np.ndarray:
    return array.reshape(layout.num_devices, layout.per_device, *array.shape[1:])


def _per_device_tree(arrays: dict[str, np.ndarray], layout: _Layout) -> dict[str, np.ndarray]:
    return {key: _per_device(array, layout) for key, array in arrays.items()}


def _ordered_parallel_map(
    function: Callable, items: Iterator, data_config
) -> Iterator[dict[str, np.ndarray]]:
    """function(item) for each item, computed by worker threads ahead of time, yielded in order."""
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
        # here then would only trip over half-torn-down modules.
        if not sys.is_finalizing():
            executor.shutdown(wait=False, cancel_futures=True)


def steps_per_epoch(data_config, global_batch_size: int) -> int:
    """Full global batches per training epoch (the last partial batch is dropped)."""
    info = _check_data_config(data_config)
    _, labels = _split_arrays(info, data_config, info.train_split)
    return samplers.steps_per_epoch_for(len(labels), global_batch_size)


def train_iterator(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    num_local_devices: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless stream of augmented pairs for this host, from step `start_step` on.

    Yields {"view1": float32 (D, b, crop, crop, C), "view2": same, "label": int32 (D, b)} with
    D local devices and b = global_batch_size // (process_count * D). With augment_on="device"
    (TFDS datasets) it yields {"image": uint8 (D, b, H, W, C), "view1_params": {name: (D, b,
    ...)}, "view2_params": ..., "label"} instead, which `data.device_augmentation(data_config)`
    turns into the views inside the train step (see hscl_jax.data.device_augment). Batch n
    depends only on (seed, n, data_config): starting at start_step=n gives exactly the batches
    an uninterrupted stream gives from step n on.
    """
    info = _check_data_config(data_config)
    seed = _check_seed(seed, start_step)
    layout = _layout(global_batch_size, num_local_devices, "global_batch_size")
    images, labels = _split_arrays(info, data_config, info.train_split)
    indexer = _indexer(data_config, labels, global_batch_size, seed)
    if info.name == "synthetic":
        return _synthetic_train(images, labels, indexer, layout, start_step)
    from hscl_jax.data.augment import resolve_augmentation

    aug = resolve_augmentation(data_config.augmentation, info)
    return _tfds_train(images, labels, indexer, layout, info, aug, data_config, seed, start_step)


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


def _host_views(aug, info: DatasetInfo) -> Callable:
    """(uint8 images, params1, params2) -> both views as numpy, in a TensorFlow graph."""
    from hscl_jax.data import augment
    from hscl_jax.data.tfds_source import import_tensorflow

    tf = import_tensorflow()

    @tf.function(autograph=False, reduce_retracing=True)
    def make_views(batch_images, params1, params2):
        return (
            augment.augment_batch(batch_images, params1, aug, info),
            augment.augment_batch(batch_images, params2, aug, info),
        )

    return lambda *args: tuple(view.numpy() for view in make_views(*args))


def _tfds_train(images, labels, indexer, layout, info, aug, data_config, seed, start_step):
    from hscl_jax.data import augment

    def view_params(step: int, view: int) -> dict[str, np.ndarray]:
        params = augment.view_params(seed, step, view, layout.global_batch, info.image_size, aug)
        return augment.slice_params(params, layout.host_start, layout.host_stop)

    def host_indices() -> Iterator[tuple[int, np.ndarray]]:
        # The sampler runs here, in step order, in the consumer's thread: it holds the epoch plan.
        for step in itertools.count(start_step):
            yield step, indexer(step)[layout.host_start : layout.host_stop]

    def ship_batch(step_and_indices) -> dict:
        """augment_on="device": uint8 images and both views' parameters, for the train step."""
        step, indices = step_and_indices
        return {
            "image": _per_device(images[indices], layout),
            "view1_params": _per_device_tree(view_params(step, 0), layout),
            "view2_params": _per_device_tree(view_params(step, 1), layout),
            "label": _per_device(labels[indices], layout),
        }

    def augment_batch(step_and_indices) -> dict[str, np.ndarray]:
        step, indices = step_and_indices
        view1, view2 = make_views(images[indices], view_params(step, 0), view_params(step, 1))
        return {
            "view1": _per_device(view1, layout),
            "view2": _per_device(view2, layout),
            "label": _per_device(labels[indices], layout),
        }

    if data_config.augment_on == "device":
        yield from _ordered_parallel_map(ship_batch, host_indices(), data_config)
    else:
        make_views = _host_views(aug, info)
        yield from _ordered_parallel_map(augment_batch, host_indices(), data_config)


def eval_iterator(
    data_config, *, split: str, batch_size: int, num_local_devices: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `split` exactly once, unaugmented, in order.

    `batch_size` is global (over all hosts). Yields {"image": float32 (D, b, H, W, C), "label":
    int32 (D, b), "mask": bool (D, b)}; the last batch is padded with zero images, label 0 and
    mask False. Images keep their stored size unless `eval_image_size` is set. With
    augment_on="device" "image" is the stored uint8 image instead, which
    `data.device_eval_preprocess(data_config)` turns into the float32 one on the devices.
    """
    info = _check_data_config(data_config)
    layout = _layout(batch_size, num_local_devices, "batch_size")
    images, labels = _split_arrays(info, data_config, split)
    num_examples = len(labels)
    num_batches = math.ceil(num_examples / batch_size)

    def host_batches():
        for batch in range(num_batches):
            positions = batch * batch_size + np.arange(layout.host_start, layout.host_stop)
            mask = positions < num_examples
            indices = np.where(mask, positions, 0)
            batch_images = images[indices]
            batch_images[~mask] = 0
            yield batch_images, np.where(mask, labels[indices], 0).astype(np.int32), mask

    if info.name == "synthetic":
        return (
            {
                "image": _per_device(batch_images, layout),
                "label": _per_device(batch_labels, layout),
                "mask": _per_device(mask, layout),
            }
            for batch_images, batch_labels, mask in host_batches()
        )
    return _tfds_eval(host_batches, layout, info, data_config)


def _host_eval_preprocess(info: DatasetInfo, data_config) -> Callable:
    """uint8 images -> float32 normalised eval images (numpy), in a TensorFlow graph."""
    from hscl_jax.data import augment
    from hscl_jax.data.tfds_source import import_tensorflow

    tf = import_tensorflow()

    @tf.function(autograph=False, reduce_retracing=True)
    def preprocess(batch_images):
        return augment.eval_preprocess(batch_images, info, data_config.eval_image_size)

    return lambda batch_images: preprocess(batch_images).numpy()


def _tfds_eval(host_batches, layout: _Layout, info: DatasetInfo, data_config):
    if data_config.augment_on == "device":
        # uint8 images; data.device_eval_preprocess finishes them on the device.
        preprocess = np.asarray
    else:
        preprocess = _host_eval_preprocess(info, data_config)

    def make_batch(batch) -> dict[str, np.ndarray]:
        batch_images, batch_labels, mask = batch
        return {
            "image": _per_device(preprocess(batch_images), layout),
            "label": _per_device(batch_labels, layout),
            "mask": _per_device(mask, layout),
        }

    yield from _ordered_parallel_map(make_batch, host_batches(), data_config)


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
