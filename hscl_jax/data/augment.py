"""The image ops: SimCLR augmentation and evaluation preprocessing, in JAX, run on the device.

Every training batch has one layout, whatever its source:
    {"image": uint8 (..., b, H, W, C) at the stored size (both views of an image crop from it),
     "view1_params": {...}, "view2_params": {...}, "label": int32 (..., b)}
where each view's parameters are the rows of `augment_params.view_params(seed, step, view, ...)`
for the batch's examples: "boxes" float32 (b, 4), "flip" bool (b,), "jitter_factors" float32
(b, 4), "jitter_order" int32 (b, 4), "grayscale" bool (b,), "blur_kernels" float32 (b, k). The
train step's first statement, `augment_views(batch, augmentation)`, turns it into the two float32
views (b, crop, crop, C), normalised; evaluation batches hold uint8 images that `eval_images`
turns into float32 ones. So the host only reads, decodes and indexes; images stay uint8 until
they are on the device.

Every op is written per image and vmapped over the batch; every linear step (crop + resize +
flip, blur, eval resize) is a pair of small matmuls, so XLA runs them on the matrix units. The
matmuls ask for full float32 precision: the default on recent GPUs/TPUs rounds inputs to
tf32/bf16, ~1e-3 relative, a quarter of a grey level. tests/tf_augment_oracle.py writes the same
ops in TensorFlow, and the tests hold these to it.

To add an op: draw its parameters in `augment_params.sample_params` (and give it a switch and a
preset value in `augment_params.AUGMENTATION_FIELDS` / `AUGMENTATION_PRESETS`), apply it in
`_augment_image` here, and write it in the oracle too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from hscl_jax.data.augment_params import (
    BRIGHTNESS,
    CONTRAST,
    GRAY_WEIGHTS,
    HUE,
    SATURATION,
    Augmentation,
    reflect_shift_matrices,
    view_params,
)
from hscl_jax.data.errors import DataError
from hscl_jax.data.info import DatasetInfo

_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


class TrainBatch(TypedDict):
    """The training-batch layout (above), on the host: numpy arrays with any leading axes."""

    image: np.ndarray
    view1_params: dict[str, np.ndarray]
    view2_params: dict[str, np.ndarray]
    label: np.ndarray


def _resize_matrix(
    start: jax.Array | float, length: jax.Array | float, out_size: int, in_size: int
) -> jax.Array:
    """(out_size, in_size) rows resampling pixels [start, start + length) to out_size pixels.

    PIL's bilinear filter, which torchvision's resized crop uses: output pixel i is centred at
    start + (i + 0.5) * length / out_size; a triangle of radius max(1, length / out_size) input
    pixels weighs the input pixels of the crop (antialiased when shrinking, clamped at the edges).
    """
    scale = length / out_size
    support = jnp.maximum(scale, 1.0)
    centres = start + (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * scale
    pixels = jnp.arange(in_size, dtype=jnp.float32)[None, :] + 0.5
    weights = jnp.maximum(1.0 - jnp.abs(pixels - centres) / support, 0.0)
    inside = (pixels > start) & (pixels < start + length)
    weights = jnp.where(inside, weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _crop_resize_flip(
    image: jax.Array, box: jax.Array, flip: jax.Array, crop_size: int
) -> jax.Array:
    """uint8 (H, W, C) -> planes (C, crop, crop) in [0, 1]: R_y @ plane @ R_x^T per plane."""
    height, width = image.shape[0], image.shape[1]
    rows = _resize_matrix(box[0], box[2], crop_size, height) * (1.0 / 255.0)
    columns = _resize_matrix(box[1], box[3], crop_size, width)
    # A horizontal flip reverses the order of the output columns.
    columns = jnp.where(flip, columns[::-1], columns)
    planes = jnp.transpose(image, (2, 0, 1)).astype(jnp.float32)
    return _matmul(_matmul(rows, planes), columns.T)


def _gray(planes: jax.Array) -> jax.Array:
    """Luma (h, w) with torchvision's weights; the plane itself for one-channel images."""
    if planes.shape[0] == 1:
        return planes[0]
    red, green, blue = planes[0], planes[1], planes[2]
    return GRAY_WEIGHTS[0] * red + GRAY_WEIGHTS[1] * green + GRAY_WEIGHTS[2] * blue


