"""On-device (JAX) augmentation against the host (TensorFlow) ops, op by op, and its contract.

Tolerance: the two paths run the same float32 arithmetic in the same order except where a backend
picks its own summation order (the matmuls of crop-resize and blur, sums of up to 32 products, and
the mean luma of contrast) or fuses/reorders elementwise ops; each such step differs by a few
float32 ulps, and about 40 steps follow one another. 1e-5 on [0, 1] pixels (~80 ulps at 1.0)
bounds that with room, while one uint8 grey level (3.9e-3) is 390 times larger: a wrong weight,
a misplaced pixel or a swapped op cannot pass. Measured here: at most 1.1e-6.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

from hscl_jax import data
from hscl_jax.data import augment, device_augment

tf = pytest.importorskip("tensorflow")

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
    return augment.resolve_augmentation(config, info)


def without(op: str, info):
    """The SimCLR recipe (RGB ops dropped for one channel) with `op` off."""
    config = data.augmentation_config("simclr")
    if info.channels == 1:
        config.saturation, config.hue, config.grayscale = 0.0, 0.0, False
    if op in JITTER_STRENGTHS:
        config[op] = 0.0
    else:
        config[op] = False
    return augment.resolve_augmentation(config, info)


def preset(name: str, info):
    return augment.resolve_augmentation(data.augmentation_config(name), info)


def host_and_device_views(aug, info, seed: int = 0):
    images = make_images(info, seed=seed)
    params = augment.view_params(seed, 7, 0, len(images), info.image_size, aug)
    host = augment.augment_batch(images, params, aug, info).numpy()
    device = np.asarray(device_augment.augment_views(images, params, aug, info))
    return host, device


def assert_same_views(device, host, info):
    chex.assert_shape(device, host.shape)
    assert device.dtype == np.float32
    # PIXEL_ATOL is on [0, 1] pixels; views are normalised by std.
    np.testing.assert_allclose(device, host, rtol=0, atol=PIXEL_ATOL / min(info.std))


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
def test_device_views_equal_host_views(info, case):
    kind, name = case.split()
    aug = {"only": only, "without": without, "preset": preset}[kind](name, info)
    host, device = host_and_device_views(aug, info)
    assert_same_views(device, host, info)
    if kind == "only":
        # The op really ran: the views are far (in grey levels) from the un-augmented images.
        plain, _ = host_and_device_views(preset("none", info), info)
        assert np.abs(host - plain).max() * min(info.std) > 0.05


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
def test_device_eval_images_equal_host_preprocessing(info, image_size):
    images = make_images(info, batch_size=4)
    host = augment.eval_preprocess(images, info, image_size).numpy()
    device = np.asarray(device_augment.eval_images(images, info, image_size))
    assert_same_views(device, host, info)


def shipped_batch(info, aug, batch_size: int = 16):
    images = make_images(info, batch_size)
    return {
        "image": images,
        "view1_params": augment.view_params(5, 2, 0, batch_size, info.image_size, aug),
        "view2_params": augment.view_params(5, 2, 1, batch_size, info.image_size, aug),
        "label": np.arange(batch_size, dtype=np.int32) % info.num_classes,
    }


def test_pmapped_pair_on_8_devices_equals_one_device():
    # Each device holds a slice of the batch, as each host does: its rows must be the same.
    aug = preset("simclr", CIFAR)
    batch = shipped_batch(CIFAR, aug)
    single = device_augment.augment_pair(batch, aug, CIFAR)
    per_device = jax.tree_util.tree_map(lambda x: x.reshape(8, -1, *x.shape[1:]), batch)
    spread = device_augment.pmap_augment_pair(aug, CIFAR)(per_device)
    np.testing.assert_array_equal(np.asarray(spread["label"]).reshape(-1), batch["label"])
    for key in ("view1", "view2"):
        chex.assert_shape(spread[key], (8, 2, *single[key].shape[1:]))
        # Not bitwise: XLA vectorises a batch of 2 differently from one of 16.
        assert_same_views(np.asarray(spread[key]).reshape(single[key].shape), single[key], CIFAR)
    assert np.abs(np.asarray(single["view1"]) - np.asarray(single["view2"])).max() > 0.1


def test_float_images_or_mismatched_parameters_are_refused():
    aug = preset("simclr", CIFAR)
    batch = shipped_batch(CIFAR, aug, batch_size=4)
    with pytest.raises(ValueError, match="takes uint8 images.*got float32"):
        device_augment.augment_views(
            batch["image"].astype(np.float32), batch["view1_params"], aug, CIFAR
        )
    with pytest.raises(
        ValueError, match="shape \\(batch, 32, 32, 3\\).*got uint8 \\(4, 8, 8, 1\\)"
    ):
        device_augment.eval_images(make_images(DIGITS, 4), CIFAR)
    short = augment.slice_params(batch["view1_params"], 0, 3)
    with pytest.raises(ValueError, match="parameters must be augment.view_params rows"):
        device_augment.augment_views(batch["image"], short, aug, CIFAR)


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
    from hscl_jax.data import augment, device_augment

    info = data.dataset_info("cifar10")
    aug = augment.resolve_augmentation(data.augmentation_config("simclr"), info)
    images = np.zeros((2, 4, 32, 32, 3), np.uint8)
    params = [
        augment.view_params(0, 0, view, 8, 32, aug) for view in (0, 1)
    ]
    per_device = [{k: v.reshape(2, 4, *v.shape[1:]) for k, v in p.items()} for p in params]
    batch = {"image": images, "view1_params": per_device[0], "view2_params": per_device[1],
             "label": np.zeros((2, 4), np.int32)}
    views = device_augment.pmap_augment_pair(aug, info, jax.local_devices()[:2])(batch)
    assert views["view1"].shape == (2, 4, 32, 32, 3), views["view1"].shape
    assert views["view1"].dtype == np.float32
    assert device_augment.eval_images(images[0], info, 16).shape == (4, 16, 16, 3)
    loaded = sorted(m for m in sys.modules if m.split(".")[0].startswith("tensorflow"))
    assert not loaded, loaded
    print("device augmentation ran without TensorFlow")
    """
)


