"""The augmentation's image ops (JAX) against independent references (PIL, tf.image, scipy), and
the statistics of the sampled parameters."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from hscl_jax import data
from hscl_jax.data import augment, augment_params

CIFAR_CONFIG = data.default_data_config("cifar10")
CIFAR = data.dataset_info("cifar10")


def simclr(**changes):
    config = data.augmentation_config("simclr")
    for key, value in changes.items():
        config[key] = value
    return augment_params.resolve_augmentation(config, CIFAR)


def per_image(op, *args, **static):
    """`op` (one image's planes (c, h, w) in, planes out) over a batch; images (b, h, w, c) out."""
    planes = jax.vmap(functools.partial(op, **static))(*args)
    return np.transpose(np.asarray(planes), (0, 2, 3, 1))


def to_planes(pictures):
    """(b, h, w, c) -> (b, c, h, w)."""
    return np.transpose(pictures, (0, 3, 1, 2))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # Smooth-ish images (so that resampling differences are not all noise): 8x8 blocks of random
    # colours, each edge softened by a 4-pixel moving average.
    blocks = np.kron(rng.uniform(0, 255, size=(6, 12, 12, 3)), np.ones((1, 8, 8, 1)))
    kernel = np.ones(4) / 4
    for axis in (1, 2):
        blocks = np.apply_along_axis(np.convolve, axis, blocks, kernel, mode="same")
    return np.rint(blocks).astype(np.uint8)


@pytest.mark.parametrize("side", [32, 96])
def test_resized_crop_matches_pil_bilinear(images, side):
    image_lib = pytest.importorskip("PIL.Image")

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
    ours = per_image(augment._crop_resize_flip, pictures, boxes, flip, crop_size=32) * 255.0
    for image, (top, left, height, width), result in zip(pictures, boxes, ours, strict=True):
        crop = image_lib.fromarray(image).crop((left, top, left + width, top + height))
        reference = np.asarray(crop.resize((32, 32), image_lib.BILINEAR), np.float32)
        # PIL rounds to uint8 with fixed-point weights.
        np.testing.assert_allclose(result, reference, atol=1.01)


def test_full_crop_is_identity_and_flip_mirrors(images):
    pictures = images[:2, ::3, ::3]
    boxes = np.tile(np.array([[0, 0, 32, 32]], np.float32), (2, 1))
    crop = functools.partial(per_image, augment._crop_resize_flip, crop_size=32)
    plain = crop(pictures, boxes, np.array([False, False]))
    np.testing.assert_allclose(plain, pictures / 255.0, atol=1e-6)
    flipped = crop(pictures, boxes, np.array([True, False]))
    np.testing.assert_allclose(flipped[0], plain[0][:, ::-1], atol=1e-6)
    np.testing.assert_allclose(flipped[1], plain[1], atol=1e-6)


def test_hue_shift_matches_tf_adjust_hue():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(1)
    pictures = rng.uniform(size=(5, 16, 16, 3)).astype(np.float32)
    pictures[0, :4] = 0.5  # gray pixels: no hue
    shifts = np.array([0.1, -0.1, 0.05, 0.0, -0.07], np.float32)
    ours = per_image(augment._shift_hue, to_planes(pictures), shifts)
    for picture, shift, result in zip(pictures, shifts, ours, strict=True):
        reference = tf.image.adjust_hue(picture, float(shift)).numpy()
        np.testing.assert_allclose(result, reference, atol=2e-5)


def test_blur_matches_scipy_mirror_convolution():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    pictures = rng.uniform(size=(3, 10, 10, 3)).astype(np.float32)
    aug = simclr(blur_prob=1.0)
    kernels = augment_params._blur_kernels(np.random.default_rng(3), 3, aug)
    assert kernels.shape == (3, 3)
    ours = per_image(augment._blur, to_planes(pictures), kernels)
    for picture, kernel, result in zip(pictures, kernels, ours, strict=True):
        reference = ndimage.correlate1d(picture, kernel, axis=0, mode="mirror")
        reference = ndimage.correlate1d(reference, kernel, axis=1, mode="mirror")
        np.testing.assert_allclose(result, reference, atol=1e-5)


def _gray(picture):
    return picture @ np.array(augment_params.GRAY_WEIGHTS, np.float32)


def _reference_jitter(picture, factors, order):
    """torchvision's ColorJitter on one float image, ops in the given order (hue: PIL's HSV)."""
    import colorsys

    for op in order:
        if op == augment_params.BRIGHTNESS:
            picture = np.clip(factors[0] * picture, 0, 1)
        elif op == augment_params.CONTRAST:
            mean = _gray(picture).mean()
            picture = np.clip(factors[1] * picture + (1 - factors[1]) * mean, 0, 1)
        elif op == augment_params.SATURATION:
            gray = _gray(picture)[..., None]
            picture = np.clip(factors[2] * picture + (1 - factors[2]) * gray, 0, 1)
        elif op == augment_params.HUE:
            hsv = [colorsys.rgb_to_hsv(*pixel) for pixel in picture.reshape(-1, 3)]
            shifted = [colorsys.hsv_to_rgb((h + factors[3]) % 1.0, s, v) for h, s, v in hsv]
            picture = np.asarray(shifted, np.float32).reshape(picture.shape)
    return picture


def test_color_jitter_applies_each_images_own_order():
    rng = np.random.default_rng(4)
    pictures = rng.uniform(size=(4, 8, 8, 3)).astype(np.float32)
    factors = np.array(
        [[1.3, 0.7, 1.4, 0.08], [0.6, 1.2, 0.6, -0.1], [1.1, 1.1, 0.9, 0.03], [1.0, 1.0, 1.0, 0]],
        np.float32,
    )
    skip = augment_params.SKIP
    order = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [skip] * 4], np.int32)
    ours = per_image(augment._color_jitter, to_planes(pictures), factors, order, aug=simclr())
    for picture, factor, ops, result in zip(pictures, factors, order, ours, strict=True):
        reference = _reference_jitter(picture, factor, [op for op in ops if op != skip])
        np.testing.assert_allclose(result, reference, atol=3e-5)


