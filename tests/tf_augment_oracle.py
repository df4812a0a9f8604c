"""The TensorFlow oracle of the augmentation: every image op of `hscl_jax.data.augment`, written
again in TensorFlow (batched, channel-planar), for the tests that hold the JAX ops to it.

The ops work on channel-planar float32 images in [0, 1], shape (c, b, h, w), with per-image
scalars broadcast as (1, b, 1, 1), and express every linear step (crop + resize + flip, blur) as
small per-image matrices applied with batched matmuls. They take the parameters the package's
numpy sampler draws (`hscl_jax.data.augment_params.view_params`), so a given (seed, step, view,
position) must give the same view here and in JAX.
"""

from __future__ import annotations

import tensorflow as tf

from hscl_jax.data.augment_params import (
    BRIGHTNESS,
    CONTRAST,
    GRAY_WEIGHTS,
    HUE,
    SATURATION,
    Augmentation,
    reflect_shift_matrices,
)
from hscl_jax.data.info import DatasetInfo


def _per_image(values):
    return tf.reshape(tf.cast(values, tf.float32), (1, -1, 1, 1))


def _resize_matrices(start, length, out_size: int, in_size: int):
    """(b, out_size, in_size) rows that resample pixels [start, start + length) to out_size.

    PIL's bilinear filter, which torchvision's resized crop uses: output pixel i is centred at
    start + (i + 0.5) * length / out_size; a triangle of radius max(1, length / out_size) input
    pixels weighs the input pixels of the crop (antialiased when shrinking, clamped at the edges).
    """
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
    return values - 6.0 * tf.floor(values * (1.0 / 6.0))


def _shift_hue(planes, shift):
    """Rotates the HSV hue of every pixel by `shift` (fraction of a turn, per image).

    The shift keeps each pixel's max (value) and max - min (chroma), so the result is written
    straight from them: channel n = max - chroma * clip(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6
    with n = 5, 3, 1 for red, green, blue.
    """
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


def _blur(planes, kernels):
    """Separable per-image Gaussian blur with reflected borders: G @ plane @ G^T."""
    size = planes.shape[2]
    shifts = tf.constant(reflect_shift_matrices(size, kernels.shape[1]))
    blur = tf.einsum("bk,kij->bij", kernels, shifts)[None]
    return tf.matmul(tf.matmul(blur, planes), blur, transpose_b=True)


def augment_batch(images, params, aug: Augmentation):
    """uint8 (b, H, W, C) images -> float32 (b, crop, crop, C) normalised augmented views (TF)."""
    planes = _crop_resize_flip(images, params["boxes"], params["flip"], aug.crop_size)
    if aug.color_jitter_prob > 0:
        planes = _color_jitter(planes, params["jitter_factors"], params["jitter_order"], aug)
    if aug.grayscale_prob > 0:
        planes = tf.where(_per_image(params["grayscale"]) > 0, _gray(planes)[None], planes)
    if aug.blur_prob > 0:
        planes = _blur(planes, params["blur_kernels"])
    mean = tf.reshape(tf.constant(aug.mean, tf.float32), (-1, 1, 1, 1))
    std = tf.reshape(tf.constant(aug.std, tf.float32), (-1, 1, 1, 1))
    return tf.transpose((planes - mean) / std, (1, 2, 3, 0))


def eval_preprocess(images, info: DatasetInfo, image_size: int):
    """uint8 images -> float32 normalised, resized (antialiased) to image_size when it differs."""
    images = tf.cast(images, tf.float32) * (1.0 / 255.0)
    if image_size and image_size != images.shape[1]:
        images = tf.image.resize(images, (image_size, image_size), antialias=True)
        images = tf.clip_by_value(images, 0.0, 1.0)
    mean = tf.constant(info.mean, tf.float32)
    std = tf.constant(info.std, tf.float32)
    return (images - mean) / std
