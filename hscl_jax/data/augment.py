"""SimCLR-style augmentation, vectorised over a batch.

The random parameters of every example (crop box, flip, jitter factors and order, grayscale, blur
kernel) are drawn in numpy from a generator seeded by (seed, step, view) for the whole global batch
(`view_params`); the image ops then run as a pure function of (images, parameters), either here in
TensorFlow on the host (`augment_batch`) or in JAX on the accelerator (`device_augment`), which
shares these parameters, op ids and constants. So an augmented batch depends only on (seed, step,
view, example position), which makes the stream restartable, and the image ops need no random state.

numpy-only at import time; TensorFlow is imported inside the functions that build TF ops.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from hscl_jax.data.info import DatasetInfo
from hscl_jax.data.samplers import AUGMENT_STREAM

# torchvision's RandomResizedCrop tries this many (area, ratio) draws before a centre crop.
_CROP_ATTEMPTS = 10
# Colour-jitter op ids; SKIP marks "no op at this position" (jitter off for the image, or op off).
BRIGHTNESS, CONTRAST, SATURATION, HUE, SKIP = range(5)
# torchvision's luma weights (ITU-R 601-2), for grayscale, contrast and saturation.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Validated augmentation settings (see `config.augmentation_config` for their meaning)."""

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


def _pair(name: str, value, low: float, high: float) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not low <= pair[0] <= pair[1] <= high:
        raise ValueError(
            f"augmentation.{name} must be (min, max) with {low} <= min <= max <= {high}, "
            f"got {value}."
        )
    return pair


def _probability(name: str, value) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"augmentation.{name} must be a probability in [0, 1], got {value}.")
    return float(value)


def _strength(name: str, value, high: float) -> float:
    if not 0.0 <= float(value) <= high:
        raise ValueError(f"augmentation.{name} must be in [0, {high}], got {value}.")
    return float(value)


def blur_kernel_size(fraction: float, crop_size: int) -> int:
    """Kernel side int(fraction * crop_size), made odd and at least 3 (3 for 32 px crops)."""
    size = max(int(fraction * crop_size), 3)
    return size if size % 2 else size + 1


def resolve_augmentation(config, info: DatasetInfo) -> Augmentation:
    """Validates an `augmentation` ConfigDict against a dataset and returns plain settings."""
    known = {
        "preset",
        "crop",
        "crop_scale",
        "crop_ratio",
        "flip",
        "flip_prob",
        "color_jitter",
        "color_jitter_prob",
        "brightness",
        "contrast",
        "saturation",
        "hue",
        "grayscale",
        "grayscale_prob",
        "blur",
        "blur_prob",
        "blur_kernel_fraction",
        "blur_sigma",
    }
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise ValueError(f"Unknown augmentation option(s) {unknown}; allowed: {sorted(known)}.")
    jitter = bool(config.color_jitter)
    saturation = _strength("saturation", config.saturation, math.inf) if jitter else 0.0
    hue = _strength("hue", config.hue, 0.5) if jitter else 0.0
    grayscale_prob = (
        _probability("grayscale_prob", config.grayscale_prob) if config.grayscale else 0.0
    )
    if info.channels != 3 and (saturation > 0 or hue > 0 or grayscale_prob > 0):
        raise ValueError(
            f"augmentation: saturation/hue jitter and random grayscale need RGB images, but "
            f"{info.name} has {info.channels} channel(s); set saturation=hue=0 and grayscale=False."
        )
    if config.blur:
        fraction = _strength("blur_kernel_fraction", config.blur_kernel_fraction, 1.0)
        kernel_size = blur_kernel_size(fraction, info.crop_size)
    else:
        kernel_size = 1
    min_crop_pixels = 1.0 / info.image_size**2
    return Augmentation(
        crop=bool(config.crop),
        crop_scale=_pair("crop_scale", config.crop_scale, min_crop_pixels, 1.0),
        crop_ratio=_pair("crop_ratio", config.crop_ratio, 1e-3, 1e3),
        flip_prob=_probability("flip_prob", config.flip_prob) if config.flip else 0.0,
        color_jitter_prob=(
            _probability("color_jitter_prob", config.color_jitter_prob) if jitter else 0.0
        ),
        brightness=_strength("brightness", config.brightness, 1.0) if jitter else 0.0,
        contrast=_strength("contrast", config.contrast, 1.0) if jitter else 0.0,
        saturation=saturation,
        hue=hue,
        grayscale_prob=grayscale_prob,
        blur_prob=_probability("blur_prob", config.blur_prob) if config.blur else 0.0,
        blur_kernel_size=kernel_size,
        blur_sigma=_pair("blur_sigma", config.blur_sigma, 1e-6, 1e3) if config.blur else (1, 1),
    )


