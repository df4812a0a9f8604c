"""Input pipeline: datasets, samplers, streams, restart, the split over hosts and devices."""

from __future__ import annotations

import glob
import math
import os
import socket
import subprocess
import sys
import tempfile

import chex
import jax
import numpy as np
import pytest

from hscl_jax import data
from hscl_jax.data import samplers

DIGITS = data.dataset_info("digits")


def views_of(batch, config):
    """The two views (numpy) the train step makes of a training batch."""
    return [np.asarray(v) for v in data.augment_views(batch, data.augmentation_for(config))]


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory):
    """Digits config whose data dir is built once for this module."""
    config = data.default_data_config("digits")
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.num_workers = 2
    return config


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def read_whole_split(records) -> dict[str, np.ndarray]:
    """A small split's {"image", "label"} arrays, read record by record."""
    examples = [records[index] for index in range(len(records))]
    return {
        key: np.stack([np.asarray(example[key]) for example in examples])
        for key in ("image", "label")
    }


def digits_arrays(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from hscl_jax.data.tfds_source import open_split

    arrays = read_whole_split(open_split(DIGITS, data_dir, split))
    return arrays["image"], arrays["label"]


def assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        chex.assert_trees_all_equal(a, b)


# ----------------------------------------------------------------------------- metadata, config


def test_dataset_info_and_unknown_name(tmp_path, no_network):
    cifar100 = data.dataset_info("cifar100")
    assert (cifar100.num_classes, cifar100.crop_size, cifar100.channels) == (100, 32, 3)
    stl10 = data.dataset_info("stl10")
    assert (stl10.image_size, stl10.crop_size, stl10.train_split) == (96, 32, "train")
    # The reference normalises every paper dataset with the CIFAR statistics.
    assert stl10.mean == cifar100.mean == data.dataset_info("cifar10").mean
    assert DIGITS.grayscale and DIGITS.mean != stl10.mean
    with pytest.raises(
        data.DatasetNotPreparedError,
        match=rf"Dataset 'imagenet' is not one of digits, .* and is not prepared in {tmp_path}: "
        rf"prepare your own images with `python -m hscl_jax.data.prepare --image_folder=ROOT "
        rf"--name=imagenet --data_dir={tmp_path}`",
    ):
        data.dataset_info("imagenet", str(tmp_path))
    assert not list(tmp_path.iterdir())  # nothing written, nothing downloaded


def test_default_configs_pick_the_matching_augmentation():
    digits = data.augmentation_for(data.default_data_config())
    assert not (digits.color_jitter_prob or digits.grayscale_prob or digits.flip_prob)
    assert digits.crop and digits.crop_scale == (0.6, 1.0) and digits.channels == 1
    # The same config on another dataset follows that dataset's preset.
    config = data.default_data_config()
    config.name = "cifar10"
    cifar = data.augmentation_for(config)
    assert cifar.crop_scale == (0.08, 1.0) and cifar.flip_prob == 0.5
    jitter = (cifar.brightness, cifar.contrast, cifar.saturation, cifar.hue)
    assert jitter == (0.4, 0.4, 0.4, 0.1) and cifar.color_jitter_prob == 0.8
    assert (cifar.grayscale_prob, cifar.blur_prob, cifar.blur_sigma) == (0.2, 0.5, (0.1, 2.0))
    assert (cifar.image_size, cifar.crop_size, cifar.blur_kernel_size) == (32, 32, 3)


def test_a_config_that_still_sets_a_removed_field_gets_one_line(tmp_path, caplog):
    import json
    import logging

    from hscl_jax import config as config_lib

    why = "augmentation always runs in the train step, in JAX on the device"
    config = data.default_data_config()
    config.augment_on = "host"  # as a config file written for an earlier version would
    with pytest.raises(data.DataError) as error:
        data.check_config(config)
    assert str(error.value) == f"config.data.augment_on was removed: {why}; delete the setting."
    # An earlier run's config.json loads (evaluate, analysis), losing the field with one line.
    saved = config_lib.to_json_ready(config_lib.base_config("digits"))
    saved["data"]["augment_on"] = "device"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING):
        loaded = config_lib.load_config(str(tmp_path))
    assert "augment_on" not in loaded.data and loaded.data.name == "digits"
    (line,) = [r.getMessage() for r in caplog.records if "augment_on" in r.getMessage()]
    assert line.endswith(f"dropped fields this version no longer has: data.augment_on ({why})")


