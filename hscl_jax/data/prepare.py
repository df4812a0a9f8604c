"""Your own labelled images as a TFDS ArrayRecord dataset that the trainer reads by name.

    python -m hscl_jax.data.prepare --image_folder=ROOT --name=NAME --data_dir=DIR
    python -m hscl_jax.data.prepare --npz=FILE --name=NAME --data_dir=DIR
    python train.py --config=configs/default.py --workdir=W \\
        --config.data.name=NAME --config.data.data_dir=DIR

An image folder is ROOT/<class>/<image> or ROOT/<split>/<class>/<image> (train plus one of test,
validation, val): PNG or JPEG of any size and mode; labels follow the sorted class-folder names,
which are stored. A .npz file holds `images` (N, H, W) or (N, H, W, C) uint8 and `labels` (N,)
integers. Without a test split of its own, a seeded, stratified `--test_fraction` of each class
becomes the test split.

Two passes over the source, each decoding in parallel worker processes with a progress bar: the
first checks every image and computes the sizes, channels and the train split's mean and std; the
second writes the images (a file already PNG or JPEG in the dataset's mode keeps its own bytes)
into ArrayRecord files as they come. Grayscale images stay one channel (a dataset with any colour
image is RGB); RGBA loses its alpha. Images of one square size are stored as such; others are
decoded at training time with their shorter side resized to `--image_size` (default: the median
shorter side, at most 256) and centre-cropped. The metadata the trainer needs (sizes, channels,
classes and their names, statistics, crop size, grayscale preset) is stored with the dataset.

Everything is written under a temporary name in data_dir and renamed into place at the end: a
refused or failed run leaves nothing behind. Bad input stops with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import multiprocessing
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import numpy as np

from hscl_jax.data import prepare_sources, samplers
from hscl_jax.data.errors import DataError
from hscl_jax.data.info import DATASET_NAMES
from hscl_jax.data.parallel import ordered_map
from hscl_jax.data.tfds_source import PREPARED_METADATA_KEY

if TYPE_CHECKING:
    from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")

VERSION = "1.0.0"
MAX_VARIABLE_IMAGE_SIZE = 256
# Crops of images of varying size: ImageNet's 224 of 256.
VARIABLE_CROP_FRACTION = 224 / 256
_CHUNK = 64
_EXAMPLES_PER_SHARD = 50_000
_WRITE_BATCH_BYTES = 32 << 20
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the images become: their stored side (or the side the trainer decodes them to),
    channels, crops, statistics of the train split."""

    image_size: int
    variable_size: bool
    channels: int
    crop_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Image folders: per image, the index in FILE_MODES of the mode its file is stored in as it
    # is (0: converted).
    file_modes: np.ndarray | None = None


def _progress(total: int, description: str) -> tqdm:
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in a log or a pipe.
    return tqdm(total=total, desc=description, unit="image", file=sys.stderr, disable=None)


def _chunks(items: Iterable[Item], size: int = _CHUNK) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclasses.dataclass(frozen=True)
class _Pool:
    """Worker processes (None: this process) that map functions over chunks of examples."""

    executor: concurrent.futures.Executor | None
    workers: int

    def map(self, function: Callable[[Item], Result], chunks: Iterable[Item]) -> Iterator[Result]:
        """function(chunk) for each chunk, in order, a bounded number of chunks ahead."""
        if self.executor is None:
            return map(function, chunks)
        return ordered_map(function, chunks, self.executor, depth=2 * self.workers)


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[_Pool]:
    if workers == 1:
        yield _Pool(None, 1)
        return
    # spawn: a forked child would inherit the threads of JAX, if this process has imported it.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as executor:
        yield _Pool(executor, workers)


def check_name(name: str, data_dir: str, overwrite: bool) -> str:
    """The folder data_dir/name the dataset will be, after checking that `name` can be one."""
    if not _NAME.match(name or ""):
        raise DataError(
            f"--name={name!r} must be lowercase letters, digits and underscores, starting with a "
            f"letter (a TFDS dataset name)."
        )
    if name in DATASET_NAMES:
        raise DataError(f"--name={name!r} is a registered recipe of hscl_jax; choose another.")
    import tensorflow_datasets as tfds

    try:
        tfds.builder_cls(name)
    except tfds.core.registered.DatasetNotFoundError:
        pass
    else:
        raise DataError(f"--name={name!r} is a TFDS catalogue dataset; choose another name.")
    target = os.path.join(data_dir, name)
    if os.path.exists(target) and not overwrite:
        raise DataError(f"{target} already exists; pass --overwrite to replace it.")
    return target


