"""`digits`: scikit-learn's bundled 8x8 handwritten digits as a real TFDS dataset, built offline.

Importing this module imports tensorflow_datasets and registers the builder, so that
`tfds.builder("digits", data_dir=...)` works like for any catalogue dataset. `prepare_digits`
builds it as ArrayRecord files (random access, read through `tfds.data_source`) and replaces a
build of this version in another file format.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from hscl_jax import locks
from hscl_jax.data import samplers
from hscl_jax.data.tfds_source import no_stray_tfds_folders

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_FILE_FORMAT = "array_record"
# load_digits stores pixel intensities as integers 0..16.
_DIGITS_MAX_INTENSITY = 16


def digits_split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Fixed stratified train/test split: indices into load_digits() for each split, sorted."""
    is_test = samplers.stratified_test_mask(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 images (n, 8, 8, 1) scaled to 0..255, and int64 labels (n,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scaled = np.rint(digits.images * (255.0 / _DIGITS_MAX_INTENSITY))
    images = scaled.astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


# TFDS has no type information: its builder base class is Any to the checker.
class Digits(tfds.core.GeneratorBasedBuilder):  # type: ignore[misc]
    """scikit-learn's optical recognition of handwritten digits (UCI), 10 classes, 8x8 grayscale."""

    # 1.0.0 was written as TFRecord by earlier versions of this package; their folders stay
    # readable by them, and 1.1.0 is built next to them.
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Stratified 80/20 train/test split with seed 0.",
        "1.1.0": "Same examples, stored as ArrayRecord files for random access.",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "The 1797 8x8 grayscale handwritten digits bundled with scikit-learn, intensities "
                "0..16 rescaled to 0..255, split 80/20 per class with a fixed seed."
            ),
            features=tfds.features.FeaturesDict(
                {
                    # Raw uint8 tensors: PNG-encoding 1797 tiny images would double the build time.
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager
    ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        images, labels = load_digits_arrays()
        split_indices = digits_split_indices(labels)
        return {
            split: self._generate_examples(images, labels, indices)
            for split, indices in split_indices.items()
        }

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        for index in indices:
            # The key is the position in load_digits(), so every record traces back to its source.
            yield int(index), {"image": images[index], "label": int(labels[index])}


def _is_older_version(folder_name: str) -> bool:
    try:
        return tfds.core.Version(folder_name) < Digits.VERSION
    except ValueError:
        return False


def _build_options() -> dict[str, Any]:
    return {
        "file_format": DIGITS_FILE_FORMAT,
        "download_config": tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP
        ),
    }


def prepare_digits(data_dir: str | None) -> Digits:
    """Returns the digits builder for `data_dir`, building it there first if needed.

    A build of this version in another file format (e.g. TFRecord, written by hand with `tfds
    build`) is deleted and rebuilt as ArrayRecord, with a log message.
    """
    with no_stray_tfds_folders():
        return _prepare_digits(data_dir)


def _prepare_digits(data_dir: str | None) -> Digits:
    builder = Digits(data_dir=data_dir)
    if builder.is_prepared():
        formats = {f.value for f in builder.info.available_file_formats()}
        if DIGITS_FILE_FORMAT in formats:
            return builder
    # Processes of one multi-process run (or test workers) sharing a data_dir would otherwise
    # build it at the same time, and all but the first fail renaming their copy into place.
    with locks.exclusive(os.path.join(os.path.dirname(builder.data_dir), "prepare.lock")):
        builder = Digits(data_dir=data_dir)
        if builder.is_prepared():
            formats = {f.value for f in builder.info.available_file_formats()}
            if DIGITS_FILE_FORMAT in formats:
                return builder  # built by another process while this one waited
            logging.warning(
                "digits in %s is stored as %s, not %s (needed for random access): rebuilding it.",
                builder.data_path,
                ", ".join(sorted(formats)),
                DIGITS_FILE_FORMAT,
            )
            builder.data_path.rmtree()
            builder = Digits(data_dir=data_dir)
        else:
            folder = builder.data_path.parent
            older = [path.name for path in folder.glob("*") if _is_older_version(path.name)]
            if older:
                logging.info(
                    "Found digits %s in %s written by an earlier hscl_jax (TFRecord); building "
                    "version %s (ArrayRecord) next to it. The old folder can be deleted.",
                    ", ".join(sorted(older)),
                    folder,
                    Digits.VERSION,
                )
        builder.download_and_prepare(**_build_options())
    return builder
