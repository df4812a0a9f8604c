"""SimCLR augmentation on the accelerator, in pure JAX: `augment.augment_batch`'s ops, jit-compiled.

Host/device contract (config.data.augment_on = "device"):
  - The host reads, decodes and indexes only. Per global batch it ships this host's share as
    {"image": uint8 (b, H, W, C) at the stored size (both views of an image crop from it),
     "view1_params": ..., "view2_params": ..., "label": int32 (b,)}
    (with a leading local-device axis for pmap), where each view's parameters are the rows of
    `augment.view_params(seed, step, view, ...)` for this host's examples: "boxes" float32 (b, 4),
    "flip" bool (b,), "jitter_factors" float32 (b, 4), "jitter_order" int32 (b, 4), "grayscale"
    bool (b,), "blur_kernels" float32 (b, k): about 60 bytes per view at CIFAR's settings, next to
    3 KB of image. Images stay uint8 until they are on the device; float32 is never shipped.
  - The device turns that into the host path's batch, {"view1", "view2": float32 (b, crop, crop,
    C) normalised, "label"}, with `augment_pair` inside the pmapped train step (or
    `pmap_augment_pair` right before it), and eval batches with `eval_images`.
    `device_augmentation` and `device_eval_preprocess` bind them to a `config.data`;
    `stream_views` gives the views of a shipped batch outside the step.
The parameters are the host path's, drawn by the one numpy sampler, so a given (seed, step, view,
position) gives the same view on either path: equal within float32 rounding (the tests compare).

Every image op is written per image and vmapped over the batch; every linear step (crop + resize
+ flip, blur, eval resize) is a pair of small matmuls, as on the host, so XLA runs them on the
matrix units. The matmuls ask for full float32 precision: the default on recent GPUs/TPUs
rounds inputs to tf32/bf16, ~1e-3 relative, a quarter of a grey level.

Imports neither TensorFlow nor anything that does (GPU images often lack it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hscl_jax.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    GRAY_WEIGHTS,
    HUE,
    SATURATION,
    Augmentation,
    reflect_shift_matrices,
    resolve_augmentation,
)
from hscl_jax.data.config import check_augment_on
from hscl_jax.data.info import DatasetInfo, dataset_info

_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _resize_matrix(start, length, out_size: int, in_size: int) -> jax.Array:
    """(out_size, in_size) rows resampling pixels [start, start + length) to out_size pixels.

    PIL's antialiased bilinear filter, as `augment._resize_matrices` (see there) for one image.
    """
    scale = length / out_size
    support = jnp.maximum(scale, 1.0)
    centres = start + (jnp.arange(out_size, dtype=jnp.float32)[:, None] + 0.5) * scale
    pixels = jnp.arange(in_size, dtype=jnp.float32)[None, :] + 0.5
    weights = jnp.maximum(1.0 - jnp.abs(pixels - centres) / support, 0.0)
    inside = (pixels > start) & (pixels < start + length)
    weights = jnp.where(inside, weights, 0.0)
    return weights / jnp.sum(weights, axis=1, keepdims=True)


def _crop_resize_flip(image, box, flip, crop_size: int) -> jax.Array:
    """uint8 (H, W, C) -> planes (C, crop, crop) in [0, 1]: R_y @ plane @ R_x^T per plane."""
    height, width = image.shape[0], image.shape[1]
    rows = _resize_matrix(box[0], box[2], crop_size, height) * (1.0 / 255.0)
    columns = _resize_matrix(box[1], box[3], crop_size, width)
    # A horizontal flip reverses the order of the output columns.
    columns = jnp.where(flip, columns[::-1], columns)
    planes = jnp.transpose(image, (2, 0, 1)).astype(jnp.float32)
    return _matmul(_matmul(rows, planes), columns.T)


def _gray(planes) -> jax.Array:
    """Luma (h, w) with torchvision's weights; the plane itself for one-channel images."""
    if planes.shape[0] == 1:
        return planes[0]
    red, green, blue = planes[0], planes[1], planes[2]
    return GRAY_WEIGHTS[0] * red + GRAY_WEIGHTS[1] * green + GRAY_WEIGHTS[2] * blue


def _mod6(values) -> jax.Array:
    return values - 6.0 * jnp.floor(values * (1.0 / 6.0))


