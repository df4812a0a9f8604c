"""Input pipelines: TFDS datasets read by random access from ArrayRecord files (digits built
offline; CIFAR-10/100, STL-10 from a data dir), SimCLR augmented pairs, label-aware batch
samplers, and a TensorFlow-free synthetic source.

Importing this package does not import TensorFlow; only reading a TFDS dataset does.
"""

from hscl_jax.data.config import AUGMENTATION_PRESETS, augmentation_config, default_data_config
from hscl_jax.data.info import DATASET_NAMES, DatasetInfo, dataset_info
from hscl_jax.data.pipeline import (
    eval_iterator,
    prefetch_to_device,
    steps_per_epoch,
    train_iterator,
)
from hscl_jax.data.samplers import SAMPLERS
from hscl_jax.data.tfds_source import DatasetFormatError, DatasetNotPreparedError, clear_cache

__all__ = [
    "AUGMENTATION_PRESETS",
    "DATASET_NAMES",
    "SAMPLERS",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "augmentation_config",
    "clear_cache",
    "dataset_info",
    "default_data_config",
    "eval_iterator",
    "prefetch_to_device",
    "steps_per_epoch",
    "train_iterator",
]
