"""The `config.data` sub-config: every field of the input pipeline, with its default."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from hscl_jax.data.info import dataset_info

AUGMENTATION_PRESETS = ("simclr", "digits", "none")
AUGMENT_ON = ("host", "device")
# "device" on CPU too: per core, the JAX augmentation makes 2.8x (digits), 2.5x (CIFAR SimCLR) and
# 1.4x (224 px SimCLR) the pairs/s of the TF one (`python bench/pipeline.py --augment`, 2-core
# CPU, 08:29 UTC 2026-12-01: 112,251 vs 40,420; 6,083 vs 2,443; 54.7 vs 39.0), and on CPU the
# augmentation shares the cores with the step either way. End to end, `python train.py
# --config=configs/default.py --config.data.augment_on=X` on the shared 2-core machine (09:47 UTC,
# back to back): device 62.1 s wall, knn_top1 0.978; host 67.8 s, 0.975. Quiet machine, 2026-12-02
# (a run no longer imports TensorFlow unless it augments on the host): device 41.0 s, host 48.5 s.
DEFAULT_AUGMENT_ON = "device"


def check_augment_on(value) -> str:
    """`value` if it is a known `augment_on` setting; else one line naming it and the choices."""
    if value not in AUGMENT_ON:
        raise ValueError(
            f"Unknown data.augment_on {value!r}; expected one of {', '.join(AUGMENT_ON)}."
        )
    return value


def augmentation_config(preset: str = "simclr") -> ml_collections.ConfigDict:
    """Augmentation settings of one preset; every op has an on/off switch and its parameters.

    Presets:
      simclr: the reference's SimCLR recipe (random resized crop 0.08-1, flip 0.5, colour jitter
        0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 with a kernel of 10% of
        the crop size and sigma in [0.1, 2]).
      digits: for 8x8 grayscale digits: mild random resized crops (small zooms and shifts) only; no
        flip (it changes a digit's meaning) and no colour op (one channel).
      none: every op off (the image is only resized to the crop size and normalised).

    Fields (the order below is the order the ops run in):
      preset: name of the preset the values came from (informational).
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
    if preset not in AUGMENTATION_PRESETS:
        raise ValueError(
            f"Unknown augmentation preset {preset!r}; expected one of "
            f"{', '.join(AUGMENTATION_PRESETS)}."
        )
    simclr = preset == "simclr"
    return ml_collections.ConfigDict(
        {
            "preset": preset,
            "crop": preset != "none",
            "crop_scale": (0.08, 1.0) if simclr else (0.6, 1.0),
            "crop_ratio": (3.0 / 4.0, 4.0 / 3.0) if simclr else (0.8, 1.25),
            "flip": simclr,
            "flip_prob": 0.5,
            "color_jitter": simclr,
            "color_jitter_prob": 0.8,
            "brightness": 0.4,
            "contrast": 0.4,
            "saturation": 0.4,
            "hue": 0.1,
            "grayscale": simclr,
            "grayscale_prob": 0.2,
            "blur": simclr,
            "blur_prob": 0.5,
            "blur_kernel_fraction": 0.1,
            "blur_sigma": (0.1, 2.0),
        }
    )


def default_data_config(name: str = "digits") -> ml_collections.ConfigDict:
    """Default `config.data` for `name`: "digits", "cifar10", "cifar100", "stl10" or "synthetic".

    Fields:
      name: dataset name (see `hscl_jax.data.dataset_info`).
      data_dir: TFDS data directory, a local folder or a gs:// bucket. None means TFDS's default
        ($TFDS_DATA_DIR or ~/tensorflow_datasets). `digits` is built there on first use; the paper
        datasets must already be prepared there (`tfds build cifar10 --data_dir=...`): nothing is
        ever downloaded.
      sampler: "shuffle" (the reference: a fresh uniform permutation every epoch, last partial
        batch dropped) or "class_balanced" (each global batch holds P classes x K examples).
      samples_per_class: K of the class-balanced sampler (ignored by "shuffle").
      classes_per_batch: P of the class-balanced sampler; 0 means global_batch_size // K. P x K
        must equal the global batch size.
      seed: seed of the data order and of the augmentations; pass it as `train_iterator(seed=...)`.
        Batch n depends only on (seed, n, this config).
      augmentation: see `augmentation_config`; preset "digits" for digits, "simclr" otherwise.
      eval_image_size: side of the evaluation images; 0 keeps the stored size (the reference
        evaluates STL-10 at 96 px although it trains on 32 px crops), n resizes to n x n.
      num_workers: threads that run the augmentation graph, one batch each (TensorFlow releases
        the GIL, so they run in parallel); 0 means one per CPU core.
      prefetch_batches: batches prepared ahead of the consumer; 0 means 2 x num_workers.
      decode_workers: Grain worker processes that read and decode this process's examples
        (hscl_jax.data.grain_source); 0 decodes in the augmentation threads. Every stream (each
        evaluation too) starts its own workers, which takes seconds: worth it for large encoded
        images (JPEG/PNG), not for digits. Workers need absl flags parsed (train.py runs under
        absl.app).
      augment_on: where the augmentation (and eval preprocessing) runs. "host": in TensorFlow on
        the host CPU, shipping float32 views. "device": in JAX inside the pmapped train step
        (hscl_jax.data.device_augment); the host ships uint8 images plus the per-example
        augmentation parameters and needs no TensorFlow for it. Both give the same views (within
        float32 rounding) for the same seed. Default "device" on every platform: accelerators
        because the host CPU cannot keep up, and CPU too, by measurement (see DEFAULT_AUGMENT_ON).
        "synthetic" has no augmentation and ignores it.
    """
    info = dataset_info(name)
    return ml_collections.ConfigDict(
        {
            "name": name,
            "data_dir": config_dict.placeholder(str),
            "sampler": "shuffle",
            "samples_per_class": 32,
            "classes_per_batch": 0,
            "seed": 0,
            "augmentation": augmentation_config("digits" if info.grayscale else "simclr"),
            "eval_image_size": 0,
            "num_workers": 0,
            "prefetch_batches": 0,
            "decode_workers": 0,
            "augment_on": DEFAULT_AUGMENT_ON,
        }
    )