def _crop_boxes(
    rng: np.random.Generator, batch_size: int, image_size: int, aug: Augmentation
) -> np.ndarray:
    """(b, 4) crops [top, left, height, width] in whole pixels, torchvision's RandomResizedCrop.

    Per image: up to 10 draws of (area fraction, log aspect ratio) until the crop fits, else a
    centre crop of the whole image with its ratio clamped into `crop_ratio`. Off: the whole image.
    """
    side = image_size
    if not aug.crop:
        return np.tile(np.array([0.0, 0.0, side, side], np.float32), (batch_size, 1))
    area = side * side
    target_area = area * rng.uniform(*aug.crop_scale, size=(batch_size, _CROP_ATTEMPTS))
    log_ratio = rng.uniform(*np.log(aug.crop_ratio), size=(batch_size, _CROP_ATTEMPTS))
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
    rng: np.random.Generator, batch_size: int, image_size: int, aug: Augmentation
) -> dict[str, np.ndarray]:
    """Random parameters of one augmented view of `batch_size` images (numpy, no TF).

    Every parameter is drawn for every image even when its op is off, so switching one op off
    does not change the randomness of the others.
    """
    boxes = _crop_boxes(rng, batch_size, image_size, aug)
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
    seed: int, step: int, view: int, batch_size: int, image_size: int, aug: Augmentation
) -> dict[str, np.ndarray]:
    """`sample_params` of view `view` (0 or 1) of global batch `step`, seeded by (seed, step, view).

    The one place the augmentation randomness is seeded: the host and the device paths both take
    their parameters from here, so a given (seed, step, view, position) gets the same view on both.
    """
    rng = np.random.default_rng([seed, AUGMENT_STREAM, step, view])
    return sample_params(rng, batch_size, image_size, aug)


def slice_params(params: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) of every parameter (this host's share of the global batch)."""
    return {key: value[start:stop] for key, value in params.items()}


# ---------------------------------------------------------------------------------------------
# TensorFlow ops. They work on channel-planar float32 images in [0, 1], shape (c, b, h, w), with
# per-image scalars broadcast as (1, b, 1, 1), and express every linear step (crop + resize + flip,
# blur) as small per-image matrices applied with batched matmuls. On CPU this is several times
# faster than TF's NHWC kernels (rgb_to_hsv alone costs more than this whole colour jitter).


def _per_image(values):
    import tensorflow as tf

    return tf.reshape(tf.cast(values, tf.float32), (1, -1, 1, 1))


def _resize_matrices(start, length, out_size: int, in_size: int):
    """(b, out_size, in_size) rows that resample pixels [start, start + length) to out_size.

    PIL's bilinear filter, which torchvision's resized crop uses: output pixel i is centred at
    start + (i + 0.5) * length / out_size; a triangle of radius max(1, length / out_size) input
    pixels weighs the input pixels of the crop (antialiased when shrinking, clamped at the edges).
    """
    import tensorflow as tf

    scale = (length / out_size)[:, None, None]
    support = tf.maximum(scale, 1.0)
    centres = (
        start[:, None, None] + (tf.range(out_size, dtype=tf.float32)[None, :, None] + 0.5) * scale
    )
    pixels = tf.range(in_size, dtype=tf.float32)[None, None, :] + 0.5
    weights = tf.nn.relu(1.0 - tf.abs(pixels - centres) / support)
    inside = (pixels > start[:, None, None]) & (pixels < (start + length)[:, None, None])
    weights = tf.where(inside, weights, 0.0)
    return weights / tf.reduce_sum(weights, axis=2, keepdims=True)


def _crop_resize_flip(images, boxes, flip, crop_size: int):
    """uint8 (b, H, W, C) -> planes (C, b, crop, crop) in [0, 1]: R_y @ image @ R_x^T per plane."""
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    rows = _resize_matrices(boxes[:, 0], boxes[:, 2], crop_size, height) * (1.0 / 255.0)
    columns = _resize_matrices(boxes[:, 1], boxes[:, 3], crop_size, width)
    # A horizontal flip reverses the order of the output columns.
    columns = tf.where(tf.reshape(flip, (-1, 1, 1)), tf.reverse(columns, axis=[1]), columns)
    planes = tf.cast(tf.transpose(images, (3, 0, 1, 2)), tf.float32)
    planes = tf.matmul(rows[None], planes)
    return tf.matmul(planes, columns[None], transpose_b=True)


def _gray(planes):
    """Luma (b, h, w) with torchvision's weights; the plane itself for one-channel images."""
    if planes.shape[0] == 1:
        return planes[0]
    red, green, blue = planes[0], planes[1], planes[2]
    return GRAY_WEIGHTS[0] * red + GRAY_WEIGHTS[1] * green + GRAY_WEIGHTS[2] * blue


def _mod6(values):
    """values mod 6 in [0, 6); tf.math.floormod is ~15x slower than this on CPU."""
    import tensorflow as tf

    return values - 6.0 * tf.floor(values * (1.0 / 6.0))


def _shift_hue(planes, shift):
    """Rotates the HSV hue of every pixel by `shift` (fraction of a turn, per image).

    The shift keeps each pixel's max (value) and max - min (chroma), so the result is written
    straight from them: channel n = max - chroma * clip(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6
    with n = 5, 3, 1 for red, green, blue.
    """
    import tensorflow as tf

    red, green, blue = planes[0], planes[1], planes[2]
    value = tf.maximum(tf.maximum(red, green), blue)
    chroma = value - tf.minimum(tf.minimum(red, green), blue)
    safe_chroma = tf.where(chroma > 0, chroma, 1.0)
    # Hue in sextants [0, 6): which channel is the max decides the formula.
    hue = tf.where(
        value == red,
        (green - blue) / safe_chroma,
        tf.where(
            value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0
        ),
    )
    hue = _mod6(hue + 6.0 * shift[0])
    channels = []
    for sextant in (5.0, 3.0, 1.0):
        k = _mod6(sextant + hue)
        channels.append(value - chroma * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0))
    return tf.stack(channels)