def test_the_package_loads_its_modules_on_first_use():
    script = (
        "import sys\n"
        "import hscl_jax.data.prepare\n"
        "assert 'jax' not in sys.modules, 'preparing data imported JAX'\n"
        "from hscl_jax import data\n"
        "assert data.__all__ == sorted(data._EXPORTS)\n"
        "for name in data.__all__:\n"
        "    getattr(data, name)\n"
        "assert data.pipeline.train_iterator is data.train_iterator\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------- samplers


def test_shuffle_epochs_are_permutations_without_the_last_partial_batch():
    plan = samplers.shuffle_epoch(103, 10, seed=3, epoch=0)
    assert plan.shape == (10, 10)
    assert len(np.unique(plan)) == 100 and plan.max() < 103
    np.testing.assert_array_equal(plan, samplers.shuffle_epoch(103, 10, seed=3, epoch=0))
    assert not np.array_equal(plan, samplers.shuffle_epoch(103, 10, seed=3, epoch=1))
    assert not np.array_equal(plan, samplers.shuffle_epoch(103, 10, seed=4, epoch=0))


def _unbalanced_labels():
    sizes = [30, 25, 40, 12, 33, 28, 50, 19, 22, 41]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return np.random.default_rng(0).permutation(labels), sizes


def test_class_balanced_batches_hold_p_classes_times_k_without_replacement():
    labels, sizes = _unbalanced_labels()
    num_classes_per_batch, per_class = 4, 5
    indexer = samplers.BatchIndexer(
        num_examples=len(labels),
        labels=labels,
        sampler="class_balanced",
        batch_size=20,
        seed=1,
        classes_per_batch=num_classes_per_batch,
        samples_per_class=per_class,
    )
    plan = indexer.epoch_plan(0)
    assert plan.shape == (indexer.steps_per_epoch, 20) == (15, 20)
    for row in plan:
        classes, counts = np.unique(labels[row], return_counts=True)
        assert len(classes) == num_classes_per_batch and set(counts) == {per_class}
    # Classes without replacement: 5 batches of 4 = 20 slots = every class exactly twice.
    first_slots = np.concatenate([np.unique(labels[row]) for row in plan[:5]])
    np.testing.assert_array_equal(np.bincount(first_slots, minlength=10), np.full(10, 2))
    # Examples without replacement inside their class: no example repeats before its class has
    # been used up.
    draws = np.bincount(labels[plan.ravel()], minlength=10)
    uses = np.bincount(plan.ravel(), minlength=len(labels))
    for index, label in enumerate(labels):
        assert uses[index] <= math.ceil(draws[label] / sizes[label])
    # Within-batch order is shuffled, so any device's slice mixes classes.
    assert len(np.unique(labels[plan[0, :5]])) > 1


def test_class_balanced_errors():
    labels, _ = _unbalanced_labels()

    def indexer(batch_size, classes_per_batch, samples_per_class):
        return samplers.BatchIndexer(
            num_examples=len(labels),
            labels=labels,
            sampler="class_balanced",
            batch_size=batch_size,
            seed=0,
            classes_per_batch=classes_per_batch,
            samples_per_class=samples_per_class,
        )

    with pytest.raises(ValueError, match=r"samples_per_class 13 exceeds the smallest class \(lab"):
        indexer(26, 2, 13)
    with pytest.raises(ValueError, match="classes_per_batch 11 exceeds the 10 classes"):
        indexer(22, 11, 2)
    with pytest.raises(
        ValueError, match=r"\(3\) x samples_per_class \(5\) = 15 must equal the glo"
    ):
        indexer(16, 3, 5)
    with pytest.raises(ValueError, match="classes_per_batch must be >= 2"):
        indexer(5, 0, 5)
    with pytest.raises(ValueError, match="samples_per_class must be >= 1, got 0"):
        indexer(5, 5, 0)
    with pytest.raises(ValueError, match="Unknown sampler 'random'"):
        samplers.BatchIndexer(num_examples=300, sampler="random", batch_size=4, seed=0)
    with pytest.raises(ValueError, match="global_batch_size 400 exceeds the 300 training examples"):
        samplers.BatchIndexer(num_examples=300, sampler="shuffle", batch_size=400, seed=0)
    with pytest.raises(ValueError, match="class_balanced sampler needs the labels of all 300"):
        samplers.BatchIndexer(num_examples=300, sampler="class_balanced", batch_size=4, seed=0)


# ----------------------------------------------------------------------------- synthetic (no TF)


def test_synthetic_source_never_imports_tensorflow():
    script = (
        "import sys\n"
        "from hscl_jax import data\n"
        "config = data.default_data_config('synthetic')\n"
        "batch = next(data.train_iterator(config, global_batch_size=32, seed=0,"
        " num_local_devices=1))\n"
        "assert batch['image'].shape == (1, 32, 32, 32, 3), batch['image'].shape\n"
        "evaluation = list(data.eval_iterator(config, split='test', batch_size=512,"
        " num_local_devices=1))\n"
        "assert sum(int(b['mask'].sum()) for b in evaluation) == 1024\n"
        "leaked = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', "
        "'tensorflow_datasets')]\n"
        "assert not leaked, leaked[:5]\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_synthetic_stream_has_the_one_batch_layout_and_device_split():
    config = data.default_data_config("synthetic")
    batch = next(data.train_iterator(config, global_batch_size=64, seed=0))
    chex.assert_shape(batch["image"], (8, 8, 32, 32, 3))
    chex.assert_shape(batch["label"], (8, 8))
    chex.assert_shape(batch["view1_params"]["boxes"], (8, 8, 4))
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
    view1, view2 = views_of(batch, config)
    chex.assert_shape([view1, view2], (8, 8, 32, 32, 3))
    assert np.abs(view1 - view2).max() > 0.1  # SimCLR views of the same images
    assert data.steps_per_epoch(config, 256) == 4096 // 256


def test_batch_must_divide_over_devices_and_hosts(monkeypatch):
    config = data.default_data_config("synthetic")
    with pytest.raises(ValueError, match=r"global_batch_size 100 must be a positive multiple of "):
        data.train_iterator(config, global_batch_size=100, seed=0, num_local_devices=8)
    with pytest.raises(ValueError, match=r"num_local_devices must be in \[1, 8\]"):
        data.train_iterator(config, global_batch_size=64, seed=0, num_local_devices=9)
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match=r"process_count \(3\) x local devices \(2\) = 6"):
        data.eval_iterator(config, split="test", batch_size=64, num_local_devices=2)


def test_bad_arguments_are_rejected():
    config = data.default_data_config("synthetic")
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        data.train_iterator(config, global_batch_size=32, seed=-1)
    with pytest.raises(ValueError, match="start_step must be a non-negative integer, got -2"):
        data.train_iterator(config, global_batch_size=32, seed=0, start_step=-2)
    with pytest.raises(ValueError, match="Unknown split 'validation' for synthetic"):
        data.eval_iterator(config, split="validation", batch_size=32)
    bad = data.default_data_config("synthetic")
    bad.sampler = "stratified"
    with pytest.raises(ValueError, match="Unknown sampler 'stratified'"):
        data.steps_per_epoch(bad, 32)
    bad = data.default_data_config("synthetic")
    bad.num_workers = -1
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        data.steps_per_epoch(bad, 32)
    with pytest.raises(ValueError, match="prefetch size must be >= 1, got 0"):
        next(data.prefetch_to_device(iter([]), size=0))


def test_restart_and_host_split_synthetic_class_balanced(monkeypatch):
    config = data.default_data_config("synthetic")
    config.sampler = "class_balanced"
    config.samples_per_class = 8
    stream = take(
        data.train_iterator(config, global_batch_size=64, seed=5, num_local_devices=2), 20
    )
    # 4096 / 64 = 64 steps per epoch; restart in the middle of the epoch.
    resumed = data.train_iterator(
        config, global_batch_size=64, seed=5, start_step=17, num_local_devices=2
    )
    assert_batches_equal(stream[17:], take(resumed, 3))
    for batch in stream:
        _, counts = np.unique(batch["label"], return_counts=True)
        assert len(counts) == 8 and set(counts) == {8}
    # Two hosts with one device each see the two halves of the one-host batch.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    halves = []
    for host in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        it = data.train_iterator(config, global_batch_size=64, seed=5, num_local_devices=1)
        halves.append(next(it))
    for key in ("image", "label"):
        joined = np.concatenate([halves[0][key], halves[1][key]], axis=1)
        np.testing.assert_array_equal(joined[0], stream[0][key].reshape(joined[0].shape))
    joined = np.concatenate([h["view2_params"]["boxes"] for h in halves], axis=1)
    np.testing.assert_array_equal(joined[0], stream[0]["view2_params"]["boxes"].reshape(64, 4))


def test_prefetch_to_device_feeds_pmap():
    config = data.default_data_config("synthetic")
    stream = data.train_iterator(config, global_batch_size=64, seed=0, num_local_devices=8)
    host = next(data.train_iterator(config, global_batch_size=64, seed=0, num_local_devices=8))
    device_batches = data.prefetch_to_device(stream, size=2)
    batch = next(device_batches)
    assert isinstance(batch["image"], jax.Array)
    assert len(batch["image"].sharding.device_set) == 8
    totals = jax.pmap(lambda x: jax.lax.psum(x.sum(), "i"), axis_name="i")(batch["label"])
    np.testing.assert_array_equal(np.asarray(totals), np.full(8, host["label"].sum()))
    one = data.train_iterator(config, global_batch_size=16, seed=0, num_local_devices=1)
    single = next(data.prefetch_to_device(one))
    assert single["label"].devices() == {jax.local_devices()[0]}


# ----------------------------------------------------------------------------- digits (TFDS)


def test_digits_builder_builds_offline_fast_with_a_fixed_split(tmp_path, no_network):
    import tensorflow_datasets as tfds

    from hscl_jax.data.digits_builder import prepare_digits

    stray = os.path.join(tempfile.gettempdir(), "tmp*tfds")
    before = set(glob.glob(stray))
    builder = prepare_digits(str(tmp_path))
    assert builder.is_prepared()
    # TFDS makes an empty folder in the temporary directory for a builder whose dataset is not
    # prepared yet, and never removes it; the build leaves none behind.
    assert set(glob.glob(stray)) == before
    assert {f.value for f in builder.info.available_file_formats()} == {"array_record"}
    # Registered under its name like any catalogue dataset, and read by random access.
    splits = {
        split: read_whole_split(
            tfds.data_source("digits", split=split, data_dir=str(tmp_path), download=False)
        )
        for split in ("train", "test")
    }
    assert len(splits["train"]["label"]) == DIGITS.num_train
    assert len(splits["test"]["label"]) == DIGITS.num_test
    train_images = splits["train"]["image"]
    assert train_images.dtype == np.uint8 and train_images.shape[1:] == (8, 8, 1)
    assert train_images.max() == 255
    # Stratified: every class keeps ~20% of its examples for the test split.
    test_counts = np.bincount(splits["test"]["label"], minlength=10)
    assert test_counts.min() >= 34 and test_counts.max() <= 37
    # The declared normalisation statistics are those of the train split.
    pixels = train_images / 255.0
    assert abs(pixels.mean() - DIGITS.mean[0]) < 1e-3 and abs(pixels.std() - DIGITS.std[0]) < 1e-3
    # The split is fixed: a second build elsewhere gives the same test set.
    again = read_whole_split(prepare_digits(str(tmp_path / "again")).as_data_source("test"))
    np.testing.assert_array_equal(
        np.sort(again["image"].reshape(len(again["image"]), -1), axis=0),
        np.sort(splits["test"]["image"].reshape(DIGITS.num_test, -1), axis=0),
    )


def test_digits_train_stream_shapes_ranges_determinism_and_restart(digits_config):
    def stream(seed, start_step=0):
        return data.train_iterator(
            digits_config,
            global_batch_size=256,
            seed=seed,
            start_step=start_step,
            num_local_devices=2,
        )

    # 1438 // 256 = 5 steps per epoch: steps 0..7 cross an epoch boundary.
    assert data.steps_per_epoch(digits_config, 256) == 5
    batches = take(stream(seed=0), 8)
    batch = batches[0]
    chex.assert_shape(batch["image"], (2, 128, 8, 8, 1))
    chex.assert_shape(batch["label"], (2, 128))
    assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
    views = views_of(batch, digits_config)
    chex.assert_shape(views, (2, 128, 8, 8, 1))
    low = (0.0 - DIGITS.mean[0]) / DIGITS.std[0]
    high = (1.0 - DIGITS.mean[0]) / DIGITS.std[0]
    for view in views:
        assert view.dtype == np.float32
        assert low - 1e-4 <= view.min() and view.max() <= high + 1e-4
    assert set(np.unique(batch["label"])) <= set(range(10))
    differs = np.abs(views[0] - views[1]).reshape(256, -1).max(axis=1) > 1e-3
    assert differs.mean() > 0.8
    assert_batches_equal(batches[:2], take(stream(seed=0), 2))
    other_seed = next(stream(seed=1))
    assert not np.array_equal(batch["image"], other_seed["image"])
    assert not np.array_equal(batch["view1_params"]["boxes"], other_seed["view1_params"]["boxes"])
    assert_batches_equal(batches[4:], take(stream(seed=0, start_step=4), 4))


def test_digits_views_keep_their_image_and_label(digits_config):
    """With augmentation off, every view is a stored train image carrying its own label."""
    config = digits_config.copy_and_resolve_references()
    config.augmentation = data.augmentation_config("none")
    config.sampler = "class_balanced"
    config.samples_per_class = 16
    images, labels = digits_arrays(config.data_dir, "train")
    batch = next(data.train_iterator(config, global_batch_size=160, seed=2, num_local_devices=1))
    view1, view2 = views_of(batch, config)
    np.testing.assert_array_equal(view1, view2)
    stored = ((images / 255.0 - DIGITS.mean[0]) / DIGITS.std[0]).reshape(len(images), -1)
    views = view1[0].reshape(160, -1)
    distances = ((views[:, None, :] - stored[None, :, :]) ** 2).sum(-1)
    nearest = distances.argmin(axis=1)
    assert distances.min(axis=1).max() < 1e-6
    np.testing.assert_array_equal(labels[nearest], batch["label"][0])
    _, counts = np.unique(batch["label"], return_counts=True)
    assert len(counts) == 10 and set(counts) == {16}


def test_digits_eval_stream_covers_every_example_once(digits_config):
    images, labels = digits_arrays(digits_config.data_dir, "test")
    batches = list(
        data.eval_iterator(digits_config, split="test", batch_size=64, num_local_devices=2)
    )
    assert len(batches) == math.ceil(DIGITS.num_test / 64)
    chex.assert_shape(batches[0]["image"], (2, 32, 8, 8, 1))
    masks = np.concatenate([b["mask"].reshape(-1) for b in batches])
    assert masks.sum() == DIGITS.num_test and not masks[DIGITS.num_test :].any()
    seen = np.concatenate([b["image"].reshape(64, -1) for b in batches])[masks]
    assert seen.dtype == np.uint8
    np.testing.assert_array_equal(seen, images.reshape(len(images), -1))
    seen_labels = np.concatenate([b["label"].reshape(-1) for b in batches])[masks]
    np.testing.assert_array_equal(seen_labels, labels)


def test_bad_augmentation_options(digits_config):
    config = digits_config.copy_and_resolve_references()
    config.augmentation.grayscale = True
    with pytest.raises(data.DataError, match="need RGB images, but digits has 1 channel"):
        data.train_iterator(config, global_batch_size=64, seed=0, num_local_devices=1)
    config = digits_config.copy_and_resolve_references()
    config.augmentation.crop_scale = (0.9, 0.5)
    with pytest.raises(data.DataError, match=r"augmentation.crop_scale must be \(min, max\)"):
        data.train_iterator(config, global_batch_size=64, seed=0, num_local_devices=1)
    config = data.default_data_config("cifar10")
    config.augmentation.blur = True
    config.augmentation.blur_prob = 1.5
    with pytest.raises(
        data.DataError, match=r"blur_prob must be a probability in \[0, 1\], got 1.5"
    ):
        data.check_config(config)
    config.augmentation.blur_prob = 0.5
    with config.augmentation.unlocked():
        config.augmentation.solarize = True
    with pytest.raises(data.DataError, match=r"Unknown augmentation option\(s\) \['solarize'\]"):
        data.augmentation_for(config)
    config = data.default_data_config("cifar10")
    config.augmentation.preset = "fancy"
    with pytest.raises(data.DataError, match="Unknown augmentation preset 'fancy'; expected one "):
        data.check_config(config)


# ----------------------------------------------------------------------------- paper datasets


def test_unprepared_dataset_fails_at_once_with_instructions(tmp_path, no_network):
    config = data.default_data_config("cifar10")
    config.data_dir = str(tmp_path)
    with pytest.raises(data.DatasetNotPreparedError, match=r"tfds build cifar10 --data_dir=/"):
        data.train_iterator(config, global_batch_size=64, seed=0, num_local_devices=1)
    assert not (tmp_path / "downloads").exists()


MOCK_EXAMPLES = 48


class RandomRecords:
    """A split of random examples with a dataset's true shapes, read by index like tfds's
    ArrayRecord data source; `reads` lists the indices whose image was decoded, in order."""

    def __init__(self, image_shape, num_classes: int, split: str, decode_images: bool):
        rng = np.random.default_rng(len(str(split)))
        self.images = rng.integers(0, 256, size=(MOCK_EXAMPLES, *image_shape), dtype=np.uint8)
        self.labels = rng.integers(0, num_classes, size=MOCK_EXAMPLES)
        self.decode_images = decode_images
        self.reads = []

    def __len__(self):
        return MOCK_EXAMPLES

    def __getitem__(self, index):
        if not self.decode_images:
            return {"image": b"png bytes", "label": self.labels[index]}
        self.reads.append(index)
        return {"image": self.images[index], "label": self.labels[index]}


def random_sources(opened: list | None = None):
    """tfds.testing.mock_data's `as_data_source_fn`, serving RandomRecords; appends each opened
    split's records to `opened`."""

    def as_data_source(builder, split, decoders=None, **kwargs):
        del kwargs
        features = builder.info.features
        records = RandomRecords(
            features["image"].shape,
            features["label"].num_classes,
            split,
            decode_images=decoders is None,
        )
        if opened is not None:
            opened.append(records)
        return records

    return as_data_source


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_paper_datasets_through_mocked_tfds(name, tmp_path):
    import tensorflow_datasets as tfds

    info = data.dataset_info(name)
    config = data.default_data_config(name)
    config.data_dir = str(tmp_path)
    with tfds.testing.mock_data(as_data_source_fn=random_sources()):
        batch = next(data.train_iterator(config, global_batch_size=16, seed=0, num_local_devices=2))
        evaluation = list(
            data.eval_iterator(config, split="test", batch_size=32, num_local_devices=2)
        )
    chex.assert_shape(batch["image"], (2, 8, info.image_size, info.image_size, 3))
    view1, view2 = views_of(batch, config)
    chex.assert_shape([view1, view2], (2, 8, 32, 32, 3))  # STL-10: 32 px crops of 96 px images
    assert batch["label"].max() < info.num_classes
    assert not np.array_equal(view1, view2)
    # SimCLR ops keep pixels in [0, 1] before the CIFAR normalisation.
    mean, std = np.array(info.mean), np.array(info.std)
    assert view1.min() >= (0 - mean.max()) / std.min() - 1e-4
    assert view1.max() <= (1 - mean.min()) / std.min() + 1e-4
    assert len(evaluation) == 2 and sum(int(b["mask"].sum()) for b in evaluation) == MOCK_EXAMPLES
    # Evaluation keeps the stored size by default (STL-10: 96 px, as the reference).
    chex.assert_shape(evaluation[0]["image"], (2, 16, info.image_size, info.image_size, 3))


def test_stl10_eval_resize(tmp_path):
    import tensorflow_datasets as tfds

    config = data.default_data_config("stl10")
    config.data_dir = str(tmp_path)
    config.eval_image_size = 32
    with tfds.testing.mock_data(as_data_source_fn=random_sources()):
        batch = next(data.eval_iterator(config, split="train", batch_size=16, num_local_devices=1))
    chex.assert_shape(batch["image"], (1, 16, 96, 96, 3))  # stored size; resized on the device
    chex.assert_shape(data.eval_preprocessing(config)(batch["image"]), (1, 16, 32, 32, 3))


def test_default_mock_data_policy(tmp_path):
    """tfds.testing.mock_data with its own random ArrayRecord data source."""
    import tensorflow_datasets as tfds

    config = data.default_data_config("cifar10")
    config.data_dir = str(tmp_path)
    with tfds.testing.mock_data(num_examples=40):
        assert data.steps_per_epoch(config, 16) == 2
        batch = next(data.train_iterator(config, global_batch_size=16, seed=0, num_local_devices=1))
    chex.assert_shape(batch["image"], (1, 16, 32, 32, 3))


# ----------------------------------------------------------------------------- streaming source


def test_each_process_reads_only_its_slice_of_the_global_batch(tmp_path):
    import tensorflow_datasets as tfds

    config = data.default_data_config("cifar10")
    config.data_dir = str(tmp_path)
    config.num_workers = 1  # one step at a time, so the reads come in step order
    config.prefetch_batches = 1
    opened = []
    seed = 3
    global_batch = 16
    # 48 examples / 16 = 3 steps per epoch: each process's slices over an epoch are disjoint.
    plan = samplers.shuffle_epoch(MOCK_EXAMPLES, global_batch, seed=seed, epoch=0)
    with tfds.testing.mock_data(as_data_source_fn=random_sources(opened)):
        stream = data.train_iterator(
            config, global_batch_size=global_batch, seed=seed, num_local_devices=2
        )
        whole = next(stream)
        stream.close()
        train_records = opened[-1]
        halves = []
        for process in (0, 1):
            train_records.reads.clear()
            stream = data.train_iterator(
                config,
                global_batch_size=global_batch,
                seed=seed,
                num_local_devices=1,
                process_index=process,
                process_count=2,
            )
            halves.append(next(stream))
            stream.close()
            reads = list(train_records.reads)
            slices = plan[:, process * 8 : (process + 1) * 8]
            steps_read = len(reads) // 8
            assert len(reads) % 8 == 0 and 1 <= steps_read <= 3, reads
            np.testing.assert_array_equal(reads, slices[:steps_read].ravel())
    # The two processes' batches are the halves of the one-process batch.
    for part in ("image", "label", ("view1_params", "boxes"), ("view2_params", "flip")):
        key, leaf = part if isinstance(part, tuple) else (part, None)

        def pick(batch, key=key, leaf=leaf):
            return batch[key] if leaf is None else batch[key][leaf]

        joined = np.concatenate([pick(halves[0]), pick(halves[1])], axis=0)
        np.testing.assert_array_equal(joined, pick(whole))
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\), got 2"):
        data.eval_iterator(config, split="test", batch_size=16, process_index=2, process_count=2)