def test_sampled_parameters_follow_the_configured_probabilities():
    aug = simclr()
    size = 4096
    params = augment_params.sample_params(np.random.default_rng(5), size, aug)
    again = augment_params.sample_params(np.random.default_rng(5), size, aug)
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
    jittered = (params["jitter_order"] != augment_params.SKIP).any(axis=1)
    rate(jittered, 0.8)
    # A jittered image runs each of the four ops exactly once.
    np.testing.assert_array_equal(
        np.sort(params["jitter_order"][jittered], axis=1),
        np.tile(np.arange(4), (jittered.sum(), 1)),
    )
    blurred = params["blur_kernels"][:, 1] < 1.0
    rate(blurred, 0.5)
    np.testing.assert_allclose(params["blur_kernels"].sum(axis=1), 1.0, rtol=1e-6)
    brightness = params["jitter_factors"][:, augment_params.BRIGHTNESS]
    assert brightness.min() >= 0.6 and brightness.max() <= 1.4
    hue = params["jitter_factors"][:, augment_params.HUE]
    assert np.abs(hue).max() <= 0.1


def _views(aug, pictures, seed):
    params = data.view_params(seed, 0, 0, len(pictures), aug)
    batch = {"image": pictures, "view1_params": params, "view2_params": params}
    return np.asarray(data.augment_views(batch, aug)[0])


def test_switched_off_ops_leave_images_alone_and_keep_other_randomness():
    off = simclr(color_jitter=False, grayscale=False, blur=False, flip=False)
    params = augment_params.sample_params(np.random.default_rng(6), 64, off)
    on = augment_params.sample_params(np.random.default_rng(6), 64, simclr())
    np.testing.assert_array_equal(params["boxes"], on["boxes"])
    assert not params["flip"].any() and not params["grayscale"].any()
    assert (params["jitter_order"] == augment_params.SKIP).all()
    none = augment_params.resolve_augmentation(data.augmentation_config("none"), CIFAR)
    pictures = np.random.default_rng(7).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    expected = (pictures / 255.0 - np.array(CIFAR.mean)) / np.array(CIFAR.std)
    np.testing.assert_allclose(_views(none, pictures, seed=8), expected, atol=1e-5)


def test_grayscale_views_have_equal_channels():
    aug = simclr(color_jitter=False, blur=False, grayscale_prob=1.0)
    pictures = np.random.default_rng(9).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    pixels = _views(aug, pictures, seed=10) * np.array(CIFAR.std) + np.array(CIFAR.mean)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)


def test_a_preset_follows_the_dataset_and_fields_override_it():
    digits = data.dataset_info("digits")
    config = data.augmentation_config()
    assert config.preset is None and all(config[f] is None for f in config if f != "preset")
    on_digits = augment_params.augmentation_settings(config, digits)
    assert on_digits == augment_params.AUGMENTATION_PRESETS["digits"]
    assert augment_params.augmentation_settings(config, CIFAR)["flip"] is True
    config.flip = False
    config.crop_scale = (0.5, 1.0)
    changed = augment_params.resolve_augmentation(config, CIFAR)
    assert changed.flip_prob == 0.0 and changed.crop_scale == (0.5, 1.0)
    assert changed.color_jitter_prob == 0.8  # the rest stays the preset's
    assert (changed.crop_size, changed.mean) == (32, CIFAR.mean)
    with pytest.raises(data.DataError, match="Unknown augmentation preset 'fancy'"):
        data.augmentation_config("fancy")