def _test_mask(source: prepare_sources.Source, test_fraction: float, seed: int) -> np.ndarray:
    if source.split_is_test is not None:
        is_test = source.split_is_test
    else:
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"--test_fraction={test_fraction} must be in (0, 1).")
        is_test = samplers.stratified_test_mask(source.labels, test_fraction, seed)
    if not is_test.any():
        raise DataError(
            f"{source.path}: the test split is empty (every class has too few images for "
            f"test_fraction={test_fraction}); add images or raise --test_fraction."
        )
    return is_test


def _mean_and_std(
    moments_sum: np.ndarray, count: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Statistics from summed per-image (mean, mean square) moments: every image weighs the same,
    as it does once the trainer has resized it."""
    mean, mean_square = moments_sum / count
    std = np.sqrt(np.maximum(mean_square - mean**2, 1e-12))
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def _sizes(
    source: prepare_sources.Source,
    heights: np.ndarray,
    widths: np.ndarray,
    image_size: int,
    crop_size: int,
) -> tuple[int, bool, int]:
    """(image_size, variable_size, crop_size) of images with these sides."""
    square = len(set(heights)) == 1 and set(heights) == set(widths)
    if square:
        side = int(heights[0])
        if image_size not in (0, side):
            raise DataError(
                f"{source.path}: every image is {side}x{side}; --image_size={image_size} applies "
                f"to images of varying size (leave it 0)."
            )
        image_size = side
    elif not image_size:
        shorter = np.minimum(heights, widths)
        image_size = int(min(np.median(shorter), MAX_VARIABLE_IMAGE_SIZE))
    default_crop = image_size if square else round(VARIABLE_CROP_FRACTION * image_size)
    crop_size = crop_size or default_crop
    if not 1 <= crop_size <= image_size:
        raise DataError(f"--crop_size={crop_size} must be between 1 and {image_size}.")
    return image_size, not square, crop_size


def _inspect_folder(
    source: prepare_sources.Source, is_test: np.ndarray, options: Options, pool: _Pool
) -> Layout:
    """Decodes every image (one line naming the first that fails) and derives the layout."""
    assert not isinstance(source.examples, range)  # a folder's examples are its paths
    count = len(source.examples)
    heights = np.empty(count, np.int32)
    widths = np.empty(count, np.int32)
    modes = np.zeros(count, np.int8)
    all_gray = True
    sums = {1: np.zeros((2, 1)), 3: np.zeros((2, 3))}
    position = 0
    with _progress(count, "checking images") as bar:
        for results in pool.map(prepare_sources.inspect_images_chunk, _chunks(source.examples)):
            for result in results:
                if result[0] == "error":
                    raise DataError(f"cannot read image {result[1]}: {result[2]}")
                _, heights[position], widths[position], mode, moments = result
                gray = moments.shape[1] == 1
                modes[position] = prepare_sources.FILE_MODES.index(mode)
                all_gray &= gray
                if not is_test[position]:
                    sums[3] += moments  # one channel broadcasts over three: R = G = B
                    if gray:
                        sums[1] += moments
                position += 1
            bar.update(len(results))
    channels = 1 if all_gray else 3
    image_size, variable, crop = _sizes(
        source, heights, widths, options.image_size, options.crop_size
    )
    mean, std = _mean_and_std(sums[channels], int((~is_test).sum()))
    return Layout(image_size, variable, channels, crop, mean, std, modes)


def _inspect_npz(
    source: prepare_sources.Source,
    images: prepare_sources.NpzImages,
    is_test: np.ndarray,
    options: Options,
) -> Layout:
    """The train rows' statistics, read in order; sizes and channels from the array's shape."""
    height, width = images.shape[1:3]
    channels = images.shape[3] if len(images.shape) == 4 else 1
    total = np.zeros((2, channels))
    position = 0
    with _progress(len(source.examples), "checking images") as bar:
        for rows in images.rows(_CHUNK):
            train = rows[~is_test[position : position + len(rows)]]
            values = train.reshape(len(train), -1, channels).astype(np.float64) / 255.0
            total += np.stack([values.mean(axis=1).sum(0), (values**2).mean(axis=1).sum(0)])
            position += len(rows)
            bar.update(len(rows))
    image_size, variable, crop = _sizes(
        source, np.array([height]), np.array([width]), options.image_size, options.crop_size
    )
    mean, std = _mean_and_std(total, int((~is_test).sum()))
    return Layout(image_size, variable, channels, crop, mean, std)


def _encoded_examples(
    source: prepare_sources.Source,
    images: prepare_sources.NpzImages | None,
    layout: Layout,
    split_rows: np.ndarray,
    pool: _Pool,
) -> Iterator[bytes]:
    """The encoded images of the examples at `split_rows` (sorted), in order."""
    encoded_chunks: Iterator[list[bytes]]
    if source.kind == "folder":
        examples, file_modes = source.examples, layout.file_modes
        # A folder's examples are its paths, and _inspect_folder found their modes.
        assert not isinstance(examples, range) and file_modes is not None
        modes = prepare_sources.FILE_MODES
        paths = ((examples[i], modes[file_modes[i]]) for i in split_rows)
        encode = functools.partial(prepare_sources.encode_images_chunk, channels=layout.channels)
        encoded_chunks = pool.map(encode, _chunks(paths))
    else:
        assert images is not None  # a .npz source comes with its images
        wanted = np.zeros(len(source.examples), bool)
        wanted[split_rows] = True
        encoded_chunks = pool.map(prepare_sources.encode_rows_chunk, _npz_chunks(images, wanted))
    for encoded in encoded_chunks:
        yield from encoded


def _npz_chunks(images: prepare_sources.NpzImages, wanted: np.ndarray) -> Iterator[np.ndarray]:
    position = 0
    for rows in images.rows(_CHUNK):
        keep = wanted[position : position + len(rows)]
        position += len(rows)
        if keep.any():
            yield np.ascontiguousarray(rows[keep])


def _metadata(
    source: prepare_sources.Source, layout: Layout, is_test_described: str
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "image_size": layout.image_size,
        "crop_size": layout.crop_size,
        "mean": list(layout.mean),
        "std": list(layout.std),
        "grayscale": layout.channels == 1,
        "source": f"{source.kind} {os.path.abspath(source.path)}",
        "test_split": is_test_described,
    }
    if source.label_values is not None:
        metadata["label_values"] = source.label_values
    if source.note:
        metadata["note"] = source.note
    return metadata


def _write(
    source: prepare_sources.Source,
    images: prepare_sources.NpzImages | None,
    layout: Layout,
    is_test: np.ndarray,
    version_dir: str,
    name: str,
    metadata: dict[str, Any],
    pool: _Pool,
) -> None:
    """Writes the dataset as ArrayRecord files into `version_dir`, one example at a time."""
    import tensorflow_datasets as tfds

    side = None if layout.variable_size else layout.image_size
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(side, side, layout.channels)),
            "label": tfds.features.ClassLabel(names=list(source.class_names)),
        }
    )
    identity = tfds.core.DatasetIdentity(
        name=name,
        version=tfds.core.Version(VERSION),
        data_dir=version_dir,
        module_name=__name__,
    )
    info = tfds.core.DatasetInfo(
        builder=identity,
        description=f"Prepared by hscl_jax.data.prepare from {metadata['source']}.",
        features=features,
        metadata=tfds.core.MetadataDict({PREPARED_METADATA_KEY: metadata}),
        disable_shuffling=True,
    )
    os.makedirs(version_dir)
    writer = tfds.core.SequentialWriter(
        ds_info=info, max_examples_per_shard=_EXAMPLES_PER_SHARD, file_format="array_record"
    )
    writer.initialize_splits(["train", "test"])
    for split in ("train", "test"):
        rows = np.flatnonzero(is_test == (split == "test"))
        labels = source.labels[rows]
        with _progress(len(rows), f"writing {split}") as bar:
            encoded = _encoded_examples(source, images, layout, rows, pool)
            for examples in _batches_to_write(encoded, labels):
                writer.add_examples({split: examples})
                bar.update(len(examples))
    writer.close_all()


def _batches_to_write(
    encoded: Iterator[bytes], labels: np.ndarray
) -> Iterator[list[dict[str, bytes | int]]]:
    """The examples in batches of up to _WRITE_BATCH_BYTES of images: the writer rewrites the
    dataset's metadata files on every call, so each call takes many examples."""
    batch: list[dict[str, bytes | int]] = []
    size = 0
    for image, label in zip(encoded, labels, strict=True):
        batch.append({"image": image, "label": int(label)})
        size += len(image)
        if size >= _WRITE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def _staging(data_dir: str, name: str, target: str, overwrite: bool) -> Iterator[str]:
    """A temporary folder in data_dir to write into; on success its `name` folder replaces
    `target` (renamed into place), on failure it is removed, and so is a data_dir made for it."""
    created = not os.path.exists(data_dir)
    staging = os.path.join(data_dir, f".{name}.incomplete-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    try:
        yield staging
        if os.path.exists(target):
            if not overwrite:  # made by another run meanwhile
                raise DataError(f"{target} already exists; pass --overwrite to replace it.")
            replaced = os.path.join(data_dir, f".{name}.replaced-{uuid.uuid4().hex[:8]}")
            os.rename(target, replaced)
            os.rename(os.path.join(staging, name), target)
            shutil.rmtree(replaced)
        else:
            os.rename(os.path.join(staging, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line's settings (see `main`)."""

    test_fraction: float = 0.2
    seed: int = 0
    image_size: int = 0
    crop_size: int = 0
    workers: int = 0
    overwrite: bool = False


class Prepared(TypedDict):
    """What `prepare` wrote."""

    path: str
    num_train: int
    num_test: int
    num_classes: int
    layout: Layout
    notes: list[str]


def prepare(
    *, image_folder: str | None, npz: str | None, name: str, data_dir: str, options: Options
) -> Prepared:
    """Writes the dataset data_dir/name from an image folder or a .npz file (exactly one) and
    returns what it wrote: {"path", "num_train", "num_test", "num_classes", "layout", "notes"}.
    DataError (one line) for bad input, before anything is written."""
    if (image_folder is None) == (npz is None):
        raise DataError("give exactly one of --image_folder=ROOT and --npz=FILE.")
    if options.workers < 0 or options.image_size < 0 or options.crop_size < 0:
        raise DataError("--workers, --image_size and --crop_size must be >= 0.")
    options = dataclasses.replace(options, workers=options.workers or os.cpu_count() or 1)
    target = check_name(name, data_dir, options.overwrite)
    images: prepare_sources.NpzImages | None
    if image_folder is not None:
        source, images = prepare_sources.scan_image_folder(image_folder), None
    else:
        assert npz is not None  # exactly one of the two, checked above
        source, images = prepare_sources.scan_npz(npz)
    is_test = _test_mask(source, options.test_fraction, options.seed)
    described = (
        "the source's own test split"
        if source.split_is_test is not None
        else f"stratified, test_fraction {options.test_fraction}, seed {options.seed}"
    )
    with _pool(options.workers) as pool:
        if source.kind == "folder":
            layout = _inspect_folder(source, is_test, options, pool)
        else:
            assert images is not None
            layout = _inspect_npz(source, images, is_test, options)
        metadata = _metadata(source, layout, described)
        with _staging(data_dir, name, target, options.overwrite) as staging:
            version_dir = os.path.join(staging, name, VERSION)
            _write(source, images, layout, is_test, version_dir, name, metadata, pool)
    notes = [source.note] if source.note else []
    if source.skipped_files:
        notes.append(f"skipped {source.skipped_files} file(s) that are not PNG or JPEG.")
    return {
        "path": os.path.join(target, VERSION),
        "num_train": int((~is_test).sum()),
        "num_test": int(is_test.sum()),
        "num_classes": len(source.class_names),
        "layout": layout,
        "notes": notes,
    }


def _summary(name: str, data_dir: str, result: Prepared) -> str:
    layout = result["layout"]
    size = f"{layout.image_size}x{layout.image_size}"
    if layout.variable_size:
        size = f"varying sizes, decoded to {size}"
    return (
        f"prepared {name!r} in {result['path']}: {result['num_train']} train and "
        f"{result['num_test']} test images, {result['num_classes']} classes, {size}x"
        f"{layout.channels} (crops {layout.crop_size}), mean {layout.mean}, std {layout.std}\n"
        f"train on it: python train.py --config=configs/default.py --workdir=WORKDIR "
        f"--config.data.name={name} --config.data.data_dir={data_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    default_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    parser = argparse.ArgumentParser(
        prog="python -m hscl_jax.data.prepare",
        description="Write labelled images (an image folder or .npz arrays) as a TFDS ArrayRecord "
        "dataset that train.py reads with --config.data.name=NAME --config.data.data_dir=DIR.",
    )
    parser.add_argument("--image_folder", help="ROOT/<class>/<image> or ROOT/<split>/<class>/...")
    parser.add_argument("--npz", help="a .npz file with arrays images and labels")
    parser.add_argument("--name", required=True, help="the dataset's name (config.data.name)")
    parser.add_argument("--data_dir", default=default_dir, help=f"(default {default_dir})")
    parser.add_argument(
        "--test_fraction",
        type=float,
        default=Options.test_fraction,
        help="share of each class in the test split, when the source has none (default 0.2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of that split (default 0)")
    parser.add_argument(
        "--image_size",
        type=int,
        default=0,
        help="side images of varying size are decoded to (0: median shorter side, at most 256)",
    )
    parser.add_argument(
        "--crop_size", type=int, default=0, help="training crops (0: image side; varying: 7/8)"
    )
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0: cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace data_dir/NAME")
    args = parser.parse_args(argv)
    options = Options(
        test_fraction=args.test_fraction,
        seed=args.seed,
        image_size=args.image_size,
        crop_size=args.crop_size,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    try:
        result = prepare(
            image_folder=args.image_folder,
            npz=args.npz,
            name=args.name,
            data_dir=args.data_dir,
            options=options,
        )
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(_summary(args.name, args.data_dir, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