def test_class_balanced_labels_are_read_without_decoding_images(tmp_path):
    import tensorflow_datasets as tfds

    from hscl_jax.data import tfds_source

    config = data.default_data_config("cifar10")
    config.data_dir = str(tmp_path)
    config.sampler = "class_balanced"
    config.samples_per_class = 2
    config.num_workers = 1  # one step at a time, so the reads come in step order
    opened = []
    with tfds.testing.mock_data(as_data_source_fn=random_sources(opened)):
        tfds_source.clear_cache()
        batch = next(data.train_iterator(config, global_batch_size=8, seed=0, num_local_devices=1))
        # The labels are memoised: a second stream does not scan them again.
        data.train_iterator(config, global_batch_size=8, seed=1, num_local_devices=1)
        tfds_source.clear_cache()
    label_scans = [records for records in opened if not records.decode_images]
    assert len(label_scans) == 1 and label_scans[0].reads == []
    _, counts = np.unique(batch["label"], return_counts=True)
    assert len(counts) == 4 and set(counts) == {2}
    # Each label in the batch is the label of the record it was read from.
    train = next(records for records in opened if records.decode_images)
    np.testing.assert_array_equal(
        np.sort(train.labels[train.reads[:8]]), np.sort(batch["label"].ravel())
    )


@pytest.fixture
def absl_flags_parsed():
    """Grain's worker processes need absl flags parsed, as train.py's absl.app.run does."""
    from absl import flags

    was_parsed = flags.FLAGS.is_parsed()
    if not was_parsed:
        flags.FLAGS.mark_as_parsed()
    yield
    if not was_parsed:
        flags.FLAGS.unparse_flags()


