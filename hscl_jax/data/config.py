"""The `config.data` sub-config: every field of the input pipeline, with its default; the fields it
no longer has; its check; and what it resolves to (the augmentation, the eval preprocessing)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import ml_collections
from ml_collections import config_dict

from hscl_jax.data import samplers
from hscl_jax.data.augment import eval_images
from hscl_jax.data.augment_params import (
    AUGMENTATION_FIELDS,
    AUGMENTATION_PRESETS,
    Augmentation,
    resolve_augmentation,
)
from hscl_jax.data.errors import DataError
from hscl_jax.data.info import DatasetInfo, dataset_info

# Fields config.data no longer has, and why. A config that still sets one (a config file, a
# --config.data.<field> flag) is refused with this reason; an old run's config.json drops it on
# load.
REMOVED_FIELDS = {
    "augment_on": "augmentation always runs in the train step, in JAX on the device",
}


def removed_field_message(field: str) -> str:
    """The one line a config that still sets the removed `config.data.<field>` gets."""
    return f"config.data.{field} was removed: {REMOVED_FIELDS[field]}; delete the setting."


def augmentation_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """The `augmentation` settings: a preset, and every op's switch and parameters.

    `preset` None (the default) takes the dataset's own (`DatasetInfo.augmentation_preset`:
    "digits" for grayscale data, "simclr" otherwise), so a config follows its dataset. Every op
    field is None, meaning the preset's value; set one to change only that op (e.g.
    `--config.data.augmentation.flip=False`).

    Presets (hscl_jax.data.augment_params.AUGMENTATION_PRESETS):
      simclr: the reference's SimCLR recipe (random resized crop 0.08-1, flip 0.5, colour jitter
        0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 with a kernel of 10% of
        the crop size and sigma in [0.1, 2]).
      digits: mild random resized crops (scale 0.6-1, ratio 0.8-1.25) only: no flip (it changes
        a digit's meaning) and no colour op (one channel).
      none: every op off (the image is only resized to the crop size and normalised).

    Fields (the ops run in the order below):
      preset: simclr | digits | none, whose values the op fields below default to; None takes
        the dataset's own.
      crop: random resized crop (torchvision semantics: area fraction `crop_scale`, aspect ratio
        `crop_ratio` log-uniform, 10 tries then a centre crop), bilinear resize to the crop size.
        When off, the whole image is resized to the crop size.
      crop_scale: (min, max) fraction of the image area kept by the crop.
      crop_ratio: (min, max) aspect ratio (width / height) of the crop.
      flip: horizontal flip with probability `flip_prob`.
      color_jitter: with probability `color_jitter_prob`, brightness, contrast, saturation and hue
        jitter in a random order (torchvision ColorJitter). Factors are drawn from
        [max(0, 1 - s), 1 + s] for brightness/contrast/saturation and [-hue, hue] for the hue
        shift; a strength of 0 switches that one op off. Saturation and hue need RGB images.
      grayscale: convert to 3-channel grayscale with probability `grayscale_prob` (RGB only).
      blur: Gaussian blur with probability `blur_prob`, kernel side int(blur_kernel_fraction *
        crop_size) made odd and at least 3, sigma uniform in `blur_sigma`, reflected borders.
    """
    if preset is not None and preset not in AUGMENTATION_PRESETS:
        raise DataError(
            f"Unknown augmentation preset {preset!r}; expected one of "
            f"{', '.join(AUGMENTATION_PRESETS)} (or None: the dataset's own)."
        )
    config = ml_collections.ConfigDict({"preset": config_dict.placeholder(str)})
    for field, field_type in AUGMENTATION_FIELDS.items():
        config[field] = config_dict.placeholder(field_type)
    config.preset = preset
    return config


def default_data_config(name: str = "digits") -> ml_collections.ConfigDict:
    """Default `config.data` for dataset `name` (see `hscl_jax.data.dataset_info`).

    Fields:
      name: a registered recipe ("digits", "cifar10", "cifar100", "stl10", "imagenet2012",
        "imagenette", "synthetic") or any TFDS image-classification dataset prepared (as
        ArrayRecord) in data_dir: one written by `python -m hscl_jax.data.prepare`, or a catalogue
        dataset written by `tfds build`. Its metadata (sizes, classes, statistics, augmentation
        preset) comes from the recipe table or the prepared files.
      data_dir: TFDS data directory, a local folder or a gs:// bucket. None means TFDS's default
        ($TFDS_DATA_DIR or ~/tensorflow_datasets). `digits` is built there on first use; every
        other dataset must already be prepared there: nothing is ever downloaded.
      sampler: "shuffle" (the reference: a fresh uniform permutation every epoch, last partial
        batch dropped) or "class_balanced" (each global batch holds P classes x K examples).
      samples_per_class: K of the class-balanced sampler (ignored by "shuffle").
      classes_per_batch: P of the class-balanced sampler; 0 means global_batch_size // K. P x K
        must equal the global batch size.
      seed: seed of the data order and of the augmentations; pass it as `train_iterator(seed=...)`.
        Batch n depends only on (seed, n, this config).
      augmentation: see `augmentation_config`; by default the dataset's own preset. It runs in
        the train step (hscl_jax.data.augment), on uint8 images the host ships with each view's
        random parameters.
      eval_image_size: side of the evaluation images; 0 keeps the stored size (the reference
        evaluates STL-10 at 96 px although it trains on 32 px crops), n resizes to n x n.
      num_workers: threads that read, decode and index batches, one batch each; 0 means one per
        CPU core.
      prefetch_batches: batches prepared ahead of the consumer; 0 means 2 x num_workers.
      decode_workers: Grain worker processes that read and decode this process's examples
        (hscl_jax.data.grain_source); 0 decodes in the threads above. Every stream (each
        evaluation too) starts its own workers, which takes seconds: worth it for large encoded
        images (JPEG/PNG), not for digits. Workers need absl flags parsed (train.py runs under
        absl.app).
    """
    return ml_collections.ConfigDict(
        {
            "name": name,
            "data_dir": config_dict.placeholder(str),
            "sampler": "shuffle",
            "samples_per_class": 32,
            "classes_per_batch": 0,
            "seed": 0,
            "augmentation": augmentation_config(),
            "eval_image_size": 0,
            "num_workers": 0,
            "prefetch_batches": 0,
            "decode_workers": 0,
        }
    )


def check_config(data_config: ml_collections.ConfigDict) -> DatasetInfo:
    """Checks a whole `config.data` (DataError, one line, on the first bad value) and returns
    its dataset's metadata. Reads the dataset's metadata, not its examples."""
    for field in REMOVED_FIELDS:
        if field in data_config:
            raise DataError(removed_field_message(field))
    info = dataset_info(data_config.name, data_config.get("data_dir"))
    if data_config.sampler not in samplers.SAMPLERS:
        raise DataError(
            f"Unknown sampler {data_config.sampler!r}; expected one of "
            f"{', '.join(samplers.SAMPLERS)}."
        )
    if data_config.eval_image_size < 0:
        raise DataError(
            f"eval_image_size must be 0 (stored size) or a size in pixels, got "
            f"{data_config.eval_image_size}."
        )
    for field in ("num_workers", "prefetch_batches", "decode_workers"):
        if data_config[field] < 0:
            raise DataError(
                f"{field} must be >= 0 (0: the default, see default_data_config), got "
                f"{data_config[field]}."
            )
    resolve_augmentation(data_config.augmentation, info)
    return info


def augmentation_for(data_config: ml_collections.ConfigDict) -> Augmentation:
    """The static augmentation `config.data` asks for, bound to its dataset (for
    `augment.augment_views`; the train step is built with it)."""
    info = dataset_info(data_config.name, data_config.get("data_dir"))
    return resolve_augmentation(data_config.augmentation, info)


def eval_preprocessing(data_config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
    """uint8 (..., b, H, W, C) eval images -> float32 normalised ones (resized to
    `eval_image_size` when set): `augment.eval_images` bound to `config.data`. Pure and
    jit-compiled; map it over devices as the encoder is."""
    info = dataset_info(data_config.name, data_config.get("data_dir"))
    return functools.partial(eval_images, info=info, image_size=data_config.eval_image_size)