def test_device_path_runs_with_tensorflow_blocked():
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
    assert "device augmentation ran without TensorFlow" in done.stdout


# ----------------------------------------------------------------------------- the pipeline side


@pytest.fixture(scope="module")
def digits_configs(tmp_path_factory):
    """Digits data configs, host and device augmentation, with flip, blur and jitter on too."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    configs = {}
    for where in data.AUGMENT_ON:
        config = data.default_data_config("digits")
        config.data_dir = data_dir
        config.num_workers = 1
        config.augment_on = where
        config.augmentation.update(
            {"flip": True, "blur": True, "color_jitter": True, "saturation": 0.0, "hue": 0.0}
        )
        configs[where] = config
    return configs


def test_device_stream_ships_uint8_and_the_step_side_makes_the_host_views(digits_configs):
    devices = jax.local_devices()[:2]
    stream = {
        where: data.train_iterator(
            config, global_batch_size=16, seed=3, start_step=5, num_local_devices=2
        )
        for where, config in digits_configs.items()
    }
    host, shipped = next(stream["host"]), next(stream["device"])
    assert set(shipped) == {"image", "view1_params", "view2_params", "label"}
    assert shipped["image"].dtype == np.uint8 and shipped["image"].shape == (2, 8, 8, 8, 1)
    assert shipped["view1_params"]["boxes"].shape == (2, 8, 4)
    np.testing.assert_array_equal(shipped["label"], host["label"])
    assert data.device_augmentation(digits_configs["host"]) is None
    views = jax.pmap(data.device_augmentation(digits_configs["device"]), devices=devices)(shipped)
    outside_the_step = data.stream_views(shipped, digits_configs["device"])
    assert data.stream_views(host, digits_configs["host"]) is host
    for key in ("view1", "view2"):
        assert_same_views(np.asarray(views[key]), host[key], DIGITS)
        assert_same_views(outside_the_step[key], host[key], DIGITS)

    evals = {
        where: next(data.eval_iterator(config, split="test", batch_size=64, num_local_devices=2))
        for where, config in digits_configs.items()
    }
    assert evals["device"]["image"].dtype == np.uint8
    assert data.device_eval_preprocess(digits_configs["host"]) is None
    preprocess = data.device_eval_preprocess(digits_configs["device"], devices)
    images = np.asarray(preprocess(evals["device"]["image"]))
    assert_same_views(images, evals["host"]["image"], DIGITS)


def test_unknown_augment_on_is_refused_in_one_line(digits_configs):
    config = digits_configs["device"].copy_and_resolve_references()
    config.augment_on = "gpu"
    expected = "Unknown data.augment_on 'gpu'; expected one of host, device."
    with pytest.raises(ValueError, match=expected):
        data.train_iterator(config, global_batch_size=16, seed=0, num_local_devices=1)
    with pytest.raises(ValueError, match=expected):
        data.device_augmentation(config)
    synthetic = data.default_data_config("synthetic")
    synthetic.augment_on = "device"
    assert data.device_augmentation(synthetic) is None  # no augmentation to move
