"""Input pipelines and the augmentation.

Datasets are read by random access from TFDS ArrayRecord files (digits built offline; the paper
datasets, any TFDS image-classification dataset and your own images prepared with `python -m
hscl_jax.data.prepare`, from a data dir), or made in numpy (synthetic). Every training batch has
one layout, uint8 images plus both views' augmentation parameters; the train step turns it into
the two views with `augment_views` (JAX). See docs/data.md.

Importing this package imports neither TensorFlow nor TFDS; only reading a TFDS dataset imports
TFDS.
"""

from hscl_jax.data.augment import augment_views, eval_images, train_batch
from hscl_jax.data.augment_params import (
    AUGMENTATION_PRESETS,
    Augmentation,
    view_params,
)
from hscl_jax.data.config import (
    REMOVED_FIELDS,
    augmentation_config,
    augmentation_for,
    check_config,
    default_data_config,
    eval_preprocessing,
    removed_field_message,
)
from hscl_jax.data.errors import DataError, DatasetFormatError, DatasetNotPreparedError
from hscl_jax.data.info import DATASET_NAMES, DatasetInfo, dataset_info
from hscl_jax.data.pipeline import (
    eval_iterator,
    prefetch_to_device,
    steps_per_epoch,
    train_iterator,
)
from hscl_jax.data.samplers import SAMPLERS
from hscl_jax.data.tfds_source import clear_cache

__all__ = [
    "AUGMENTATION_PRESETS",
    "DATASET_NAMES",
    "REMOVED_FIELDS",
    "SAMPLERS",
    "Augmentation",
    "DataError",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "augment_views",
    "augmentation_config",
    "augmentation_for",
    "check_config",
    "clear_cache",
    "default_data_config",
    "dataset_info",
    "eval_images",
    "eval_iterator",
    "eval_preprocessing",
    "prefetch_to_device",
    "removed_field_message",
    "steps_per_epoch",
    "train_batch",
    "train_iterator",
    "view_params",
]