@pytest.mark.slow
def test_decode_workers_give_the_batches_of_in_process_decoding(digits_config, absl_flags_parsed):
    def batches(decode_workers, start_step=0, count=4):
        config = digits_config.copy_and_resolve_references()
        config.decode_workers = decode_workers
        stream = data.train_iterator(
            config, global_batch_size=64, seed=4, start_step=start_step, num_local_devices=2
        )
        taken = take(stream, count)
        stream.close()
        return taken

    in_process = batches(decode_workers=0)
    assert_batches_equal(in_process, batches(decode_workers=2))
    assert_batches_equal(in_process[2:], batches(decode_workers=2, start_step=2, count=2))


def test_decode_workers_need_parsed_absl_flags(digits_config):
    from absl import flags

    if flags.FLAGS.is_parsed():
        pytest.skip("absl flags were parsed by the test runner")
    config = digits_config.copy_and_resolve_references()
    config.decode_workers = 2
    with pytest.raises(ValueError, match=r"decode_workers=2 starts Grain worker processes, which"):
        data.train_iterator(config, global_batch_size=64, seed=0, num_local_devices=1)
    config.decode_workers = -1
    with pytest.raises(ValueError, match=r"decode_workers must be >= 0"):
        data.steps_per_epoch(config, 64)


def test_digits_prepared_by_earlier_versions_still_work(tmp_path, caplog):
    import logging

    import tensorflow_datasets as tfds

    from hscl_jax.data.digits_builder import Digits, prepare_digits

    skip_stats = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    # This version written as TFRecord (e.g. by hand with `tfds build`): rebuilt as ArrayRecord.
    Digits(data_dir=str(tmp_path / "a"), file_format="tfrecord").download_and_prepare(
        download_config=skip_stats
    )
    with caplog.at_level(logging.INFO):
        rebuilt = prepare_digits(str(tmp_path / "a"))
    assert {f.value for f in rebuilt.info.available_file_formats()} == {"array_record"}
    assert (
        "is stored as tfrecord, not array_record (needed for random access): rebuil" in caplog.text
    )
    config = data.default_data_config("digits")
    config.data_dir = str(tmp_path / "a")
    assert data.steps_per_epoch(config, 64) == DIGITS.num_train // 64
    # Version 1.0.0 left by earlier hscl_jax (TFRecord): kept, and 1.1.0 built next to it.
    old = tmp_path / "b" / "digits"
    old.mkdir(parents=True)
    (tmp_path / "a" / "digits" / "1.1.0").rename(old / "1.0.0")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        built = prepare_digits(str(tmp_path / "b"))
    assert "Found digits 1.0.0 in" in caplog.text and "building version 1.1.0" in caplog.text
    assert (old / "1.0.0").is_dir() and built.data_path.name == "1.1.0"
    assert {f.value for f in built.info.available_file_formats()} == {"array_record"}


