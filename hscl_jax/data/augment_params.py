"""The augmentation's settings and its randomness, in numpy (no TensorFlow, no JAX).

`resolve_augmentation` turns `config.data.augmentation` (a preset plus per-op overrides) and the
dataset's metadata into an `Augmentation`: static, hashable settings that also fix the shape of
the images it takes and of the views it makes. The random parameters of every example (crop box,
flip, jitter factors and order, grayscale, blur kernel) are drawn here for a whole global batch
from a generator seeded by (seed, step, view) (`view_params`); the image ops
(`hscl_jax.data.augment`) are then a pure function of (images, parameters). So a view depends only
on (seed, step, view, example position): the stream restarts at any step, and the image ops need
no random state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from hscl_jax.data.errors import DataError
from hscl_jax.data.info import DatasetInfo
from hscl_jax.data.samplers import AUGMENT_STREAM

if TYPE_CHECKING:
    from ml_collections import ConfigDict

# torchvision's RandomResizedCrop tries this many (area, ratio) draws before a centre crop.
_CROP_ATTEMPTS = 10
# Colour-jitter op ids; SKIP marks "no op at this position" (jitter off for the image, or op off).
BRIGHTNESS, CONTRAST, SATURATION, HUE, SKIP = range(5)
# torchvision's luma weights (ITU-R 601-2), for grayscale, contrast and saturation.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

# Every op's settings, in the order the ops run, with their type (see `config.augmentation_config`
# for their meaning).
AUGMENTATION_FIELDS = {
    "crop": bool,
    "crop_scale": tuple,
    "crop_ratio": tuple,
    "flip": bool,
    "flip_prob": float,
    "color_jitter": bool,
    "color_jitter_prob": float,
    "brightness": float,
    "contrast": float,
    "saturation": float,
    "hue": float,
    "grayscale": bool,
    "grayscale_prob": float,
    "blur": bool,
    "blur_prob": float,
    "blur_kernel_fraction": float,
    "blur_sigma": tuple,
}
_SIMCLR = {
    "crop": True,
    "crop_scale": (0.08, 1.0),
    "crop_ratio": (3.0 / 4.0, 4.0 / 3.0),
    "flip": True,
    "flip_prob": 0.5,
    "color_jitter": True,
    "color_jitter_prob": 0.8,
    "brightness": 0.4,
    "contrast": 0.4,
    "saturation": 0.4,
    "hue": 0.1,
    "grayscale": True,
    "grayscale_prob": 0.2,
    "blur": True,
    "blur_prob": 0.5,
    "blur_kernel_fraction": 0.1,
    "blur_sigma": (0.1, 2.0),
}
_MILD_CROPS = {"crop_scale": (0.6, 1.0), "crop_ratio": (0.8, 1.25)}
_NO_OTHER_OPS = {"flip": False, "color_jitter": False, "grayscale": False, "blur": False}
# simclr: the reference's SimCLR recipe. digits: mild random resized crops only (no flip, which
# changes a digit's meaning; no colour op on one channel). none: every op off (the image is only
# resized to the crop size and normalised).
AUGMENTATION_PRESETS = {
    "simclr": _SIMCLR,
    "digits": {**_SIMCLR, **_MILD_CROPS, **_NO_OTHER_OPS},
    "none": {**_SIMCLR, **_MILD_CROPS, **_NO_OTHER_OPS, "crop": False},
}


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Validated augmentation settings bound to a dataset: what `augment.augment_views` does to
    uint8 images of `image_size` x `image_size` x `channels` to make normalised views of
    `crop_size` x `crop_size`. Static and hashable (a jit-compiled step is specialised to it)."""

    crop: bool
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    flip_prob: float
    color_jitter_prob: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale_prob: float
    blur_prob: float
    blur_kernel_size: int
    blur_sigma: tuple[float, float]
    image_size: int
    channels: int
    crop_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _pair(name: str, value: Iterable[float], low: float, high: float) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise DataError(
            f"augmentation.{name} must be (min, max) with {low} <= min <= max <= {high}, "
            f"got {value}."
        )
    return pair


