"""Encoder features of a dataset split: the pmapped feature function, the loop over evaluation
batches, the gather across processes, and :func:`split_features` that combines them.

Layer 2: imports models and data (layer 0); imported by evaluate.py (the kNN monitor, a finished
run), analysis.py (test-set embeddings) and anything later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np

from hscl_jax import data, models


def make_feature_fn(model: models.ContrastiveModel, devices) -> Callable:
    """pmapped ``(variables, images (D, b, ...)) -> normalised encoder features (D, b, d)``."""

    def features_of(variables, images):
        features, _ = model.apply(variables, images, train=False)
        return features

    return jax.pmap(features_of, devices=devices)


def compute_features(
    apply_features: Callable,
    variables,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    max_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder features and labels of every unmasked example of ``batches`` (numpy, host).

    ``apply_features`` is a pmapped ``(variables, images) -> features``; ``batches`` yields
    {"image": (D, b, ...), "label": (D, b), "mask": (D, b)} as data.eval_iterator does.
    ``max_examples`` stops after that many examples (None: all).
    """
    features, labels, collected = [], [], 0
    for batch in batches:
        batch_features = np.asarray(apply_features(variables, batch["image"]))
        mask = np.asarray(batch["mask"]).reshape(-1)
        features.append(batch_features.reshape(mask.shape[0], -1)[mask])
        labels.append(np.asarray(batch["label"]).reshape(-1)[mask])
        collected += int(mask.sum())
        if max_examples is not None and collected >= max_examples:
            break
    features, labels = np.concatenate(features), np.concatenate(labels)
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
    feature_fn: Callable,
    replicated_variables,
    data_config,
    split: str,
    *,
    batch_size: int,
    num_local_devices: int,
    max_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of ``split`` of ``data_config``'s dataset, gathered from all processes.

    ``feature_fn`` comes from :func:`make_feature_fn` over ``num_local_devices`` devices and
    ``replicated_variables`` are the model variables replicated over them; ``batch_size`` is
    global. ``max_examples`` (single process) keeps the first that many examples only.
    """
    batches = data.eval_iterator(
        data_config, split=split, batch_size=batch_size, num_local_devices=num_local_devices
    )
    # The stream holds uint8 images, preprocessed here on the devices.
    devices = jax.local_devices()[:num_local_devices]
    preprocess = jax.pmap(data.eval_preprocessing(data_config), devices=devices)
    images_ready = ({**batch, "image": preprocess(batch["image"])} for batch in batches)
    try:
        features, labels = compute_features(
            feature_fn, replicated_variables, images_ready, max_examples=max_examples
        )
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return gather_across_processes(features), gather_across_processes(labels)