def _mod6(values: jax.Array) -> jax.Array:
    return values - 6.0 * jnp.floor(values * (1.0 / 6.0))


def _shift_hue(planes: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotates the HSV hue of every pixel by `shift` (a fraction of a turn).

    The shift keeps each pixel's max (value) and max - min (chroma), so the result is written
    straight from them: channel n = max - chroma * clip(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6
    with n = 5, 3, 1 for red, green, blue.
    """
    red, green, blue = planes[0], planes[1], planes[2]
    value = jnp.maximum(jnp.maximum(red, green), blue)
    chroma = value - jnp.minimum(jnp.minimum(red, green), blue)
    safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
    # Hue in sextants [0, 6): which channel is the max decides the formula.
    hue = jnp.where(
        value == red,
        (green - blue) / safe_chroma,
        jnp.where(
            value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0
        ),
    )
    hue = _mod6(hue + 6.0 * shift)
    channels = []
    for sextant in (5.0, 3.0, 1.0):
        k = _mod6(sextant + hue)
        channels.append(value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.stack(channels)


def _color_jitter(
    planes: jax.Array, factors: jax.Array, order: jax.Array, aug: Augmentation
) -> jax.Array:
    """Brightness, contrast, saturation and hue jitter in the image's own random order.

    At each of the four slots the image runs exactly one op (or none). The three blends
    x -> clip(f x + (1 - f) y) differ only in y (0, the mean luma, the luma image), so one blend
    per slot serves them all; the hue shift runs with shift 0 (identity) for the other ops.
    """
    for slot in range(4):
        op_id = order[slot]
        factor = jnp.float32(1.0)
        for op in (BRIGHTNESS, CONTRAST, SATURATION):
            factor = jnp.where(op_id == op, factors[op], factor)
        target: jax.Array | float
        if aug.contrast > 0 or aug.saturation > 0:
            gray = _gray(planes)[None]
            mean_gray = jnp.mean(gray, axis=(1, 2), keepdims=True)
            saturation = (op_id == SATURATION).astype(jnp.float32)
            contrast = (op_id == CONTRAST).astype(jnp.float32)
            target = saturation * gray + contrast * mean_gray
        else:
            target = 0.0
        planes = jnp.clip(factor * planes + (1.0 - factor) * target, 0.0, 1.0)
        if aug.hue > 0:
            planes = _shift_hue(planes, jnp.where(op_id == HUE, factors[HUE], 0.0))
        # Materialise each slot: fused across slots, XLA recomputes every earlier slot once per
        # use (each hue channel reads all three inputs), 3^4 times the work.
        planes = jax.lax.optimization_barrier(planes)
    return planes


def _blur(planes: jax.Array, kernel: jax.Array) -> jax.Array:
    """Separable Gaussian blur with reflected borders: G @ plane @ G^T."""
    shifts = reflect_shift_matrices(planes.shape[1], kernel.shape[0])
    blur = jnp.einsum("k,kij->ij", kernel, shifts, precision=jax.lax.Precision.HIGHEST)
    return _matmul(_matmul(blur, planes), blur.T)


def _normalise(planes: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Planes (C, h, w) in [0, 1] -> (h, w, C) normalised with the dataset's mean and std."""
    mean_planes = jnp.asarray(mean, jnp.float32)[:, None, None]
    std_planes = jnp.asarray(std, jnp.float32)[:, None, None]
    return jnp.transpose((planes - mean_planes) / std_planes, (1, 2, 0))


def _augment_image(
    image: jax.Array, params: Mapping[str, jax.Array], aug: Augmentation
) -> jax.Array:
    planes = _crop_resize_flip(image, params["boxes"], params["flip"], aug.crop_size)
    if aug.color_jitter_prob > 0:
        planes = _color_jitter(planes, params["jitter_factors"], params["jitter_order"], aug)
    if aug.grayscale_prob > 0:
        planes = jnp.where(params["grayscale"], _gray(planes)[None], planes)
    if aug.blur_prob > 0:
        planes = _blur(planes, params["blur_kernels"])
    return _normalise(planes, aug.mean, aug.std)


@functools.partial(jax.jit, static_argnames=("aug",))
def _augment_flat(
    images: jax.Array, params: Mapping[str, jax.Array], aug: Augmentation
) -> jax.Array:
    return jax.vmap(functools.partial(_augment_image, aug=aug))(images, params)


def _check_images(
    images: jax.Array | np.ndarray, image_size: int, channels: int, what: str
) -> tuple[int, ...]:
    """The leading (batch) axes of uint8 images (..., image_size, image_size, channels)."""
    stored = (image_size, image_size, channels)
    if images.dtype != jnp.uint8 or images.ndim < 4 or tuple(images.shape[-3:]) != stored:
        shape = ", ".join(map(str, stored))
        raise DataError(
            f"{what} takes uint8 images of shape (..., batch, {shape}) (the stored size), got "
            f"{images.dtype} {tuple(images.shape)}."
        )
    return tuple(images.shape[:-3])


# Trailing shape of each view parameter (k: the blur kernel's side).
_PARAM_SHAPES = {
    "boxes": (4,),
    "flip": (),
    "jitter_factors": (4,),
    "jitter_order": (4,),
    "grayscale": (),
    "blur_kernels": ("k",),
}


def _flat_params(
    params: Mapping[str, jax.typing.ArrayLike], leading: tuple[int, ...], kernel_size: int
) -> dict[str, jax.Array]:
    expected = {
        key: (*leading, *(kernel_size if d == "k" else d for d in shape))
        for key, shape in _PARAM_SHAPES.items()
    }
    got = {key: tuple(np.shape(value)) for key, value in params.items()}
    if got != expected:
        raise DataError(
            f"augmentation parameters must be augment_params.view_params rows for the images, "
            f"shapes {expected}; got {got}."
        )
    return {
        key: jnp.reshape(value, (-1, *np.shape(value)[len(leading) :]))
        for key, value in params.items()
    }


def augment_views(
    batch: Mapping[str, Any], augmentation: Augmentation
) -> tuple[jax.Array, jax.Array]:
    """The two views of a training batch (the layout above): float32 (..., b, crop, crop, C).

    Traceable (the train step calls it first) and jit-compiled on its own; any leading axes
    (devices, ...) are kept.
    """
    images = batch["image"]
    leading = _check_images(images, augmentation.image_size, augmentation.channels, "augmentation")
    flat_images = jnp.reshape(images, (-1, *images.shape[len(leading) :]))
    views = []
    for key in ("view1_params", "view2_params"):
        params = _flat_params(batch[key], leading, augmentation.blur_kernel_size)
        view = _augment_flat(flat_images, params, augmentation)
        views.append(jnp.reshape(view, (*leading, *view.shape[1:])))
    return views[0], views[1]


def train_batch(
    images: np.ndarray,
    labels: np.ndarray,
    augmentation: Augmentation,
    *,
    seed: int = 0,
    step: int = 0,
) -> TrainBatch:
    """The training-batch layout of uint8 `images` (b, H, W, C) with int `labels` (b,), taken as
    global batch `step` of a stream seeded by `seed` (both views' parameters from
    `augment_params.view_params`): for a loop fed by its own arrays rather than `train_iterator`."""
    size = len(labels)
    return {
        "image": np.asarray(images),
        "view1_params": view_params(seed, step, 0, size, augmentation),
        "view2_params": view_params(seed, step, 1, size, augmentation),
        "label": np.asarray(labels, np.int32),
    }


@functools.partial(jax.jit, static_argnames=("info", "image_size"))
def eval_images(images: jax.Array, info: DatasetInfo, image_size: int = 0) -> jax.Array:
    """uint8 (..., b, H, W, C) -> float32 normalised, resized (antialiased bilinear) to
    image_size x image_size when it is set and differs from the stored size."""
    leading = _check_images(images, info.image_size, info.channels, "evaluation preprocessing")
    stored = info.image_size

    def one(image: jax.Array) -> jax.Array:
        planes = jnp.transpose(image, (2, 0, 1)).astype(jnp.float32) * (1.0 / 255.0)
        if image_size and image_size != stored:
            resize = _resize_matrix(0.0, float(stored), image_size, stored)
            planes = jnp.clip(_matmul(_matmul(resize, planes), resize.T), 0.0, 1.0)
        return _normalise(planes, info.mean, info.std)

    flat = jax.vmap(one)(jnp.reshape(images, (-1, *images.shape[len(leading) :])))
    return jnp.reshape(flat, (*leading, *flat.shape[1:]))