def _color_jitter(planes, factors, order, aug: Augmentation):
    """Brightness, contrast, saturation and hue jitter, each image in its own random order.

    At each of the four slots an image runs exactly one op (or none). The three blends
    x -> clip(f x + (1 - f) y) differ only in y (0, the mean luma, the luma image), so one blend
    per slot serves them all; the hue shift runs with shift 0 (identity) for the other images.
    """
    import tensorflow as tf

    for slot in range(4):
        op_ids = order[:, slot]
        factor = tf.ones_like(factors[:, 0])
        for op in (BRIGHTNESS, CONTRAST, SATURATION):
            factor = tf.where(op_ids == op, factors[:, op], factor)
        if aug.contrast > 0 or aug.saturation > 0:
            gray = _gray(planes)[None]
            mean_gray = tf.reduce_mean(gray, axis=(2, 3), keepdims=True)
            target = (
                _per_image(op_ids == SATURATION) * gray + _per_image(op_ids == CONTRAST) * mean_gray
            )
        else:
            target = 0.0
        factor = _per_image(factor)
        planes = tf.clip_by_value(factor * planes + (1.0 - factor) * target, 0.0, 1.0)
        if aug.hue > 0:
            shift = _per_image(tf.where(op_ids == HUE, factors[:, HUE], 0.0))
            planes = _shift_hue(planes, shift)
    return planes


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


def _blur(planes, kernels):
    """Separable per-image Gaussian blur with reflected borders: G @ plane @ G^T."""
    import tensorflow as tf

    size = planes.shape[2]
    shifts = tf.constant(reflect_shift_matrices(size, kernels.shape[1]))
    blur = tf.einsum("bk,kij->bij", kernels, shifts)[None]
    return tf.matmul(tf.matmul(blur, planes), blur, transpose_b=True)


def augment_batch(images, params, aug: Augmentation, info: DatasetInfo):
    """uint8 (b, H, W, C) images -> float32 (b, crop, crop, C) normalised augmented views (TF)."""
    import tensorflow as tf

    planes = _crop_resize_flip(images, params["boxes"], params["flip"], info.crop_size)
    if aug.color_jitter_prob > 0:
        planes = _color_jitter(planes, params["jitter_factors"], params["jitter_order"], aug)
    if aug.grayscale_prob > 0:
        planes = tf.where(_per_image(params["grayscale"]) > 0, _gray(planes)[None], planes)
    if aug.blur_prob > 0:
        planes = _blur(planes, params["blur_kernels"])
    mean = tf.reshape(tf.constant(info.mean, tf.float32), (-1, 1, 1, 1))
    std = tf.reshape(tf.constant(info.std, tf.float32), (-1, 1, 1, 1))
    return tf.transpose((planes - mean) / std, (1, 2, 3, 0))


def eval_preprocess(images, info: DatasetInfo, image_size: int):
    """uint8 images -> float32 normalised, resized (antialiased) to image_size when it differs."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32) * (1.0 / 255.0)
    if image_size and image_size != images.shape[1]:
        images = tf.image.resize(images, (image_size, image_size), antialias=True)
        images = tf.clip_by_value(images, 0.0, 1.0)
    mean = tf.constant(info.mean, tf.float32)
    std = tf.constant(info.std, tf.float32)
    return (images - mean) / std