def _shift_hue(planes, shift) -> jax.Array:
    """Rotates the HSV hue of every pixel by `shift` turns, as `augment._shift_hue` (see there)."""
    red, green, blue = planes[0], planes[1], planes[2]
    value = jnp.maximum(jnp.maximum(red, green), blue)
    chroma = value - jnp.minimum(jnp.minimum(red, green), blue)
    safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
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


@dataclasses.dataclass(frozen=True)
class _Program:
    """Which ops an `Augmentation` runs: all that shapes the compiled program (its jit key), so
    settings that differ only in ranges or probabilities share one compilation."""

    jitter: bool
    blend_with_luma: bool
    hue: bool
    grayscale: bool
    blur: bool

    @classmethod
    def of(cls, aug: Augmentation) -> _Program:
        return cls(
            jitter=aug.color_jitter_prob > 0,
            blend_with_luma=aug.contrast > 0 or aug.saturation > 0,
            hue=aug.hue > 0,
            grayscale=aug.grayscale_prob > 0,
            blur=aug.blur_prob > 0,
        )


def _color_jitter(planes, factors, order, program: _Program) -> jax.Array:
    """Brightness, contrast, saturation, hue in the image's own order (`augment._color_jitter`)."""
    for slot in range(4):
        op_id = order[slot]
        factor = jnp.float32(1.0)
        for op in (BRIGHTNESS, CONTRAST, SATURATION):
            factor = jnp.where(op_id == op, factors[op], factor)
        if program.blend_with_luma:
            gray = _gray(planes)[None]
            mean_gray = jnp.mean(gray, axis=(1, 2), keepdims=True)
            saturation = (op_id == SATURATION).astype(jnp.float32)
            contrast = (op_id == CONTRAST).astype(jnp.float32)
            target = saturation * gray + contrast * mean_gray
        else:
            target = 0.0
        planes = jnp.clip(factor * planes + (1.0 - factor) * target, 0.0, 1.0)
        if program.hue:
            planes = _shift_hue(planes, jnp.where(op_id == HUE, factors[HUE], 0.0))
        # Materialise each slot: fused across slots, XLA recomputes every earlier slot once per
        # use (each hue channel reads all three inputs), 3^4 times the work (80x slower on CPU).
        planes = jax.lax.optimization_barrier(planes)
    return planes


def _blur(planes, kernel) -> jax.Array:
    """Separable Gaussian blur with reflected borders: G @ plane @ G^T."""
    shifts = reflect_shift_matrices(planes.shape[1], kernel.shape[0])
    blur = jnp.einsum("k,kij->ij", kernel, shifts, precision=jax.lax.Precision.HIGHEST)
    return _matmul(_matmul(blur, planes), blur.T)


def _normalise(planes, info: DatasetInfo) -> jax.Array:
    """Planes (C, h, w) in [0, 1] -> (h, w, C) normalised with the dataset's mean and std."""
    mean = jnp.asarray(info.mean, jnp.float32)[:, None, None]
    std = jnp.asarray(info.std, jnp.float32)[:, None, None]
    return jnp.transpose((planes - mean) / std, (1, 2, 0))


def _augment_image(image, params, program: _Program, info: DatasetInfo) -> jax.Array:
    planes = _crop_resize_flip(image, params["boxes"], params["flip"], info.crop_size)
    if program.jitter:
        planes = _color_jitter(planes, params["jitter_factors"], params["jitter_order"], program)
    if program.grayscale:
        planes = jnp.where(params["grayscale"], _gray(planes)[None], planes)
    if program.blur:
        planes = _blur(planes, params["blur_kernels"])
    return _normalise(planes, info)


def _check_images(images, info: DatasetInfo) -> None:
    stored = (info.image_size, info.image_size, info.channels)
    if images.dtype != jnp.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != stored:
        shape = ", ".join(map(str, stored))
        raise ValueError(
            f"device augmentation takes uint8 images of shape (batch, {shape}) ({info.name}'s "
            f"stored size), got {images.dtype} {tuple(images.shape)}."
        )


def _check_params(params, batch_size: int, kernel_size: int) -> None:
    expected = {
        "boxes": (batch_size, 4),
        "flip": (batch_size,),
        "jitter_factors": (batch_size, 4),
        "jitter_order": (batch_size, 4),
        "grayscale": (batch_size,),
        "blur_kernels": (batch_size, kernel_size),
    }
    got = {key: tuple(np.shape(value)) for key, value in params.items()}
    if got != expected:
        raise ValueError(
            f"augmentation parameters must be augment.view_params rows for the {batch_size} "
            f"images, shapes {expected}; got {got}."
        )