def test_any_prepared_tfds_dataset_streams_by_name_and_tfrecord_files_are_refused(tmp_path):
    """A TFDS dataset of PNG images that the package knows nothing of, read by its name with its
    metadata from its files; and the fix for one stored as TFRecord."""
    import random_images_builder as random_images
    import tensorflow_datasets as tfds

    name = random_images.prepare_random_images(48, 16, str(tmp_path / "ok")).info.full_name
    name = name.rsplit("/", 1)[0]  # without the version
    config = data.default_data_config()
    config.name, config.data_dir = name, str(tmp_path / "ok")
    info = data.dataset_info(name, config.data_dir)
    assert (info.image_size, info.channels, info.num_classes) == (16, 3, 10)
    assert (info.num_train, info.num_test, info.variable_size) == (48, 12, False)
    batch = next(data.train_iterator(config, global_batch_size=16, seed=0, num_local_devices=2))
    chex.assert_shape(views_of(batch, config), (2, 8, 16, 16, 3))
    evaluation = list(data.eval_iterator(config, split="train", batch_size=16))
    stored = read_whole_split(
        tfds.data_source(name, split="train", data_dir=config.data_dir, download=False)
    )
    seen = np.concatenate([b["image"].reshape(-1, 16, 16, 3) for b in evaluation])
    np.testing.assert_array_equal(seen, stored["image"])
    np.testing.assert_array_equal(
        np.concatenate([b["label"].ravel() for b in evaluation]), stored["label"]
    )

    tfds.builder(name, data_dir=str(tmp_path / "tfrecord")).download_and_prepare(
        file_format="tfrecord",
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP
        ),
    )
    config.data_dir = str(tmp_path / "tfrecord")
    with pytest.raises(
        data.DatasetFormatError,
        match=r"stored as tfrecord files, but this pipeline reads ArrayRecord files .*: delete "
        rf".* and rebuild it with `tfds build {name} --data_dir={tmp_path}/tfrecord "
        r"--file_format=array_record`",
    ):
        data.train_iterator(config, global_batch_size=16, seed=0)


