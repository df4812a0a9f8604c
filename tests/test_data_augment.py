"""Augmentation ops against independent references (PIL, tf.image, scipy); their statistics."""

from __future__ import annotations

import numpy as np
import pytest

from hscl_jax import data
from hscl_jax.data import augment

tf = pytest.importorskip("tensorflow")
CIFAR = data.dataset_info("cifar10")


def simclr(**changes):
    config = data.augmentation_config("simclr")
    for key, value in changes.items():
        config[key] = value
    return augment.resolve_augmentation(config, CIFAR)


def to_images(planes):
    """(c, b, h, w) planes -> (b, h, w, c) numpy."""
    return np.transpose(np.asarray(planes), (1, 2, 3, 0))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # Smooth-ish images (so that resampling differences are not all noise) plus pure noise.
    base = rng.integers(0, 256, size=(6, 12, 12, 3)).astype(np.float32)
    smooth = tf.image.resize(base, (96, 96), method="bicubic").numpy()
    return np.clip(np.rint(smooth), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("side", [32, 96])
def test_resized_crop_matches_pil_bilinear(images, side):
    from PIL import Image

    pictures = images if side == 96 else images[:, ::3, ::3]
    boxes = np.array(
        [
            [0, 0, side, side],  # whole image
            [3, 5, side // 2, side // 3],  # upscale (32 px) or downscale (96 px)
            [side - 7, side - 9, 7, 9],  # corner, strong upscale
            [1, 0, side - 1, side - 4],
            [side // 4, side // 5, side // 2, side // 2],
            [0, side - 20, 20, 20],
        ],
        np.float32,
    )
    flip = np.zeros(len(boxes), bool)
    ours = to_images(augment._crop_resize_flip(pictures, boxes, flip, 32)) * 255.0
    for image, (top, left, height, width), result in zip(pictures, boxes, ours, strict=True):
        crop = Image.fromarray(image).crop((left, top, left + width, top + height))
        reference = np.asarray(crop.resize((32, 32), Image.BILINEAR), np.float32)
        # PIL rounds to uint8 with fixed-point weights.
        np.testing.assert_allclose(result, reference, atol=1.01)


def test_full_crop_is_identity_and_flip_mirrors(images):
    pictures = images[:2, ::3, ::3]
    boxes = np.tile(np.array([[0, 0, 32, 32]], np.float32), (2, 1))
    plain = to_images(augment._crop_resize_flip(pictures, boxes, np.array([False, False]), 32))
    np.testing.assert_allclose(plain, pictures / 255.0, atol=1e-6)
    flipped = to_images(augment._crop_resize_flip(pictures, boxes, np.array([True, False]), 32))
    np.testing.assert_allclose(flipped[0], plain[0][:, ::-1], atol=1e-6)
    np.testing.assert_allclose(flipped[1], plain[1], atol=1e-6)


def test_hue_shift_matches_tf_adjust_hue():
    rng = np.random.default_rng(1)
    pictures = rng.uniform(size=(5, 16, 16, 3)).astype(np.float32)
    pictures[0, :4] = 0.5  # gray pixels: no hue
    shifts = np.array([0.1, -0.1, 0.05, 0.0, -0.07], np.float32)
    planes = np.transpose(pictures, (3, 0, 1, 2))
    ours = to_images(augment._shift_hue(planes, shifts.reshape(1, -1, 1, 1)))
    for picture, shift, result in zip(pictures, shifts, ours, strict=True):
        reference = tf.image.adjust_hue(picture, float(shift)).numpy()
        np.testing.assert_allclose(result, reference, atol=2e-5)


def test_blur_matches_scipy_mirror_convolution():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    pictures = rng.uniform(size=(3, 10, 10, 3)).astype(np.float32)
    aug = simclr(blur_prob=1.0)
    kernels = augment._blur_kernels(np.random.default_rng(3), 3, aug)
    assert kernels.shape == (3, 3)
    planes = np.transpose(pictures, (3, 0, 1, 2))
    ours = to_images(augment._blur(planes, kernels))
    for picture, kernel, result in zip(pictures, kernels, ours, strict=True):
        reference = ndimage.correlate1d(picture, kernel, axis=0, mode="mirror")
        reference = ndimage.correlate1d(reference, kernel, axis=1, mode="mirror")
        np.testing.assert_allclose(result, reference, atol=1e-5)


def _gray(picture):
    return picture @ np.array([0.299, 0.587, 0.114], np.float32)


def _reference_jitter(picture, factors, order):
    """torchvision's ColorJitter on one float image, ops in the given order."""
    for op in order:
        if op == augment.BRIGHTNESS:
            picture = np.clip(factors[0] * picture, 0, 1)
        elif op == augment.CONTRAST:
            mean = _gray(picture).mean()
            picture = np.clip(factors[1] * picture + (1 - factors[1]) * mean, 0, 1)
        elif op == augment.SATURATION:
            gray = _gray(picture)[..., None]
            picture = np.clip(factors[2] * picture + (1 - factors[2]) * gray, 0, 1)
        elif op == augment.HUE:
            picture = tf.image.adjust_hue(picture, float(factors[3])).numpy()
    return picture


def test_color_jitter_applies_each_images_own_order():
    rng = np.random.default_rng(4)
    pictures = rng.uniform(size=(4, 8, 8, 3)).astype(np.float32)
    factors = np.array(
        [[1.3, 0.7, 1.4, 0.08], [0.6, 1.2, 0.6, -0.1], [1.1, 1.1, 0.9, 0.03], [1.0, 1.0, 1.0, 0]],
        np.float32,
    )
    skip = augment.SKIP
    order = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [skip] * 4], np.int32)
    planes = np.transpose(pictures, (3, 0, 1, 2))
    ours = to_images(augment._color_jitter(planes, factors, order, simclr()))
    for picture, factor, ops, result in zip(pictures, factors, order, ours, strict=True):
        reference = _reference_jitter(picture, factor, [op for op in ops if op != skip])
        np.testing.assert_allclose(result, reference, atol=3e-5)


def test_sampled_parameters_follow_the_configured_probabilities():
    aug = simclr()
    size = 4096
    params = augment.sample_params(np.random.default_rng(5), size, 32, aug)
    again = augment.sample_params(np.random.default_rng(5), size, 32, aug)
    for key in params:
        np.testing.assert_array_equal(params[key], again[key])
    top, left, height, width = params["boxes"].T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 32).all() and (left + width <= 32).all()
    area = height * width / 32**2
    assert area.min() >= 0.08 * 0.5 and area.max() <= 1.0

    def rate(mask, expected):
        tolerance = 5 * np.sqrt(expected * (1 - expected) / size)
        assert abs(mask.mean() - expected) < tolerance, (mask.mean(), expected)

    rate(params["flip"], 0.5)
    rate(params["grayscale"], 0.2)
    jittered = (params["jitter_order"] != augment.SKIP).any(axis=1)
    rate(jittered, 0.8)
    # A jittered image runs each of the four ops exactly once.
    np.testing.assert_array_equal(
        np.sort(params["jitter_order"][jittered], axis=1),
        np.tile(np.arange(4), (jittered.sum(), 1)),
    )
    blurred = params["blur_kernels"][:, 1] < 1.0
    rate(blurred, 0.5)
    np.testing.assert_allclose(params["blur_kernels"].sum(axis=1), 1.0, rtol=1e-6)
    brightness = params["jitter_factors"][:, augment.BRIGHTNESS]
    assert brightness.min() >= 0.6 and brightness.max() <= 1.4
    hue = params["jitter_factors"][:, augment.HUE]
    assert np.abs(hue).max() <= 0.1


