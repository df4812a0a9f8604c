"""Opening a TFDS dataset for random access (ArrayRecord files through `tfds.data_source`), and
the metadata of any prepared TFDS image-classification dataset.

Nothing is ever downloaded and no split is read whole: a split is a sequence of examples read on
demand, one record per index. The errors a user can meet before training, each with its fix in
one line, live here: a dataset that is not prepared, one prepared without ArrayRecord files or
without an image and a class label, images of an unexpected shape. Labels alone (for the
class-balanced sampler) are read once per process without decoding the images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hscl_jax.data.errors import DataError, DatasetFormatError, DatasetNotPreparedError
from hscl_jax.data.grain_source import Record, Records
from hscl_jax.data.info import DATASET_NAMES, IMAGENET_MEAN, IMAGENET_STD, DatasetInfo

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

_LABEL_SCAN_LOG_EVERY = 100_000
# The key of the TFDS metadata (metadata.json) under which `python -m hscl_jax.data.prepare`
# stores what the trainer needs beyond the features: statistics, sizes, the augmentation preset.
PREPARED_METADATA_KEY = "hscl_jax"
# A dataset without stored statistics is normalised with ImageNet's (one channel: their means).
_DEFAULT_MEAN = {3: IMAGENET_MEAN, 1: (float(np.mean(IMAGENET_MEAN)),)}
_DEFAULT_STD = {3: IMAGENET_STD, 1: (float(np.mean(IMAGENET_STD)),)}
# Images of varying size without a stored size: ImageNet's decode and crop sides.
_DEFAULT_VARIABLE_IMAGE_SIZE = 256
_DEFAULT_VARIABLE_CROP_SIZE = 224


def _tfds_name(info: DatasetInfo) -> str:
    return info.tfds_name or info.name


def _where(data_dir: str | None) -> str:
    return data_dir or "the default TFDS data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"


def _not_prepared_message(info: DatasetInfo, data_dir: str | None) -> str:
    target = data_dir or "~/tensorflow_datasets"
    name = _tfds_name(info)
    folder = name.split("/")[0]
    manual = (
        f"first {info.manual_download.replace('DATA_DIR', target)} (TFDS cannot download it), then "
        if info.manual_download
        else ""
    )
    return (
        f"Dataset {info.name!r} is not prepared in {_where(data_dir)}, and this pipeline never "
        f"downloads. Prepare it as ArrayRecord on a machine with network access: {manual}`tfds "
        f"build {name} --data_dir={target} --file_format=array_record`, then copy the {folder}/ "
        f"folder into data_dir (a local folder or gs:// bucket) on this machine."
    )


def _unknown_name_message(name: str, data_dir: str | None) -> str:
    target = data_dir or "~/tensorflow_datasets"
    return (
        f"Dataset {name!r} is not one of {', '.join(DATASET_NAMES)} and is not prepared in "
        f"{_where(data_dir)}: prepare your own images with `python -m hscl_jax.data.prepare "
        f"--image_folder=ROOT --name={name} --data_dir={target}`, or a TFDS catalogue dataset "
        f"with `tfds build {name} --data_dir={target} --file_format=array_record`."
    )


def _format_message(name: str, data_dir: str | None, builder: tfds.core.DatasetBuilder) -> str:
    formats = ", ".join(sorted(f.value for f in builder.info.available_file_formats()))
    target = data_dir or "~/tensorflow_datasets"
    return (
        f"Dataset {name!r} in {builder.data_path} is stored as {formats or 'unknown'} files, but "
        f"this pipeline reads ArrayRecord files (random access): delete {builder.data_path} and "
        f"rebuild it with `tfds build {name} --data_dir={target} --file_format=array_record` "
        f"(or build into another data_dir and point config.data.data_dir there)."
    )


@contextlib.contextmanager
def no_stray_tfds_folders() -> Iterator[None]:
    """Removes the empty `tmp*tfds` folders that TFDS makes in the system's temporary directory
    while this context runs: a builder whose dataset is not prepared yet makes one for metadata it
    would fetch from GCS (which is off) and never removes it."""
    pattern = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(pattern))
    try:
        yield
    finally:
        for folder in set(glob.glob(pattern)) - before:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only an empty one


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `name` (a catalogue class, or one read from the files in data_dir)."""
    import tensorflow_datasets as tfds

    try:
        with no_stray_tfds_folders():
            return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetNotPreparedError(_unknown_name_message(name, data_dir)) from None


def _builder(info: DatasetInfo, data_dir: str | None) -> tfds.core.DatasetBuilder:
    if info.name == "digits":
        from hscl_jax.data.digits_builder import prepare_digits

        return prepare_digits(data_dir)
    return _tfds_builder(_tfds_name(info), data_dir)


def _feature_key(
    features: tfds.features.FeaturesDict, feature_type: type, preferred: str
) -> str | None:
    """`preferred` if it is a feature of `feature_type`, else the first such feature by name, else
    None."""
    keys = sorted(key for key, feature in features.items() if isinstance(feature, feature_type))
    return preferred if preferred in keys else (keys[0] if keys else None)