def _write_tfds_dataset(data_dir, name: str, features: dict, examples: dict) -> None:
    """A TFDS ArrayRecord dataset `name` with these features and {split: [example, ...]}."""
    import tensorflow_datasets as tfds

    version_dir = data_dir / name / "1.0.0"
    version_dir.mkdir(parents=True)
    identity = tfds.core.DatasetIdentity(
        name=name, version=tfds.core.Version("1.0.0"), data_dir=str(version_dir), module_name=""
    )
    info = tfds.core.DatasetInfo(builder=identity, features=tfds.features.FeaturesDict(features))
    writer = tfds.core.SequentialWriter(info, 100, file_format="array_record")
    writer.initialize_splits(list(examples))
    writer.add_examples(examples)
    writer.close_all()


def test_image_and_label_features_are_found_by_type_or_named_in_one_line(tmp_path):
    import tensorflow_datasets as tfds

    from hscl_jax.data.prepare_sources import png_bytes

    rng = np.random.default_rng(0)

    def examples(count):
        return [
            {"picture": png_bytes(rng.integers(0, 256, (6, 6, 1), np.uint8)), "kind": i % 2}
            for i in range(count)
        ]

    features = {
        "picture": tfds.features.Image(shape=(6, 6, 1)),
        "kind": tfds.features.ClassLabel(names=["odd", "even"]),
    }
    _write_tfds_dataset(
        tmp_path, "shapes", features, {"train": examples(8), "validation": examples(4)}
    )
    info = data.dataset_info("shapes", str(tmp_path))
    assert (info.image_key, info.label_key, info.test_split) == ("picture", "kind", "validation")
    assert (info.image_size, info.channels, info.grayscale, info.class_names) == (
        6,
        1,
        True,
        ("odd", "even"),
    )
    config = data.default_data_config("shapes")
    config.data_dir = str(tmp_path)
    batch = next(data.eval_iterator(config, split="validation", batch_size=4, num_local_devices=1))
    assert batch["image"].shape == (1, 4, 6, 6, 1)
    assert batch["label"].ravel().tolist() == [0, 1, 0, 1]

    captions = {"image": tfds.features.Image(shape=(6, 6, 1)), "caption": tfds.features.Text()}
    rows = [{"image": e["picture"], "caption": "a square"} for e in examples(2)]
    _write_tfds_dataset(tmp_path, "captions", captions, {"train": rows, "test": rows})
    with pytest.raises(
        data.DatasetFormatError,
        match=r"^Dataset 'captions' in .* has no image feature and class-label feature "
        r"\(tfds.features.Image and ClassLabel\) to train on; it has: caption \(Text\), image "
        r"\(Image\)\.$",
    ):
        data.dataset_info("captions", str(tmp_path))


