"""The augmentation (JAX, hscl_jax.data.augment) against its TensorFlow oracle
(tests/tf_augment_oracle.py), op by op, and the contract of the training-batch layout.

Tolerance: the two run the same float32 arithmetic in the same order except where a backend picks
its own summation order (the matmuls of crop-resize and blur, sums of up to 32 products, and the
mean luma of contrast) or fuses/reorders elementwise ops; each such step differs by a few float32
ulps, and about 40 steps follow one another. 1e-5 on [0, 1] pixels (~80 ulps at 1.0) bounds that
with room, while one uint8 grey level (3.9e-3) is 390 times larger: a wrong weight, a misplaced
pixel or a swapped op cannot pass.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

from hscl_jax import data
from hscl_jax.data import augment_params

tf = pytest.importorskip("tensorflow")
oracle = importlib.import_module("tf_augment_oracle")  # tests/, beside this file

PIXEL_ATOL = 1e-5
CIFAR = data.dataset_info("cifar10")
DIGITS = data.dataset_info("digits")
SWITCHES = ("crop", "flip", "color_jitter", "grayscale", "blur")
JITTER_STRENGTHS = ("brightness", "contrast", "saturation", "hue")
RGB_OPS = ("crop", "flip", *JITTER_STRENGTHS, "grayscale", "blur")
GRAY_OPS = ("crop", "flip", "brightness", "contrast", "blur")


def make_images(info, batch_size: int = 16, seed: int = 0) -> np.ndarray:
    """Random uint8 images with the cases the colour ops branch on: gray pixels (no hue),
    saturated channels (0 and 255) and ties between the largest channels."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, info.image_size, info.image_size, info.channels)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    images[0, : info.image_size // 2] = images[0, : info.image_size // 2, :, :1]
    images[1, :, : info.image_size // 2] = 255
    images[2, ::2, ::2] = 0
    if info.channels == 3:
        images[3, :, :, 1] = images[3, :, :, 0]
    return images


def only(op: str, info):
    """Every op off except `op`, which applies to every image."""
    config = data.augmentation_config("simclr")
    for switch in SWITCHES:
        config[switch] = False
    if op in JITTER_STRENGTHS:
        config.color_jitter, config.color_jitter_prob = True, 1.0
        for strength in JITTER_STRENGTHS:
            if strength != op:
                config[strength] = 0.0
    else:
        config[op] = True
        if op != "crop":
            config[f"{op}_prob"] = 1.0
    return augment_params.resolve_augmentation(config, info)


def without(op: str, info):
    """The SimCLR recipe (RGB ops dropped for one channel) with `op` off."""
    config = data.augmentation_config("simclr")
    if info.channels == 1:
        config.saturation, config.hue, config.grayscale = 0.0, 0.0, False
    if op in JITTER_STRENGTHS:
        config[op] = 0.0
    else:
        config[op] = False
    return augment_params.resolve_augmentation(config, info)


def preset(name: str, info):
    return augment_params.resolve_augmentation(data.augmentation_config(name), info)


def oracle_and_jax_views(aug, seed: int = 0):
    info_shape = (aug.image_size, aug.channels)
    images = make_images(_INFO_OF_SHAPE[info_shape], seed=seed)
    params = data.view_params(seed, 7, 0, len(images), aug)
    expected = oracle.augment_batch(images, params, aug).numpy()
    batch = {"image": images, "view1_params": params, "view2_params": params}
    return expected, np.asarray(data.augment_views(batch, aug)[0])


_INFO_OF_SHAPE = {(CIFAR.image_size, 3): CIFAR, (DIGITS.image_size, 1): DIGITS}


def assert_same_views(views, expected, info):
    chex.assert_shape(views, expected.shape)
    assert views.dtype == np.float32
    # PIXEL_ATOL is on [0, 1] pixels; views are normalised by std.
    np.testing.assert_allclose(views, expected, rtol=0, atol=PIXEL_ATOL / min(info.std))


CASES = [
    *[(CIFAR, f"only {op}") for op in RGB_OPS],
    *[(CIFAR, f"without {op}") for op in RGB_OPS],
    (CIFAR, "preset simclr"),
    (CIFAR, "preset none"),
    *[(DIGITS, f"only {op}") for op in GRAY_OPS],
    *[(DIGITS, f"without {op}") for op in GRAY_OPS],
    (DIGITS, "preset digits"),
    (DIGITS, "preset none"),
]


@pytest.mark.parametrize(
    ("info", "case"), CASES, ids=[f"{info.name}-{case}" for info, case in CASES]
)
def test_jax_views_equal_the_tensorflow_oracle(info, case):
    kind, name = case.split()
    aug = {"only": only, "without": without, "preset": preset}[kind](name, info)
    expected, views = oracle_and_jax_views(aug)
    assert_same_views(views, expected, info)
    if kind == "only":
        # The op really ran: the views are far (in grey levels) from the un-augmented images.
        plain, _ = oracle_and_jax_views(preset("none", info))
        assert np.abs(expected - plain).max() * min(info.std) > 0.05


@pytest.mark.parametrize(
    ("info", "image_size"),
    [
        (CIFAR, 0),
        (CIFAR, 16),
        (CIFAR, 48),
        (DIGITS, 0),
        (DIGITS, 32),
        (data.dataset_info("stl10"), 32),
    ],
    ids=["cifar10-stored", "cifar10-16", "cifar10-48", "digits-stored", "digits-32", "stl10-32"],
)
def test_eval_images_equal_the_tensorflow_oracle(info, image_size):
    images = make_images(info, batch_size=4)
    expected = oracle.eval_preprocess(images, info, image_size).numpy()
    assert_same_views(np.asarray(data.eval_images(images, info, image_size)), expected, info)


def train_batch(aug, batch_size: int = 16):
    images = make_images(_INFO_OF_SHAPE[(aug.image_size, aug.channels)], batch_size)
    return {
        "image": images,
        "view1_params": data.view_params(5, 2, 0, batch_size, aug),
        "view2_params": data.view_params(5, 2, 1, batch_size, aug),
        "label": np.arange(batch_size, dtype=np.int32) % 10,
    }


def test_views_on_8_devices_equal_one_device():
    # Each device holds a slice of the batch, as each host does: its rows must be the same.
    aug = preset("simclr", CIFAR)
    batch = train_batch(aug)
    single = data.augment_views(batch, aug)
    per_device = jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), batch)
    spread = jax.pmap(lambda b: data.augment_views(b, aug))(per_device)
    for one, eight in zip(single, spread, strict=True):
        chex.assert_shape(eight, (8, 2, *one.shape[1:]))
        # Not bitwise: XLA vectorises a batch of 2 differently from one of 16.
        assert_same_views(np.asarray(eight).reshape(one.shape), np.asarray(one), CIFAR)
    # Leading axes are kept outside pmap too.
    outside = data.augment_views(per_device, aug)
    assert_same_views(np.asarray(outside[0]), np.asarray(spread[0]), CIFAR)
    assert np.abs(np.asarray(single[0]) - np.asarray(single[1])).max() > 0.1