def _info_from_builder(name: str, builder: tfds.core.DatasetBuilder) -> DatasetInfo:
    """Metadata of a prepared TFDS dataset: the image and label features found by type, sizes
    from the image feature, and what `hscl_jax.data.prepare` stored (statistics, sizes)."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    image_key = _feature_key(features, tfds.features.Image, "image")
    label_key = _feature_key(features, tfds.features.ClassLabel, "label")
    if image_key is None or label_key is None:
        have = ", ".join(f"{key} ({type(features[key]).__name__})" for key in sorted(features))
        raise DatasetFormatError(
            f"Dataset {name!r} in {builder.data_path} has no image feature and class-label "
            f"feature (tfds.features.Image and ClassLabel) to train on; it has: {have}."
        )
    splits = builder.info.splits
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or test_split is None:
        raise DatasetFormatError(
            f"Dataset {name!r} in {builder.data_path} has splits {', '.join(sorted(splits))}; "
            f"training needs a 'train' split and a 'test' (or 'validation') split."
        )
    height, width, channels = features[image_key].shape
    channels = channels or 3
    stored = dict(builder.info.metadata or {}).get(PREPARED_METADATA_KEY) or {}
    square = height is not None and height == width
    default_size = min(height, width) if height and width else _DEFAULT_VARIABLE_IMAGE_SIZE
    image_size = int(stored.get("image_size") or default_size)
    default_crop = image_size if height else _DEFAULT_VARIABLE_CROP_SIZE
    label = features[label_key]
    return DatasetInfo(
        name=name,
        image_size=image_size,
        channels=channels,
        num_classes=label.num_classes,
        crop_size=int(stored.get("crop_size") or min(default_crop, image_size)),
        mean=tuple(stored.get("mean") or _DEFAULT_MEAN[channels]),
        std=tuple(stored.get("std") or _DEFAULT_STD[channels]),
        train_split="train",
        test_split=test_split,
        num_train=splits["train"].num_examples,
        num_test=splits[test_split].num_examples,
        grayscale=bool(stored.get("grayscale", channels == 1)),
        variable_size=not square,
        image_key=image_key,
        label_key=label_key,
        class_names=tuple(label.names),
    )


@functools.lru_cache(maxsize=16)
def _cached_info(name: str, data_dir: str | None) -> DatasetInfo:
    builder = _tfds_builder(name, data_dir)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(_unknown_name_message(name, data_dir))
    return _info_from_builder(name, builder)


def prepared_dataset_info(name: str, data_dir: str | None) -> DatasetInfo:
    """The `DatasetInfo` of TFDS dataset `name` prepared in `data_dir` (None: TFDS's default);
    memoised per process. Images of one square size are decoded by TFDS; others (varying or
    non-square) go through the variable-size path (`grain_source.ResizeDecode`). Statistics, sizes
    and the preset are those `python -m hscl_jax.data.prepare` stored, else ImageNet's
    statistics, the stored size (varying: 256) and crops of it (varying: 224)."""
    return _cached_info(name, data_dir)


def _check_split(info: DatasetInfo, split: str) -> None:
    if split not in (info.train_split, info.test_split):
        raise DataError(
            f"Unknown split {split!r} for {info.name}; expected {info.train_split!r} or "
            f"{info.test_split!r}."
        )


def _reader_identity() -> object:
    import tensorflow_datasets as tfds

    # tfds.testing.mock_data patches DatasetBuilder.as_data_source with a fresh function per
    # context, so keying caches on it keeps mocked and real reads (and two mocks) apart.
    return tfds.core.DatasetBuilder.as_data_source


@dataclasses.dataclass(frozen=True)
class _Renamed(Sequence[Record]):
    """A split whose image and label features have other names, read as {"image", "label"}."""

    records: Sequence[dict[str, Any]]
    image_key: str
    label_key: str

    def __len__(self) -> int:
        return len(self.records)

    # Read by index only (Records): slices are not supported.
    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        record = self.records[index]
        return {"image": record[self.image_key], "label": record[self.label_key]}


def open_split(
    info: DatasetInfo, data_dir: str | None, split: str, *, decode_images: bool = True
) -> Records:
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
) -> Records:
    del reader_identity  # Only part of the cache key.
    _check_split(info, split)
    import tensorflow_datasets as tfds

    builder = _builder(info, data_dir)
    decoders = None if decode_images else {info.image_key: tfds.decode.SkipDecoding()}
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
        raise DataError(f"Split {split!r} of {info.name!r} in {data_dir} holds no examples.")
    expected = (info.image_size, info.image_size, info.channels)
    shape = tuple(builder.info.features[info.image_key].shape)
    if shape[-1:] != expected[-1:] or not (info.variable_size or shape == expected):
        raise DatasetFormatError(
            f"{info.name} split {split!r} in {data_dir} has images of shape {shape}, "
            f"expected {expected}."
        )
    if (info.image_key, info.label_key) != ("image", "label"):
        return _Renamed(records, info.image_key, info.label_key)
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
    """Forgets every split, label array and dataset metadata read so far (memoised per process)."""
    _cached_open.cache_clear()
    _cached_labels.cache_clear()
    _cached_info.cache_clear()