def test_resize_decode_keeps_the_centre_square_of_the_shorter_side():
    import io

    import PIL.Image

    from hscl_jax.data.grain_source import ResizeDecode

    def encoded(pixels, image_format):
        buffer = io.BytesIO()
        PIL.Image.fromarray(pixels).save(buffer, format=image_format)
        return buffer.getvalue()

    # 40 wide x 20 high: the outer 8 columns on each side are red, the middle is blue. The
    # shorter side 20 -> 10 halves the image to 20 x 10, whose centre 10 x 10 is the blue part.
    landscape = np.zeros((20, 40, 3), np.uint8)
    landscape[:, :, 2] = 255
    landscape[:, :8] = landscape[:, 32:] = (255, 0, 0)
    pixels = ResizeDecode(size=10, channels=3)(encoded(landscape, "PNG"))
    assert pixels.shape == (10, 10, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.broadcast_to([0, 0, 255], (10, 10, 3)))
    # Portrait, grayscale: rows are cropped instead of columns.
    portrait = np.full((40, 20), 200, np.uint8)
    portrait[:8] = portrait[32:] = 0
    np.testing.assert_array_equal(ResizeDecode(10, 1)(encoded(portrait, "PNG")), 200)
    # A large JPEG decoded at a reduced DCT scale matches a full decode resized the same way.
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((25, 25, 1))).astype(np.uint8)
    photo = encoded(smooth, "JPEG")
    full = PIL.Image.open(io.BytesIO(photo)).convert("RGB").resize((85, 64))
    drafted = ResizeDecode(64, 3)(photo).astype(np.float32)

    def error(left):
        return np.abs(drafted - np.asarray(full.crop((left, 0, left + 64, 64)), np.float32)).mean()

    # ~4.4 grey levels at the centre crop (JPEG at 1/4 scale); shifted by 2 pixels: ~32.
    assert error(10) < 8.0 and min(error(8), error(12)) > 20.0


