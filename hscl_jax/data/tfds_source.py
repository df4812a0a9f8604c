"""Opening a TFDS split for random access (ArrayRecord files through `tfds.data_source`).

Nothing is ever downloaded and no split is read whole: a split is a sequence of examples read on
demand, one record per index. The errors a user can meet before training, each with its fix in
one line, live here: a dataset that is not prepared, one prepared without ArrayRecord files,
images of an unexpected shape. Labels alone (for the class-balanced sampler) are read once per
process without decoding the images.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np

from hscl_jax.data.info import DATASET_NAMES, TFDS_DATASET_NAMES, DatasetInfo

_LABEL_SCAN_LOG_EVERY = 100_000


class DatasetNotPreparedError(FileNotFoundError):
    """A paper dataset is not in the data directory (this package never downloads one)."""


class DatasetFormatError(ValueError):
    """A dataset is prepared, but without the ArrayRecord files that random access needs."""


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


def _tfds_name(info: DatasetInfo) -> str:
    return info.tfds_name or info.name


def _not_prepared_message(info: DatasetInfo, data_dir: str | None) -> str:
    where = data_dir or "the default TFDS data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    target = data_dir or "~/tensorflow_datasets"
    name = _tfds_name(info)
    folder = name.split("/")[0]
    manual = (
        f"first {info.manual_download.replace('DATA_DIR', target)} (TFDS cannot download it), then "
        if info.manual_download
        else ""
    )
    return (
        f"Dataset {info.name!r} is not prepared in {where}, and this pipeline never downloads. "
        f"Prepare it as ArrayRecord on a machine with network access: {manual}`tfds build "
        f"{name} --data_dir={target} --file_format=array_record`, then copy the {folder}/ folder "
        f"into data_dir (a local folder or gs:// bucket) on this machine."
    )


def _format_message(name: str, data_dir: str | None, builder) -> str:
    formats = ", ".join(sorted(f.value for f in builder.info.available_file_formats()))
    target = data_dir or "~/tensorflow_datasets"
    return (
        f"Dataset {name!r} in {builder.data_path} is stored as {formats or 'unknown'} files, but "
        f"this pipeline reads ArrayRecord files (random access): delete {builder.data_path} and "
        f"rebuild it with `tfds build {name} --data_dir={target} --file_format=array_record` "
        f"(or build into another data_dir and point config.data.data_dir there)."
    )


def _builder(info: DatasetInfo, data_dir: str | None):
    import tensorflow_datasets as tfds

    if info.name == "digits":
        from hscl_jax.data.digits_builder import prepare_digits

        return prepare_digits(data_dir)
    if info.name.split("/")[0] == "random_images":
        import hscl_jax.data.random_images_builder  # noqa: F401  (registers the builder)
    return tfds.builder(_tfds_name(info), data_dir=data_dir)


def _check_split(info: DatasetInfo, split: str) -> None:
    if split not in (info.train_split, info.test_split):
        raise ValueError(
            f"Unknown split {split!r} for {info.name}; expected {info.train_split!r} or "
            f"{info.test_split!r}."
        )


def _reader_identity():
    import tensorflow_datasets as tfds

    # tfds.testing.mock_data patches DatasetBuilder.as_data_source with a fresh function per
    # context, so keying caches on it keeps mocked and real reads (and two mocks) apart.
    return tfds.core.DatasetBuilder.as_data_source


def open_split(
    info: DatasetInfo, data_dir: str | None, split: str, *, decode_images: bool = True
) -> Sequence[dict]:
    """Split `split` as a random-access sequence of {"image": uint8 (H, W, C), "label": int}.

    The sequence pickles cheaply (Grain sends it to its worker processes) and reads one record
    per index. With decode_images=False the "image" entries are the undecoded bytes (for a
    dataset whose images vary in size, `grain_source.ResizeDecode` decodes them). Raises
    DatasetNotPreparedError or DatasetFormatError with the fix when the data is not readable.
    Opened splits are memoised per process (the periodic evaluation reopens them);
    `clear_cache()` forgets them.
    """
    return _cached_open(info, data_dir, split, decode_images, _reader_identity())


@functools.lru_cache(maxsize=16)
def _cached_open(
    info: DatasetInfo,
    data_dir: str | None,
    split: str,
    decode_images: bool,
    reader_identity: object,
) -> Sequence[dict]:
    del reader_identity  # Only part of the cache key.
    if info.name in DATASET_NAMES and info.name not in TFDS_DATASET_NAMES:
        raise ValueError(
            f"Dataset {info.name!r} is not read through TFDS; expected one of "
            f"{', '.join(TFDS_DATASET_NAMES)} or the DatasetInfo of another TFDS dataset."
        )
    _check_split(info, split)
    import tensorflow_datasets as tfds

    builder = _builder(info, data_dir)
    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    try:
        records = builder.as_data_source(split=split, decoders=decoders)
    except (NotImplementedError, ValueError) as error:
        # TFDS reports an unprepared folder and a non-random-access format with the same error.
        if not builder.is_prepared():
            raise DatasetNotPreparedError(_not_prepared_message(info, data_dir)) from None
        if isinstance(error, NotImplementedError):
            raise DatasetFormatError(_format_message(_tfds_name(info), data_dir, builder)) from None
        raise
    if len(records) == 0:
        raise ValueError(f"Split {split!r} of {info.name!r} in {data_dir} holds no examples.")
    expected = (info.image_size, info.image_size, info.channels)
    shape = tuple(builder.info.features["image"].shape)
    if shape[-1:] != expected[-1:] or not (info.variable_size or shape == expected):
        raise ValueError(
            f"{info.name} split {split!r} in {data_dir} has images of shape {shape}, "
            f"expected {expected}."
        )
    return records


@functools.lru_cache(maxsize=8)
def _cached_labels(
    info: DatasetInfo, data_dir: str | None, split: str, reader_identity: object
) -> np.ndarray:
    del reader_identity  # Only part of the cache key.
    records = open_split(info, data_dir, split, decode_images=False)
    labels = np.empty(len(records), dtype=np.int32)
    for index in range(len(records)):
        labels[index] = records[index]["label"]
        if index and index % _LABEL_SCAN_LOG_EVERY == 0:
            logging.info("Read %d of %d labels of %s/%s", index, len(records), info.name, split)
    labels.flags.writeable = False
    return labels


def split_labels(info: DatasetInfo, data_dir: str | None, split: str) -> np.ndarray:
    """int32 labels (n,) of a split, read-only, images not decoded; memoised per process.

    `clear_cache()` forgets them.
    """
    return _cached_labels(info, data_dir, split, _reader_identity())


def clear_cache() -> None:
    """Forgets every split opened by `open_split` and every label array read by `split_labels`."""
    _cached_open.cache_clear()
    _cached_labels.cache_clear()