def augment_views(images, params, aug: Augmentation, info: DatasetInfo) -> jax.Array:
    """uint8 (b, H, W, C) images + one view's parameters -> float32 (b, crop, crop, C) views.

    `params` are this batch's rows of `augment.view_params`; the result equals
    `augment.augment_batch(images, params, aug, info)` within float32 rounding. Jit-compiled;
    traceable inside pmap/jit.
    """
    _check_images(images, info)
    _check_params(params, images.shape[0], aug.blur_kernel_size)
    return _augment_views(images, params, _Program.of(aug), info)


@functools.partial(jax.jit, static_argnames=("program", "info"))
def _augment_views(images, params, program: _Program, info: DatasetInfo) -> jax.Array:
    return jax.vmap(functools.partial(_augment_image, program=program, info=info))(images, params)


def augment_pair(batch, aug: Augmentation, info: DatasetInfo) -> dict[str, jax.Array]:
    """A shipped batch {"image", "view1_params", "view2_params", "label"} -> {"view1", "view2",
    "label"}, the host path's batch. Traceable: call it inside the pmapped train step."""
    return {
        "view1": augment_views(batch["image"], batch["view1_params"], aug, info),
        "view2": augment_views(batch["image"], batch["view2_params"], aug, info),
        "label": batch["label"],
    }


def pmap_augment_pair(aug: Augmentation, info: DatasetInfo, devices=None):
    """`augment_pair` pmapped over local devices: batches with a leading (devices,) axis."""
    return jax.pmap(functools.partial(augment_pair, aug=aug, info=info), devices=devices)


@functools.partial(jax.jit, static_argnames=("info", "image_size"))
def eval_images(images, info: DatasetInfo, image_size: int = 0) -> jax.Array:
    """uint8 (b, H, W, C) -> float32 normalised, resized (antialiased bilinear) to image_size when
    it is set and differs; `augment.eval_preprocess` within float32 rounding."""
    _check_images(images, info)
    stored = images.shape[1]

    def one(image):
        planes = jnp.transpose(image, (2, 0, 1)).astype(jnp.float32) * (1.0 / 255.0)
        if image_size and image_size != stored:
            resize = _resize_matrix(0.0, float(stored), image_size, stored)
            planes = jnp.clip(_matmul(_matmul(resize, planes), resize.T), 0.0, 1.0)
        return _normalise(planes, info)

    return jax.vmap(one)(images)


def _runs_on_device(data_config) -> bool:
    on_device = check_augment_on(data_config.augment_on) == "device"
    return on_device and data_config.name != "synthetic"


def device_augmentation(data_config):
    """The train step's `prepare_batch` for `config.data`: `augment_pair` bound to its
    augmentation and dataset when augment_on is "device" (the pipeline then ships uint8 images
    and parameters); None when it is "host" or the dataset has no augmentation ("synthetic")."""
    if not _runs_on_device(data_config):
        return None
    info = dataset_info(data_config.name)
    aug = resolve_augmentation(data_config.augmentation, info)
    return functools.partial(augment_pair, aug=aug, info=info)


def device_eval_preprocess(data_config, devices=None):
    """pmapped uint8 (D, b, H, W, C) -> float32 normalised eval images for `config.data` when
    augment_on is "device" (the eval stream then ships uint8 images); None otherwise."""
    if not _runs_on_device(data_config):
        return None
    preprocess = functools.partial(
        eval_images,
        info=dataset_info(data_config.name),
        image_size=data_config.eval_image_size,
    )
    return jax.pmap(preprocess, devices=devices)


def stream_views(batch, data_config) -> dict:
    """{"view1", "view2", "label"} (numpy, (D, b, ...)) of one `train_iterator` batch, as the train
    step sees them: a shipped batch (augment_on="device") is augmented here, on the default
    device; a host-augmented batch is returned as it is. For code that inspects training views
    outside the step (analysis, tests)."""
    prepare = device_augmentation(data_config)
    if prepare is None:
        return batch
    leading = batch["label"].shape[:2]
    flat = jax.tree.map(lambda x: np.asarray(x).reshape(-1, *np.shape(x)[2:]), batch)
    return jax.tree.map(lambda x: np.asarray(x).reshape(*leading, *x.shape[1:]), prepare(flat))
