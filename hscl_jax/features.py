"""Encoder features of a dataset split: the feature function mapped over the devices, the loop over
evaluation batches, the gather across processes, and :func:`split_features` that combines them.

The feature function is mapped as the train step is (hscl_jax.distributed.Parallelism: a
``shard_map`` over a mesh, or ``pmap``), so the trainer's kNN monitor reads the replicated train
state where it lies. uint8 evaluation images are preprocessed on the devices, in the same mapped
function as the encoder.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np
from jax.sharding import PartitionSpec

from hscl_jax import data, distributed, models

if TYPE_CHECKING:
    import ml_collections

# How uint8 evaluation images become the encoder's input: (the dataset, the eval image size).
EvalImages = tuple[data.DatasetInfo, int]


class FeatureFn(Protocol):
    """What :func:`make_feature_fn` returns: ``(variables, images, eval_images=None) ->
    features`` (host numpy)."""

    def __call__(
        self,
        variables: Any,
        images: np.ndarray | jax.Array,
        eval_images: EvalImages | None = None,
    ) -> np.ndarray: ...


def _features_of(
    variables: Any,
    images: jax.Array,
    *,
    model: models.ContrastiveModel,
    eval_images: EvalImages | None,
) -> jax.Array:
    if eval_images is not None:
        images = data.eval_images(images, *eval_images)
    features, _ = model.apply(variables, images, train=False)
    return features


def make_feature_fn(
    model: models.ContrastiveModel, devices: Sequence[jax.Device], parallelism: str = "pmap"
) -> FeatureFn:
    """``(variables, images, eval_images=None) -> features`` mapped over ``devices`` (those of
    every process) as ``parallelism`` says ("mesh" or "pmap": hscl_jax.distributed.Parallelism).

    ``variables`` are replicated over ``devices`` as that parallelism replicates;
    ``images`` are this process's (local devices, b, H, W, C); the result is its normalised
    encoder features (local devices x b, d), host numpy. ``eval_images`` (:data:`EvalImages`):
    the images are uint8 and are preprocessed on the devices first; None: they are ready.
    """
    parallel = distributed.Parallelism(parallelism, tuple(devices))
    replicated, sharded = PartitionSpec(), PartitionSpec(distributed.AXIS_NAME)
    # One compiled function per kind of input images.
    mapped: dict[EvalImages | None, Callable[..., Any]] = {}

    def features(
        variables: Any, images: np.ndarray | jax.Array, eval_images: EvalImages | None = None
    ) -> np.ndarray:
        if eval_images not in mapped:
            per_device = functools.partial(_features_of, model=model, eval_images=eval_images)
            mapped[eval_images] = parallel.map(per_device, (replicated, sharded), sharded)
        output = mapped[eval_images](variables, parallel.put_batch(images))
        return parallel.local_rows(output)

    return features


def compute_features(
    apply_features: FeatureFn,
    variables: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    eval_images: EvalImages | None = None,
    max_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder features and labels of every unmasked example of ``batches`` (numpy, host).

    ``apply_features`` comes from :func:`make_feature_fn`; ``batches`` yields
    {"image": (D, b, ...), "label": (D, b), "mask": (D, b)} as data.eval_iterator does; uint8
    images are preprocessed per ``eval_images``. ``max_examples`` stops after that many examples
    (None: all).
    """
    feature_rows: list[np.ndarray] = []
    label_rows: list[np.ndarray] = []
    collected = 0
    for batch in batches:
        raw = np.asarray(batch["image"]).dtype == np.uint8
        batch_features = apply_features(variables, batch["image"], eval_images if raw else None)
        mask = np.asarray(batch["mask"]).reshape(-1)
        feature_rows.append(batch_features.reshape(mask.shape[0], -1)[mask])
        label_rows.append(np.asarray(batch["label"]).reshape(-1)[mask])
        collected += int(mask.sum())
        if max_examples is not None and collected >= max_examples:
            break
    features, labels = np.concatenate(feature_rows), np.concatenate(label_rows)
    if max_examples is not None:
        features, labels = features[:max_examples], labels[:max_examples]
    return features, labels


def gather_across_processes(array: np.ndarray) -> np.ndarray:
    """The rows of ``array`` of every process, in process order (``array`` itself on one)."""
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils

    # Processes can hold different counts: pad to the largest, gather, then drop the padding.
    counts = multihost_utils.process_allgather(np.array([array.shape[0]]))
    padded = np.zeros((int(counts.max()), *array.shape[1:]), array.dtype)
    padded[: array.shape[0]] = array
    gathered = multihost_utils.process_allgather(padded)
    return np.concatenate([gathered[i, : int(n)] for i, n in enumerate(counts.reshape(-1))])


def split_features(
    feature_fn: FeatureFn,
    replicated_variables: Any,
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    num_local_devices: int,
    max_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of ``split`` of ``data_config``'s dataset, gathered from all processes.

    ``feature_fn`` comes from :func:`make_feature_fn` over ``num_local_devices`` devices of
    every process and ``replicated_variables`` are the model variables replicated over them;
    ``batch_size`` is global. ``max_examples`` (single process) keeps the first that many
    examples only.
    """
    batches = data.eval_iterator(
        data_config, split=split, batch_size=batch_size, num_local_devices=num_local_devices
    )
    info = data.dataset_info(data_config.name, data_config.get("data_dir"))
    eval_images = (info, data_config.eval_image_size)
    try:
        features, labels = compute_features(
            feature_fn,
            replicated_variables,
            batches,
            eval_images=eval_images,
            max_examples=max_examples,
        )
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return gather_across_processes(features), gather_across_processes(labels)
