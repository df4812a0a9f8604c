"""Random images and labels in numpy, for throughput runs on hosts without TensorFlow.

The "dataset" is a fixed pool of uint8 noise images with balanced labels (shaped by
`dataset_info("synthetic")`), already normalised to float32 once, so that serving a batch costs a
gather and a flip. View 2 is view 1 flipped horizontally: the views differ at no extra cost.
"""

from __future__ import annotations

import numpy as np

from hscl_jax.data.info import DatasetInfo

_POOL_SEED = 20_240_901


def synthetic_split(info: DatasetInfo, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalised float32 images (n, H, W, C) and balanced int32 labels (n,) of one split."""
    if split not in (info.train_split, info.test_split):
        raise ValueError(
            f"Unknown split {split!r} for {info.name}; expected {info.train_split!r} or "
            f"{info.test_split!r}."
        )
    is_train = split == info.train_split
    count = info.num_train if is_train else info.num_test
    rng = np.random.default_rng([_POOL_SEED, int(is_train)])
    shape = (count, info.image_size, info.image_size, info.channels)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    mean = np.asarray(info.mean, np.float32)
    std = np.asarray(info.std, np.float32)
    images = (pixels.astype(np.float32) / 255.0 - mean) / std
    labels = rng.permutation(np.arange(count) % info.num_classes).astype(np.int32)
    return images, labels


def synthetic_pair(images: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(view1, view2) of the pool images at `indices`: the image and its mirror image."""
    view1 = images[indices]
    return view1, np.ascontiguousarray(view1[:, :, ::-1])
