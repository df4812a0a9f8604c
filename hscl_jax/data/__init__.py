"""Input pipelines and the augmentation.

Datasets are read by random access from TFDS ArrayRecord files (digits built offline; the paper
datasets, any TFDS image-classification dataset and your own images prepared with `python -m
hscl_jax.data.prepare`, from a data dir), or made in numpy (synthetic). Every training batch has
one layout, uint8 images plus both views' augmentation parameters; the train step turns it into
the two views with `augment_views` (JAX). See docs/data.md.

The names below load their module on first use: `python -m hscl_jax.data.prepare` and its worker
processes do not import JAX. Importing this package imports neither TensorFlow nor TFDS; only
reading a TFDS dataset imports TFDS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module of this package that defines it.
_EXPORTS = {
    "augment_views": "augment",
    "eval_images": "augment",
    "train_batch": "augment",
    "AUGMENTATION_PRESETS": "augment_params",
    "Augmentation": "augment_params",
    "view_params": "augment_params",
    "REMOVED_FIELDS": "config",
    "augmentation_config": "config",
    "augmentation_for": "config",
    "check_config": "config",
    "default_data_config": "config",
    "eval_preprocessing": "config",
    "removed_field_message": "config",
    "DataError": "errors",
    "DatasetFormatError": "errors",
    "DatasetNotPreparedError": "errors",
    "DATASET_NAMES": "info",
    "DatasetInfo": "info",
    "dataset_info": "info",
    "eval_iterator": "pipeline",
    "prefetch_to_device": "pipeline",
    "steps_per_epoch": "pipeline",
    "train_iterator": "pipeline",
    "SAMPLERS": "samplers",
    "clear_cache": "tfds_source",
}
# Written out, not computed, so that type checkers read it (equal to the keys of _EXPORTS).
__all__ = [
    "AUGMENTATION_PRESETS",
    "Augmentation",
    "DATASET_NAMES",
    "DataError",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "REMOVED_FIELDS",
    "SAMPLERS",
    "augment_views",
    "augmentation_config",
    "augmentation_for",
    "check_config",
    "clear_cache",
    "dataset_info",
    "default_data_config",
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

if TYPE_CHECKING:
    from hscl_jax.data.augment import augment_views as augment_views
    from hscl_jax.data.augment import eval_images as eval_images
    from hscl_jax.data.augment import train_batch as train_batch
    from hscl_jax.data.augment_params import AUGMENTATION_PRESETS as AUGMENTATION_PRESETS
    from hscl_jax.data.augment_params import Augmentation as Augmentation
    from hscl_jax.data.augment_params import view_params as view_params
    from hscl_jax.data.config import REMOVED_FIELDS as REMOVED_FIELDS
    from hscl_jax.data.config import augmentation_config as augmentation_config
    from hscl_jax.data.config import augmentation_for as augmentation_for
    from hscl_jax.data.config import check_config as check_config
    from hscl_jax.data.config import default_data_config as default_data_config
    from hscl_jax.data.config import eval_preprocessing as eval_preprocessing
    from hscl_jax.data.config import removed_field_message as removed_field_message
    from hscl_jax.data.errors import DataError as DataError
    from hscl_jax.data.errors import DatasetFormatError as DatasetFormatError
    from hscl_jax.data.errors import DatasetNotPreparedError as DatasetNotPreparedError
    from hscl_jax.data.info import DATASET_NAMES as DATASET_NAMES
    from hscl_jax.data.info import DatasetInfo as DatasetInfo
    from hscl_jax.data.info import dataset_info as dataset_info
    from hscl_jax.data.pipeline import eval_iterator as eval_iterator
    from hscl_jax.data.pipeline import prefetch_to_device as prefetch_to_device
    from hscl_jax.data.pipeline import steps_per_epoch as steps_per_epoch
    from hscl_jax.data.pipeline import train_iterator as train_iterator
    from hscl_jax.data.samplers import SAMPLERS as SAMPLERS
    from hscl_jax.data.tfds_source import clear_cache as clear_cache


def __getattr__(name: str) -> Any:
    """A public name (loading its module) or a module of this package."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
