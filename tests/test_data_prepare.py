"""`python -m hscl_jax.data.prepare`: image folders and .npz arrays become TFDS datasets the
pipeline reads by name, with their metadata; every bad input is one line, exit status 1, and
nothing written."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from image_folders import save_image

from hscl_jax import data
from hscl_jax.data import prepare

PIL_Image = pytest.importorskip("PIL.Image")
pytest.importorskip("tensorflow_datasets")

CLASSES = ("cat", "dog", "eel")


def _as_rgb(path) -> np.ndarray:
    with PIL_Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _run(*args) -> tuple[int, str, str]:
    """prepare.main in this process, one worker: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        status = prepare.main(["--workers=1", *args])
    finally:
        sys.stdout, sys.stderr = real
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Small image folders: RGB (PNG and JPEG, an RGBA and a palette PNG, a stray text file),
    grayscale, and images of varying size with their own train/val split folders."""
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        for i in range(8):
            pixels = rng.integers(0, 256, (12, 12, 3), np.uint8)
            pixels[..., label] //= 2  # classes differ in colour, so the statistics do too
            jpeg = i % 3 == 0
            path = root / "rgb" / name / f"{i}.{'jpg' if jpeg else 'png'}"
            mode = {1: "RGBA", 2: "P"}.get(i) if not jpeg else None
            save_image(path, pixels, "JPEG" if jpeg else "PNG", mode)
        for i in range(5):
            save_image(root / "gray" / name / f"{i}.png", rng.integers(0, 256, (10, 10), np.uint8))
    (root / "rgb" / "cat" / "notes.txt").write_text("not an image")
    for split, count in (("train", 6), ("val", 2)):
        for name in CLASSES[:2]:
            for i in range(count):
                side = rng.integers(14, 40, size=2)
                pixels = rng.integers(0, 256, (*side, 3), np.uint8)
                save_image(root / "varied" / split / name / f"{i}.jpg", pixels, "JPEG")
    return root


@pytest.fixture(scope="module")
def prepared_rgb(folders, tmp_path_factory):
    """The RGB folder prepared by the command itself, with two worker processes."""
    data_dir = tmp_path_factory.mktemp("tfds")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hscl_jax.data.prepare",
            f"--image_folder={folders / 'rgb'}",
            "--name=pets",
            f"--data_dir={data_dir}",
            "--workers=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return data_dir, done


def _split_images(config, split):
    batches = list(data.eval_iterator(config, split=split, batch_size=8, num_local_devices=1))
    mask = np.concatenate([b["mask"].ravel() for b in batches])
    images = np.concatenate([b["image"].reshape(-1, *b["image"].shape[2:]) for b in batches])
    labels = np.concatenate([b["label"].ravel() for b in batches])
    return images[mask], labels[mask]


def _config(name, data_dir):
    config = data.default_data_config()
    config.name, config.data_dir = name, str(data_dir)
    config.num_workers = 1
    return config


def test_an_image_folder_becomes_a_dataset_read_by_name(folders, prepared_rgb):
    data_dir, done = prepared_rgb
    assert f"prepared 'pets' in {data_dir}/pets/1.0.0: 18 train and 6 test images" in done.stdout
    assert "--config.data.name=pets --config.data.data_dir=" in done.stdout
    assert done.stderr.strip().endswith("note: skipped 1 file(s) that are not PNG or JPEG.")
    assert sorted(os.listdir(data_dir)) == ["pets"]  # nothing else left in data_dir
    config = _config("pets", data_dir)
    info = data.dataset_info("pets", str(data_dir))
    assert (info.image_size, info.crop_size, info.channels, info.variable_size) == (
        12,
        12,
        3,
        False,
    )
    assert (info.num_train, info.num_test, info.num_classes) == (18, 6, 3)
    assert info.class_names == CLASSES and info.augmentation_preset == "simclr"
    # Every image arrives as the file decoded to RGB (alpha and palette converted), with the
    # label of its folder; the stratified split takes round(0.2 * 8) = 2 images of each class.
    files = {name: sorted((folders / "rgb" / name).glob("[0-9].*")) for name in CLASSES}
    expected = {label: [_as_rgb(p) for p in files[c]] for label, c in enumerate(CLASSES)}
    seen = {}
    for split in ("train", "test"):
        images, labels = _split_images(config, split)
        for image, label in zip(images, labels, strict=True):
            matches = [i for i, e in enumerate(expected[label]) if np.array_equal(e, image)]
            assert len(matches) == 1, (split, label)
            seen[(label, matches[0])] = split
    assert len(seen) == 24
    assert [sum(s == "test" for (lab, _), s in seen.items() if lab == c) for c in range(3)] == [
        2,
        2,
        2,
    ]
    # The statistics are the train images' (every image weighs the same; here all are 12x12).
    train = np.stack([expected[lab][i] for (lab, i), s in seen.items() if s == "train"]) / 255.0
    np.testing.assert_allclose(info.mean, train.mean(axis=(0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(info.std, train.std(axis=(0, 1, 2)), rtol=1e-4)
    # A JPEG already RGB keeps its own bytes; an RGBA PNG is converted (then stored as PNG).
    import tensorflow_datasets as tfds

    stored = set()
    for split in ("train", "test"):
        raw = tfds.data_source(
            "pets",
            split=split,
            data_dir=str(data_dir),
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        stored |= {raw[i]["image"] for i in range(len(raw))}
    assert all(p.read_bytes() in stored for c in CLASSES for p in files[c] if p.suffix == ".jpg")
    assert not any(p.read_bytes() in stored for c in CLASSES for p in files[c][1:2])


def test_the_trainer_reads_a_prepared_folder_with_its_own_preset(prepared_rgb):
    data_dir, _ = prepared_rgb
    config = _config("pets", data_dir)
    batch = next(data.train_iterator(config, global_batch_size=8, seed=0, num_local_devices=2))
    assert batch["image"].shape == (2, 4, 12, 12, 3) and batch["image"].dtype == np.uint8
    aug = data.augmentation_for(config)
    assert aug.flip_prob == 0.5 and aug.color_jitter_prob == 0.8  # simclr: RGB data
    view1, view2 = data.augment_views(batch, aug)
    assert view1.shape == (2, 4, 12, 12, 3) and not np.array_equal(view1, view2)


def test_grayscale_stays_one_channel_and_gets_the_grayscale_preset(folders, tmp_path):
    status, out, err = _run(
        f"--image_folder={folders / 'gray'}", "--name=gray_pets", f"--data_dir={tmp_path}"
    )
    assert status == 0, err
    info = data.dataset_info("gray_pets", str(tmp_path))
    assert (info.channels, info.grayscale, info.augmentation_preset) == (1, True, "digits")
    config = _config("gray_pets", tmp_path)
    images, _ = _split_images(config, "train")
    assert images.shape[1:] == (10, 10, 1) and images.dtype == np.uint8
    np.testing.assert_allclose(info.mean, [images.mean() / 255.0], rtol=1e-4)
    assert data.augmentation_for(config).flip_prob == 0.0


def test_images_of_varying_size_keep_their_split_and_decode_to_one_size(folders, tmp_path):
    status, _, err = _run(
        f"--image_folder={folders / 'varied'}", "--name=varied", f"--data_dir={tmp_path}"
    )
    assert status == 0, err
    info = data.dataset_info("varied", str(tmp_path))
    shorter = [min(PIL_Image.open(p).size) for p in sorted((folders / "varied").glob("*/*/*.jpg"))]
    assert info.variable_size and info.image_size == int(np.median(shorter))
    assert info.crop_size == round(info.image_size * 224 / 256)
    assert (info.num_train, info.num_test, info.class_names) == (12, 4, CLASSES[:2])
    config = _config("varied", tmp_path)
    images, labels = _split_images(config, "test")  # the val folder
    assert images.shape == (4, info.image_size, info.image_size, 3)
    assert sorted(labels) == [0, 0, 1, 1]
    batch = next(data.train_iterator(config, global_batch_size=4, seed=0, num_local_devices=1))
    view1, _ = data.augment_views(batch, data.augmentation_for(config))
    assert view1.shape == (1, 4, info.crop_size, info.crop_size, 3)


def test_npz_arrays_with_labels_not_0_to_k_are_remapped_and_say_so(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 9, 9), np.uint8)
    labels = np.repeat([3, 7, 9, 11], 10)
    np.savez_compressed(tmp_path / "arrays.npz", images=images, labels=labels)
    status, out, err = _run(
        f"--npz={tmp_path / 'arrays.npz'}", "--name=arrays", f"--data_dir={tmp_path / 'tfds'}"
    )
    assert status == 0, err
    assert err.strip() == (
        "note: labels 3, 7, 9, 11 are not 0..3: stored as 0..3 in sorted order, the original "
        "values kept as the class names."
    )
    info = data.dataset_info("arrays", str(tmp_path / "tfds"))
    assert info.class_names == ("3", "7", "9", "11") and info.channels == 1
    metadata = (tmp_path / "tfds" / "arrays" / "1.0.0" / "metadata.json").read_text()
    assert '"label_values": [3, 7, 9, 11]' in metadata
    stored, stored_labels = _split_images(_config("arrays", tmp_path / "tfds"), "train")
    assert len(stored) == 32
    for image, label in zip(stored, stored_labels, strict=True):
        (row,) = [i for i in range(40) if np.array_equal(images[i], image[..., 0])]
        assert labels[row] == [3, 7, 9, 11][label]


def test_the_same_seed_gives_the_same_split_and_another_seed_another(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (30, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(30) % 2)

    def test_split(name, seed):
        status, _, err = _run(
            f"--npz={tmp_path / 'a.npz'}", f"--name={name}", f"--data_dir={tmp_path}", seed
        )
        assert status == 0, err
        found, _ = _split_images(_config(name, tmp_path), "test")
        return sorted(image.tobytes() for image in found)

    first = test_split("first", "--seed=0")
    assert len(first) == 6 and test_split("again", "--seed=0") == first
    assert test_split("other", "--seed=1") != first


def _corrupt(folders, tmp_path):
    root = tmp_path / "corrupt"
    for name in CLASSES[:2]:
        (root / name).mkdir(parents=True)
        for path in sorted((folders / "rgb" / name).glob("*.png"))[:2]:
            (root / name / path.name).write_bytes(path.read_bytes())
    (root / "dog" / "broken.png").write_bytes((root / "dog" / "1.png").read_bytes()[:60])
    return root


def _arrays(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return f"--npz={path}"


_IMAGES = np.zeros((6, 4, 4), np.uint8)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty folder", r"holds no PNG or JPEG images in class folders"),
        ("one class", r"holds one class \('cat'\): training with labels needs >= 2 classes"),
        ("corrupt image", r"cannot read image .*corrupt/dog/broken\.png: "),
        ("lengths differ", r"images has 6 rows but labels has 5\.$"),
        ("float images", r"images must be uint8 \(pixels 0\.\.255\), got float64\.$"),
        ("float labels", r"labels must be a 1-D array of integers, got float64 \(6,\)\.$"),
        ("no labels", r"must hold arrays 'images' and 'labels'; it has images\.$"),
        ("name exists", r"/taken already exists; pass --overwrite to replace it\.$"),
        ("bad name", r"--name='My Set' must be lowercase letters, digits and underscores"),
        ("catalogue name", r"--name='mnist' is a TFDS catalogue dataset; choose another name\.$"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(case, message, folders, tmp_path):
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    (data_dir / "taken").mkdir()
    (data_dir / "taken" / "mine.txt").write_text("kept")
    name = {"name exists": "taken", "bad name": "My Set", "catalogue name": "mnist"}.get(case, "x")
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    (one / "cat" / "a.png").write_bytes((folders / "rgb" / "cat" / "1.png").read_bytes())
    sources = {
        "empty folder": lambda: f"--image_folder={empty}",
        "one class": lambda: f"--image_folder={one}",
        "corrupt image": lambda: f"--image_folder={_corrupt(folders, tmp_path)}",
        "lengths differ": lambda: _arrays(tmp_path, images=_IMAGES, labels=np.arange(5)),
        "float images": lambda: _arrays(tmp_path, images=_IMAGES * 1.0, labels=np.arange(6) % 2),
        "float labels": lambda: _arrays(tmp_path, images=_IMAGES, labels=np.arange(6) * 1.0),
        "no labels": lambda: _arrays(tmp_path, images=_IMAGES),
    }
    source = sources.get(case, lambda: f"--image_folder={folders / 'gray'}")()
    status, out, err = _run(source, f"--name={name}", f"--data_dir={data_dir}")
    assert status == 1 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert sorted(os.listdir(data_dir)) == ["taken"]  # nothing half-written, nothing replaced
    assert os.listdir(data_dir / "taken") == ["mine.txt"]


def test_overwrite_replaces_a_dataset_in_place(folders, tmp_path):
    args = (f"--image_folder={folders / 'gray'}", "--name=gray_pets", f"--data_dir={tmp_path}")
    assert _run(*args)[0] == 0
    first = data.dataset_info("gray_pets", str(tmp_path))
    assert _run(*args, "--test_fraction=0.4")[0] == 1  # exists
    assert _run(*args, "--test_fraction=0.4", "--overwrite")[0] == 0
    data.clear_cache()
    again = data.dataset_info("gray_pets", str(tmp_path))
    assert (first.num_test, again.num_test) == (3, 6)
    assert sorted(os.listdir(tmp_path)) == ["gray_pets"]