def test_float_images_or_mismatched_parameters_are_refused():
    aug = preset("simclr", CIFAR)
    batch = train_batch(aug, batch_size=4)
    with pytest.raises(data.DataError, match="takes uint8 images.*got float32"):
        data.augment_views({**batch, "image": batch["image"].astype(np.float32)}, aug)
    with pytest.raises(
        data.DataError, match="shape \\(..., batch, 32, 32, 3\\).*got uint8 \\(4, 8, 8, 1\\)"
    ):
        data.eval_images(make_images(DIGITS, 4), CIFAR)
    short = augment_params.slice_params(batch["view1_params"], 0, 3)
    with pytest.raises(data.DataError, match="parameters must be augment_params.view_params rows"):
        data.augment_views({**batch, "view1_params": short}, aug)


_NO_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
                raise ImportError(f"{name} is blocked in this test")
            return None


    sys.meta_path.insert(0, NoTensorFlow())
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:
        raise AssertionError("the blocker did not block")

    import jax
    import numpy as np

    from hscl_jax import data

    config = data.default_data_config("synthetic")
    aug = data.augmentation_for(config)
    batch = next(data.train_iterator(config, global_batch_size=8, seed=0, num_local_devices=2))
    views = jax.pmap(lambda b: data.augment_views(b, aug))(batch)
    assert views[0].shape == (2, 4, 32, 32, 3), views[0].shape
    assert views[0].dtype == np.float32
    images = np.zeros((4, 32, 32, 3), np.uint8)
    assert data.eval_images(images, data.dataset_info("synthetic"), 16).shape == (4, 16, 16, 3)
    loaded = sorted(m for m in sys.modules if m.split(".")[0].startswith("tensorflow"))
    assert not loaded, loaded
    print("augmentation ran without TensorFlow")
    """
)


def test_augmentation_runs_with_tensorflow_blocked():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-c", _NO_TENSORFLOW],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "augmentation ran without TensorFlow" in done.stdout


# ----------------------------------------------------------------------------- the pipeline side


def test_the_stream_ships_uint8_and_the_views_equal_the_oracle(tmp_path):
    """Digits through the real pipeline, with flip, blur and jitter on: the shipped batch, the
    eval stream, and the views they make equal the oracle's on the same images and parameters."""
    config = data.default_data_config("digits")
    config.data_dir = str(tmp_path / "tfds")
    config.num_workers = 1
    config.augmentation.update(
        {"flip": True, "blur": True, "color_jitter": True, "saturation": 0.0, "hue": 0.0}
    )
    aug = data.augmentation_for(config)
    shipped = next(
        data.train_iterator(config, global_batch_size=16, seed=3, start_step=5, num_local_devices=2)
    )
    assert set(shipped) == {"image", "view1_params", "view2_params", "label"}
    assert shipped["image"].dtype == np.uint8 and shipped["image"].shape == (2, 8, 8, 8, 1)
    assert shipped["view1_params"]["boxes"].shape == (2, 8, 4)
    full = data.view_params(3, 5, 1, 16, aug)
    np.testing.assert_array_equal(shipped["view2_params"]["boxes"].reshape(16, 4), full["boxes"])
    views = jax.pmap(lambda b: data.augment_views(b, aug))(shipped)
    flat = jax.tree.map(lambda x: x.reshape(16, *x.shape[2:]), shipped)
    for view, key in zip(views, ("view1_params", "view2_params"), strict=True):
        expected = oracle.augment_batch(flat["image"], flat[key], aug).numpy()
        assert_same_views(np.asarray(view).reshape(expected.shape), expected, DIGITS)

    evaluation = next(data.eval_iterator(config, split="test", batch_size=64, num_local_devices=2))
    assert evaluation["image"].dtype == np.uint8
    images = jax.pmap(data.eval_preprocessing(config))(evaluation["image"])
    expected = oracle.eval_preprocess(evaluation["image"].reshape(64, 8, 8, 1), DIGITS, 0).numpy()
    assert_same_views(np.asarray(images).reshape(expected.shape), expected, DIGITS)