def test_switched_off_ops_leave_images_alone_and_keep_other_randomness():
    off = simclr(color_jitter=False, grayscale=False, blur=False, flip=False)
    params = augment.sample_params(np.random.default_rng(6), 64, 32, off)
    on = augment.sample_params(np.random.default_rng(6), 64, 32, simclr())
    np.testing.assert_array_equal(params["boxes"], on["boxes"])
    assert not params["flip"].any() and not params["grayscale"].any()
    assert (params["jitter_order"] == augment.SKIP).all()
    none = augment.resolve_augmentation(data.augmentation_config("none"), CIFAR)
    pictures = np.random.default_rng(7).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    params = augment.sample_params(np.random.default_rng(8), 4, 32, none)
    views = augment.augment_batch(pictures, params, none, CIFAR).numpy()
    expected = (pictures / 255.0 - np.array(CIFAR.mean)) / np.array(CIFAR.std)
    np.testing.assert_allclose(views, expected, atol=1e-5)


def test_grayscale_views_have_equal_channels():
    aug = simclr(color_jitter=False, blur=False, grayscale_prob=1.0)
    pictures = np.random.default_rng(9).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    params = augment.sample_params(np.random.default_rng(10), 3, 32, aug)
    views = augment.augment_batch(pictures, params, aug, CIFAR).numpy()
    pixels = views * np.array(CIFAR.std) + np.array(CIFAR.mean)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)
