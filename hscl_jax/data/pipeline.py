"""Training and evaluation streams shaped for the devices: (local devices, per-device batch, ...).

Every global batch is a function of (seed, step): the sampler maps the step to example indices
(one fresh plan per epoch, from (seed, epoch)) and the augmentation parameters come from (seed,
step, view). Each process takes its contiguous slice of the global batch and reads and decodes
only those examples, by random access (hscl_jax.data.grain_source over TFDS ArrayRecord files,
hscl_jax.data.tfds_source, or the numpy pool of hscl_jax.data.synthetic), so no split is ever held
in memory and the processes together see exactly what one process would. A small pool of threads
reads, decodes and indexes whole batches (or hands over what Grain worker processes decoded, with
`decode_workers`), consumed in step order. The host ships uint8 images and both views'
parameters; the augmentation runs in the train step (hscl_jax.data.augment). No TensorFlow import.

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
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent import futures
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np

from hscl_jax.data import augment_params, grain_source, samplers
from hscl_jax.data.augment import TrainBatch
from hscl_jax.data.config import check_config
from hscl_jax.data.errors import DataError
from hscl_jax.data.info import DatasetInfo
from hscl_jax.data.parallel import ordered_map

Item = TypeVar("Item")
Batch = TypeVar("Batch")
# A batch loader of grain_source.batch_loaders: its number, and what reads it.
_Loader = tuple[int, Callable[[], dict[str, np.ndarray]]]


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
        raise DataError(
            f"num_local_devices must be in [1, {available}] (local devices), got {devices}."
        )
    num_hosts = jax.process_count() if process_count is None else process_count
    host = jax.process_index() if process_index is None else process_index
    if not 0 <= host < num_hosts:
        raise DataError(f"process_index must be in [0, {num_hosts}), got {host}.")
    if global_batch_size < 1 or global_batch_size % (num_hosts * devices):
        raise DataError(
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


def _check_seed(seed: object, start_step: int) -> int:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}.")
    if not isinstance(start_step, int | np.integer) or start_step < 0:
        raise DataError(f"start_step must be a non-negative integer, got {start_step!r}.")
    return int(seed)


def _open_split(
    info: DatasetInfo, data_config: ml_collections.ConfigDict, split: str
) -> tuple[grain_source.Records, grain_source.ResizeDecode | None]:
    """(records, decode) of a split: images of varying size come encoded, for `decode`."""
    grain_source.check_decode_workers(data_config.decode_workers)
    if data_config.decode_workers:
        grain_source.import_grain()  # a missing package stops the run here, not later
    if info.name == "synthetic":
        from hscl_jax.data.synthetic import SyntheticRecords

        return SyntheticRecords(info, split), None
    from hscl_jax.data import tfds_source

    records = tfds_source.open_split(
        info, data_config.data_dir, split, decode_images=not info.variable_size
    )
    decode = grain_source.ResizeDecode(info.image_size, info.channels)
    return records, decode if info.variable_size else None


def _train_labels(
    info: DatasetInfo, data_config: ml_collections.ConfigDict, records: grain_source.Records
) -> np.ndarray:
    """Every training label, images not decoded (for the class-balanced sampler)."""
    if info.name == "synthetic":
        from hscl_jax.data.synthetic import SyntheticRecords

        assert isinstance(records, SyntheticRecords)  # what _open_split opens for "synthetic"
        return records.labels
    from hscl_jax.data import tfds_source

    return tfds_source.split_labels(info, data_config.data_dir, info.train_split)


def _per_device(array: np.ndarray, layout: _Layout) -> np.ndarray:
    return array.reshape(layout.num_devices, layout.per_device, *array.shape[1:])


def _per_device_tree(arrays: dict[str, np.ndarray], layout: _Layout) -> dict[str, np.ndarray]:
    return {key: _per_device(array, layout) for key, array in arrays.items()}


def _ordered_parallel_map(
    function: Callable[[Item], Batch], items: Iterator[Item], data_config: ml_collections.ConfigDict
) -> Generator[Batch, None, None]:
    """function(item) for each item, computed by worker threads ahead of time, yielded in order.

    Closes `items` (and so any Grain workers behind it) when the stream is closed.
    """
    num_workers = data_config.num_workers or os.cpu_count() or 1
    depth = data_config.prefetch_batches or 2 * num_workers
    executor = futures.ThreadPoolExecutor(num_workers, thread_name_prefix="hscl_jax.data")
    try:
        yield from ordered_map(function, items, executor, depth)
    finally:
        # At interpreter exit the executor's own exit hook joins the workers; shutting down from
        # here then would only trip over half-torn-down modules. Otherwise the batches in
        # flight finish first, so that nothing reads the data after the stream is closed.
        if not sys.is_finalizing():
            executor.shutdown(wait=True, cancel_futures=True)
            close = getattr(items, "close", None)
            if close is not None:
                close()


def steps_per_epoch(data_config: ml_collections.ConfigDict, global_batch_size: int) -> int:
    """Full global batches per training epoch (the last partial batch is dropped)."""
    info = check_config(data_config)
    records, _ = _open_split(info, data_config, info.train_split)
    return samplers.steps_per_epoch_for(len(records), global_batch_size)


def train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    num_local_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Generator[TrainBatch, None, None]:
    """Endless stream of training batches for this process, from step `start_step` on.

    Yields {"image": uint8 (D, b, H, W, C), "view1_params": {name: (D, b, ...)}, "view2_params":
    ..., "label": int32 (D, b)} with D local devices and b = global_batch_size // (process_count
    * D): the one training-batch layout, which `augment.augment_views` turns into the two views
    (the train step does, first). Batch n depends only on (seed, n, data_config): starting at
    start_step=n gives exactly the batches an uninterrupted stream gives from step n on.
    process_index / process_count default to jax's; this process reads only the examples of its
    slice of each global batch.

    Bad config values and unreadable data raise DataError here, before the first batch is asked
    for.
    """
    info = check_config(data_config)
    seed = _check_seed(seed, start_step)
    layout = _layout(
        global_batch_size, num_local_devices, "global_batch_size", process_index, process_count
    )
    records, decode = _open_split(info, data_config, info.train_split)
    labels = None
    if data_config.sampler == "class_balanced":
        labels = _train_labels(info, data_config, records)
    indexer = samplers.BatchIndexer(
        num_examples=len(records),
        labels=labels,
        sampler=data_config.sampler,
        batch_size=global_batch_size,
        seed=seed,
        classes_per_batch=data_config.classes_per_batch,
        samples_per_class=data_config.samples_per_class,
    )
    reader = grain_source.TrainBatchReader(
        records, indexer, layout.host_start, layout.host_stop, decode
    )
    aug = augment_params.resolve_augmentation(data_config.augmentation, info)
    return _train_batches(reader, layout, aug, data_config, seed, start_step)


def _train_batches(
    reader: grain_source.TrainBatchReader,
    layout: _Layout,
    aug: augment_params.Augmentation,
    data_config: ml_collections.ConfigDict,
    seed: int,
    start_step: int,
) -> Generator[TrainBatch, None, None]:
    def view_params(step: int, view: int) -> dict[str, np.ndarray]:
        params = augment_params.view_params(seed, step, view, layout.global_batch, aug)
        return augment_params.slice_params(params, layout.host_start, layout.host_stop)

    def ship_batch(step_and_loader: _Loader) -> TrainBatch:
        step, load = step_and_loader
        host = load()
        return {
            "image": _per_device(host["image"], layout),
            "view1_params": _per_device_tree(view_params(step, 0), layout),
            "view2_params": _per_device_tree(view_params(step, 1), layout),
            "label": _per_device(host["label"], layout),
        }

    # The loaders run the sampler in step order in the consumer's thread or in Grain's workers.
    loaders = grain_source.batch_loaders(
        reader, start=start_step, stop=None, decode_workers=data_config.decode_workers
    )
    yield from _ordered_parallel_map(ship_batch, loaders, data_config)


def eval_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    num_local_devices: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Generator[dict[str, np.ndarray], None, None]:
    """Every example of `split` exactly once, unaugmented, in order.

    `batch_size` is global (over all processes); each process reads only its slice. Yields
    {"image": uint8 (D, b, H, W, C) at the stored size, "label": int32 (D, b), "mask": bool (D,
    b)}; the last batch is padded with zero images, label 0 and mask False. The function
    `config.eval_preprocessing(data_config)` turns the images into the float32 ones the encoder
    takes, on the devices. Arguments after `num_local_devices` as in train_iterator.
    """
    info = check_config(data_config)
    layout = _layout(batch_size, num_local_devices, "batch_size", process_index, process_count)
    records, decode = _open_split(info, data_config, split)
    reader = grain_source.EvalBatchReader(
        records, batch_size, layout.host_start, layout.host_stop, decode
    )
    num_batches = math.ceil(len(records) / batch_size)

    def make_batch(batch_and_loader: _Loader) -> dict[str, np.ndarray]:
        _, load = batch_and_loader
        return _per_device_tree(load(), layout)

    loaders = grain_source.batch_loaders(
        reader, start=0, stop=num_batches, decode_workers=data_config.decode_workers
    )
    return _ordered_parallel_map(make_batch, loaders, data_config)


def prefetch_to_device(
    iterator: Iterable[Any], size: int = 2, devices: Sequence[jax.Device] | None = None
) -> Generator[Any, None, None]:
    """Moves each (D, ...) batch onto D local devices (pmap's layout), `size` batches ahead.

    `devices` defaults to the first D of `jax.local_devices()`, the devices pmap uses.
    """
    if size < 1:
        raise DataError(f"prefetch size must be >= 1, got {size}.")
    batches = iter(iterator)

    # A batch is any pytree of (D, ...) arrays.
    def to_devices(batch: Any) -> Any:
        num_devices = jax.tree_util.tree_leaves(batch)[0].shape[0]
        targets = list(devices) if devices is not None else jax.local_devices()[:num_devices]
        if len(targets) != num_devices:
            raise DataError(
                f"Batch leading axis {num_devices} does not match the {len(targets)} devices given."
            )
        mesh = jax.sharding.Mesh(np.array(targets), ("devices",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
        return jax.tree_util.tree_map(lambda array: jax.device_put(array, sharding), batch)

    queue: collections.deque[Any] = collections.deque()
    for batch in itertools.islice(batches, size):
        queue.append(to_devices(batch))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(batches, 1):
            queue.append(to_devices(batch))