def _probability(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise DataError(f"augmentation.{name} must be a probability in [0, 1], got {value}.")
    return float(value)


def _strength(name: str, value: float, high: float) -> float:
    if not 0.0 <= float(value) <= high:
        raise DataError(f"augmentation.{name} must be in [0, {high}], got {value}.")
    return float(value)


def blur_kernel_size(fraction: float, crop_size: int) -> int:
    """Kernel side int(fraction * crop_size), made odd and at least 3 (3 for 32 px crops)."""
    size = max(int(fraction * crop_size), 3)
    return size if size % 2 else size + 1


def augmentation_settings(
    config: ConfigDict | Mapping[str, Any], info: DatasetInfo
) -> dict[str, Any]:
    """The op settings `config` (an `augmentation` ConfigDict) asks for on `info`'s dataset: its
    preset's (None: the dataset's own, `DatasetInfo.augmentation_preset`) with every field that
    `config` sets (not None) in place of the preset's."""
    known = {"preset", *AUGMENTATION_FIELDS}
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise DataError(f"Unknown augmentation option(s) {unknown}; allowed: {sorted(known)}.")
    preset = config.get("preset") or info.augmentation_preset
    if preset not in AUGMENTATION_PRESETS:
        raise DataError(
            f"Unknown augmentation preset {preset!r}; expected one of "
            f"{', '.join(AUGMENTATION_PRESETS)} (or None: the dataset's own)."
        )
    settings = dict(AUGMENTATION_PRESETS[preset])
    settings.update({k: config[k] for k in AUGMENTATION_FIELDS if config.get(k) is not None})
    return settings


def resolve_augmentation(config: ConfigDict | Mapping[str, Any], info: DatasetInfo) -> Augmentation:
    """Validates an `augmentation` ConfigDict against a dataset and returns its `Augmentation`."""
    s = augmentation_settings(config, info)
    jitter = bool(s["color_jitter"])
    saturation = _strength("saturation", s["saturation"], math.inf) if jitter else 0.0
    hue = _strength("hue", s["hue"], 0.5) if jitter else 0.0
    grayscale_prob = _probability("grayscale_prob", s["grayscale_prob"]) if s["grayscale"] else 0.0
    if info.channels != 3 and (saturation > 0 or hue > 0 or grayscale_prob > 0):
        raise DataError(
            f"augmentation: saturation/hue jitter and random grayscale need RGB images, but "
            f"{info.name} has {info.channels} channel(s); set saturation=hue=0 and grayscale=False."
        )
    if s["blur"]:
        fraction = _strength("blur_kernel_fraction", s["blur_kernel_fraction"], 1.0)
        kernel_size = blur_kernel_size(fraction, info.crop_size)
    else:
        kernel_size = 1
    min_crop_pixels = 1.0 / info.image_size**2
    return Augmentation(
        crop=bool(s["crop"]),
        crop_scale=_pair("crop_scale", s["crop_scale"], min_crop_pixels, 1.0),
        crop_ratio=_pair("crop_ratio", s["crop_ratio"], 1e-3, 1e3),
        flip_prob=_probability("flip_prob", s["flip_prob"]) if s["flip"] else 0.0,
        color_jitter_prob=(
            _probability("color_jitter_prob", s["color_jitter_prob"]) if jitter else 0.0
        ),
        brightness=_strength("brightness", s["brightness"], 1.0) if jitter else 0.0,
        contrast=_strength("contrast", s["contrast"], 1.0) if jitter else 0.0,
        saturation=saturation,
        hue=hue,
        grayscale_prob=grayscale_prob,
        blur_prob=_probability("blur_prob", s["blur_prob"]) if s["blur"] else 0.0,
        blur_kernel_size=kernel_size,
        blur_sigma=_pair("blur_sigma", s["blur_sigma"], 1e-6, 1e3) if s["blur"] else (1.0, 1.0),
        image_size=info.image_size,
        channels=info.channels,
        crop_size=info.crop_size,
        mean=tuple(float(m) for m in info.mean),
        std=tuple(float(s) for s in info.std),
    )


def _crop_boxes(rng: np.random.Generator, batch_size: int, aug: Augmentation) -> np.ndarray:
    """(b, 4) crops [top, left, height, width] in whole pixels, torchvision's RandomResizedCrop.

    Per image: up to 10 draws of (area fraction, log aspect ratio) until the crop fits, else a
    centre crop of the whole image with its ratio clamped into `crop_ratio`. Off: the whole image.
    """
    side = aug.image_size
    if not aug.crop:
        return np.tile(np.array([0.0, 0.0, side, side], np.float32), (batch_size, 1))
    area = side * side
    target_area = area * rng.uniform(*aug.crop_scale, size=(batch_size, _CROP_ATTEMPTS))
    low_log_ratio, high_log_ratio = np.log(aug.crop_ratio)
    log_ratio = rng.uniform(low_log_ratio, high_log_ratio, size=(batch_size, _CROP_ATTEMPTS))
    aspect = np.exp(log_ratio)
    widths = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
    heights = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    valid = (widths > 0) & (widths <= side) & (heights > 0) & (heights <= side)
    first_valid = np.argmax(valid, axis=1)
    rows = np.arange(batch_size)
    any_valid = valid[rows, first_valid]
    low_ratio, high_ratio = aug.crop_ratio
    fallback_w, fallback_h = side, side
    if low_ratio > 1.0:
        fallback_h = int(round(side / low_ratio))
    elif high_ratio < 1.0:
        fallback_w = int(round(side * high_ratio))
    width = np.where(any_valid, widths[rows, first_valid], fallback_w)
    height = np.where(any_valid, heights[rows, first_valid], fallback_h)
    offsets = rng.uniform(size=(batch_size, 2))
    top = np.where(any_valid, np.floor(offsets[:, 0] * (side - height + 1)), (side - height) // 2)
    left = np.where(any_valid, np.floor(offsets[:, 1] * (side - width + 1)), (side - width) // 2)
    return np.stack([top, left, height, width], axis=1).astype(np.float32)


def _jitter_plan(
    rng: np.random.Generator, batch_size: int, aug: Augmentation
) -> tuple[np.ndarray, np.ndarray]:
    """Jitter factors (b, 4) [brightness, contrast, saturation, hue shift] and op order (b, 4)."""
    strengths = (aug.brightness, aug.contrast, aug.saturation)
    factors = [rng.uniform(max(0.0, 1.0 - s), 1.0 + s, size=batch_size) for s in strengths]
    factors.append(rng.uniform(-aug.hue, aug.hue, size=batch_size))
    order = np.argsort(rng.uniform(size=(batch_size, 4)), axis=1).astype(np.int32)
    applied = rng.uniform(size=batch_size) < aug.color_jitter_prob
    enabled = np.array([s > 0 for s in (*strengths, aug.hue)])
    order = np.where(applied[:, None] & enabled[order], order, SKIP).astype(np.int32)
    return np.stack(factors, axis=1).astype(np.float32), order


def _blur_kernels(rng: np.random.Generator, batch_size: int, aug: Augmentation) -> np.ndarray:
    """(b, k) normalised 1-D Gaussian kernels; a unit impulse for images left unblurred."""
    size = aug.blur_kernel_size
    sigma = rng.uniform(*aug.blur_sigma, size=(batch_size, 1))
    applied = rng.uniform(size=batch_size) < aug.blur_prob
    offsets = np.arange(size) - size // 2
    gaussian = np.exp(-(offsets**2) / (2.0 * sigma**2))
    gaussian /= gaussian.sum(axis=1, keepdims=True)
    impulse = (offsets == 0).astype(np.float64)
    return np.where(applied[:, None], gaussian, impulse).astype(np.float32)


def sample_params(
    rng: np.random.Generator, batch_size: int, aug: Augmentation
) -> dict[str, np.ndarray]:
    """Random parameters of one augmented view of `batch_size` images: "boxes" float32 (b, 4),
    "flip" bool (b,), "jitter_factors" float32 (b, 4), "jitter_order" int32 (b, 4), "grayscale"
    bool (b,), "blur_kernels" float32 (b, aug.blur_kernel_size).

    Every parameter is drawn for every image even when its op is off, so switching one op off
    does not change the randomness of the others.
    """
    boxes = _crop_boxes(rng, batch_size, aug)
    flip = rng.uniform(size=batch_size) < aug.flip_prob
    jitter_factors, jitter_order = _jitter_plan(rng, batch_size, aug)
    grayscale = rng.uniform(size=batch_size) < aug.grayscale_prob
    blur_kernels = _blur_kernels(rng, batch_size, aug)
    return {
        "boxes": boxes,
        "flip": flip,
        "jitter_factors": jitter_factors,
        "jitter_order": jitter_order,
        "grayscale": grayscale,
        "blur_kernels": blur_kernels,
    }


def view_params(
    seed: int, step: int, view: int, batch_size: int, aug: Augmentation
) -> dict[str, np.ndarray]:
    """`sample_params` of view `view` (0 or 1) of global batch `step`, seeded by (seed, step, view):
    the one place the augmentation randomness is seeded."""
    rng = np.random.default_rng([seed, AUGMENT_STREAM, step, view])
    return sample_params(rng, batch_size, aug)


def slice_params(params: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) of every parameter (this host's share of the global batch)."""
    return {key: value[start:stop] for key, value in params.items()}


def reflect_shift_matrices(size: int, kernel_size: int) -> np.ndarray:
    """(k, size, size): tap t reads pixel i + t - k//2, mirrored at the borders."""
    half = kernel_size // 2
    matrices = np.zeros((kernel_size, size, size), np.float32)
    for tap in range(kernel_size):
        source = np.arange(size) + tap - half
        source = np.abs(source)
        source = np.where(source > size - 1, 2 * (size - 1) - source, source)
        matrices[tap, np.arange(size), source] += 1.0
    return matrices
