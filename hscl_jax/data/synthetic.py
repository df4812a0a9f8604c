"""Random images and labels in numpy, for throughput runs on hosts without TensorFlow.

The "dataset" is a fixed pool of uint8 noise images with balanced labels (shaped by
`dataset_info("synthetic")`), read by index like a TFDS split, so it flows through the same
readers, batch layout and augmentation as any dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hscl_jax.data.errors import DataError
from hscl_jax.data.grain_source import Record
from hscl_jax.data.info import DatasetInfo

_POOL_SEED = 20_240_901


class SyntheticRecords(Sequence[Record]):
    """One split as a random-access sequence of {"image": uint8 (H, W, C), "label": int32}."""

    def __init__(self, info: DatasetInfo, split: str) -> None:
        if split not in (info.train_split, info.test_split):
            raise DataError(
                f"Unknown split {split!r} for {info.name}; expected {info.train_split!r} or "
                f"{info.test_split!r}."
            )
        is_train = split == info.train_split
        count = info.num_train if is_train else info.num_test
        rng = np.random.default_rng([_POOL_SEED, int(is_train)])
        shape = (count, info.image_size, info.image_size, info.channels)
        self.images = rng.integers(0, 256, size=shape, dtype=np.uint8)
        self.labels = rng.permutation(np.arange(count) % info.num_classes).astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    # Read by index only (Records): slices are not supported.
    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        return {"image": self.images[index], "label": self.labels[index]}
