"""Reading a TFDS split into memory, never downloading. Imports TensorFlow: import lazily."""

from __future__ import annotations

import functools
import logging

import numpy as np

from hscl_jax.data.info import TFDS_DATASET_NAMES, DatasetInfo

_READ_BATCH = 4096


class DatasetNotPreparedError(FileNotFoundError):
    """A paper dataset is not in the data directory (this package never downloads one)."""


def import_tensorflow():
    """Imports TensorFlow with its GPUs hidden, so that it never takes accelerator memory."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # TF was initialised before we got here; only a problem if it can see a GPU.
        if tf.config.get_visible_devices("GPU"):
            logging.warning("TensorFlow was initialised with GPUs visible; it may hold GPU memory.")
    return tf


def _not_prepared_message(name: str, data_dir: str | None) -> str:
    where = data_dir or "the default TFDS data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    target = data_dir or "~/tensorflow_datasets"
    return (
        f"Dataset {name!r} is not prepared in {where}, and this pipeline never downloads. "
        f"Prepare it on a machine with network access: `tfds build {name} --data_dir={target}` "
        f"(or `python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        f"data_dir='{target}').download_and_prepare()\"`), then copy the {name}/ folder into "
        f"data_dir (a local folder or gs:// bucket) on this machine."
    )


def _read_split(name: str, data_dir: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    tf = import_tensorflow()
    import tensorflow_datasets as tfds

    if name == "digits":
        from hscl_jax.data.digits_builder import prepare_digits

        builder = prepare_digits(data_dir)
    else:
        builder = tfds.builder(name, data_dir=data_dir)
    try:
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as error:
        # TFDS signals "no data here" with an AssertionError from as_dataset.
        if "could not find data" in str(error):
            raise DatasetNotPreparedError(_not_prepared_message(name, data_dir)) from None
        raise
    dataset = dataset.map(
        lambda example: (example["image"], tf.cast(example["label"], tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).batch(_READ_BATCH)
    images, labels = [], []
    for image_batch, label_batch in dataset.as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    if not images:
        raise ValueError(f"Split {split!r} of {name!r} in {data_dir} holds no examples.")
    return np.concatenate(images), np.concatenate(labels)


@functools.lru_cache(maxsize=8)
def _cached_split(
    name: str, data_dir: str | None, split: str, reader_identity: object
) -> tuple[np.ndarray, np.ndarray]:
    del reader_identity  # Only part of the cache key.
    images, labels = _read_split(name, data_dir, split)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_split(
    info: DatasetInfo, data_dir: str | None, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory: uint8 images (n, H, W, C) and int32 labels (n,), read-only.

    Decoded splits are memoised per (dataset, data_dir, split) for the life of the process, so
    the per-epoch evaluation does not decode the data again; `clear_cache()` drops them.
    """
    if info.name not in TFDS_DATASET_NAMES:
        raise ValueError(
            f"Dataset {info.name!r} is not read through TFDS; expected one of "
            f"{', '.join(TFDS_DATASET_NAMES)}."
        )
    if split not in (info.train_split, info.test_split):
        raise ValueError(
            f"Unknown split {split!r} for {info.name}; expected {info.train_split!r} or "
            f"{info.test_split!r}."
        )
    import_tensorflow()
    import tensorflow_datasets as tfds

    # tfds.testing.mock_data patches DatasetBuilder.as_dataset with a fresh function per context,
    # so keying on it keeps mocked and real reads (and two mock contexts) apart.
    reader_identity = tfds.core.DatasetBuilder.as_dataset
    images, labels = _cached_split(info.name, data_dir, split, reader_identity)
    expected = (info.image_size, info.image_size, info.channels)
    if images.shape[1:] != expected:
        raise ValueError(
            f"{info.name} split {split!r} in {data_dir} has images of shape {images.shape[1:]}, "
            f"expected {expected}."
        )
    return images, labels


def clear_cache() -> None:
    """Forgets every split read by `load_split`."""
    _cached_split.cache_clear()