def test_images_of_varying_size_arrive_resized_and_centre_cropped(tmp_path):
    import io

    import PIL.Image
    import random_images_builder as random_images
    import tensorflow_datasets as tfds

    from hscl_jax.data.grain_source import ResizeDecode

    builder = random_images.prepare_random_images(48, 16, str(tmp_path), variable_size=True)
    config = data.default_data_config()
    config.name, config.data_dir = builder.info.full_name.rsplit("/", 1)[0], str(tmp_path)
    info = data.dataset_info(config.name, config.data_dir)
    assert info.variable_size and (info.image_size, info.crop_size) == (16, 16)  # its metadata
    batch = next(data.train_iterator(config, global_batch_size=16, seed=0, num_local_devices=2))
    chex.assert_shape(batch["image"], (2, 8, 16, 16, 3))
    first = next(data.eval_iterator(config, split="train", batch_size=16))
    stored = tfds.data_source(
        config.name,
        split="train",
        data_dir=str(tmp_path),
        download=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    sizes = {PIL.Image.open(io.BytesIO(stored[i]["image"])).size for i in range(16)}
    assert len(sizes) > 8 and min(min(size) for size in sizes) < 16 < max(max(s) for s in sizes)
    decode = ResizeDecode(16, 3)
    expected = np.stack([decode(stored[i]["image"]) for i in range(16)])
    np.testing.assert_array_equal(first["image"].reshape(16, 16, 16, 3), expected)


def test_eval_slice_wholly_in_the_padding_is_all_masked():
    """Two processes, a split shorter than one evaluation batch: process 1's slice of batch 0 has
    no example (it used to fail stacking zero images)."""
    from hscl_jax.data.grain_source import EvalBatchReader

    records = [{"image": np.full((2, 2, 1), i + 1, np.uint8), "label": i} for i in range(3)]
    first = EvalBatchReader(records, batch_size=8, host_start=0, host_stop=4)(0)
    second = EvalBatchReader(records, batch_size=8, host_start=4, host_stop=8)(0)
    assert first["mask"].tolist() == [True, True, True, False]
    assert first["label"].tolist() == [0, 1, 2, 0]
    assert not second["mask"].any()
    assert second["image"].shape == (4, 2, 2, 1) and not second["image"].any()
    assert second["label"].tolist() == [0, 0, 0, 0]
