"""What `python -m hscl_jax.data.prepare` reads: an image folder or a .npz file, checked, described
and encoded one example at a time.

A source is a list of examples (file paths, or row numbers of the .npz arrays), their labels and
class names. The functions named `*_chunk` run in worker processes on chunks of examples and
return small results (facts about each image, or its encoded bytes), so no process ever holds more
than a chunk of images, however many the source has.
"""

from __future__ import annotations

import array
import dataclasses
import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from hscl_jax.data.errors import DataError

if TYPE_CHECKING:
    import PIL.Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")
# Split folders of the ImageFolder layout; any of the last three is the test split.
SPLIT_FOLDERS = ("train", "test", "validation", "val")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# The modes a file is stored in as it is ("": converted first).
FILE_MODES = ("", "L", "RGB")

# What `inspect_images_chunk` finds about one file.
ImageFacts = tuple[Literal["ok"], int, int, str, np.ndarray]
ImageFailure = tuple[Literal["error"], str, str]


@dataclasses.dataclass(frozen=True)
class Source:
    """The examples of a source in a fixed order, with int64 labels 0..K-1 and the class names;
    `split_is_test` marks the examples of a test split the source itself defines (None: make
    one); `label_values` the source's own label of each class, when it is not 0..K-1."""

    kind: str  # "folder" or "npz"
    path: str
    examples: Sequence[str] | range  # the paths of a folder, the row numbers of a .npz file
    labels: np.ndarray
    class_names: tuple[str, ...]
    split_is_test: np.ndarray | None = None
    skipped_files: int = 0
    note: str = ""
    label_values: list[int] | None = None


def _sorted_dirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


class PathList(Sequence[str]):
    """Paths of files below `root`, kept as one byte string of the paths relative to it and an
    offset per path: a few dozen bytes per file, where a list of str takes several times that
    (a folder may hold millions of images)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.join(root, "")
        self._blob = bytearray()
        self._offsets = array.array("q", [0])

    def append(self, path: str) -> None:
        relative = path[len(self.root) :] if path.startswith(self.root) else path
        self._blob += os.fsencode(relative)
        self._offsets.append(len(self._blob))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    # Read by index only: slices are not supported.
    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        relative = bytes(self._blob[self._offsets[index] : self._offsets[index + 1]])
        return os.path.join(self.root, os.fsdecode(relative))


def _class_files(class_dir: str) -> Iterator[str | None]:
    """Image files below `class_dir` (any depth, sorted), then None for each other file."""
    for folder, dirs, files in os.walk(class_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            image = name.lower().endswith(IMAGE_EXTENSIONS)
            yield os.path.join(folder, name) if image else None


def scan_image_folder(root: str) -> Source:
    """The images of `root/<class>/...` or `root/<split>/<class>/...` (ImageFolder layout):
    labels in sorted class-name order, split folders "train" and one of "test", "validation",
    "val"."""
    if not os.path.isdir(root):
        raise DataError(f"--image_folder={root} is not a folder.")
    children = _sorted_dirs(root)
    split_layout = "train" in children and set(children) <= set(SPLIT_FOLDERS)
    if split_layout:
        tests = [c for c in children if c != "train"]
        if len(tests) > 1:
            raise DataError(
                f"{root} has split folders {', '.join(children)}: keep train and one test split "
                f"(test, validation or val)."
            )
        split_dirs = {"train": os.path.join(root, "train")}
        if tests:
            split_dirs["test"] = os.path.join(root, tests[0])
    else:
        split_dirs = {"train": root}
    class_names = sorted({c for path in split_dirs.values() for c in _sorted_dirs(path)})
    examples, label_buffer, is_test, skipped = PathList(root), array.array("q"), array.array("b"), 0
    for split, split_dir in split_dirs.items():
        for label, class_name in enumerate(class_names):
            class_dir = os.path.join(split_dir, class_name)
            for path in _class_files(class_dir) if os.path.isdir(class_dir) else ():
                if path is None:
                    skipped += 1
                    continue
                examples.append(path)
                label_buffer.append(label)
                is_test.append(split == "test")
    if not len(examples):
        raise DataError(
            f"{root} holds no PNG or JPEG images in class folders (ROOT/<class>/<image> or "
            f"ROOT/<split>/<class>/<image>)."
        )
    labels = np.frombuffer(label_buffer, np.int64)
    present = [class_names[label] for label in np.unique(labels)]
    if len(present) < 2:
        raise DataError(
            f"{root} holds one class ({present[0]!r}): training with labels needs >= 2 classes, "
            f"a folder of images for each."
        )
    return Source(
        kind="folder",
        path=root,
        examples=examples,
        labels=labels,
        class_names=tuple(class_names),
        split_is_test=np.asarray(is_test, bool) if "test" in split_dirs else None,
        skipped_files=skipped,
    )


# ----------------------------------------------------------------------------- images


def _open_image(path: str) -> PIL.Image.Image:
    import PIL.Image

    image = PIL.Image.open(path)
    image.load()  # decodes the whole file: a truncated or corrupt one fails here
    if image.format not in IMAGE_FORMATS:
        raise ValueError(f"it is {image.format}, not PNG or JPEG")
    return image


def _converted(image: PIL.Image.Image, channels: int) -> PIL.Image.Image:
    """`image` as 8-bit grayscale (channels 1) or RGB (3): 16-bit gray keeps its top 8 bits,
    an alpha channel is dropped."""
    import PIL.Image

    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.int64) >> 8
        image = PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def _pixel_moments(pixels: np.ndarray) -> np.ndarray:
    """(2, C): per-channel mean and mean square of uint8 (h, w, C) pixels scaled to [0, 1]."""
    flat = pixels.reshape(-1, pixels.shape[-1])
    sums = flat.sum(axis=0, dtype=np.int64)
    squares = (flat.astype(np.int32) ** 2).sum(axis=0, dtype=np.int64)
    return np.stack([sums / 255.0, squares / 255.0**2]) / len(flat)


def inspect_images_chunk(paths: list[str]) -> list[ImageFacts | ImageFailure]:
    """Per path: ("ok", height, width, mode, moments (2, C)) with C = 1 for a grayscale image, 3
    otherwise, and mode "L" or "RGB" when the file can be stored as it is in that mode, else "";
    or ("error", path, reason) for a file that does not decode."""
    results: list[ImageFacts | ImageFailure] = []
    for path in paths:
        try:
            image = _open_image(path)
            gray = image.mode in _GRAY_MODES
            pixels = np.asarray(_converted(image, 1 if gray else 3)).reshape(
                image.height, image.width, -1
            )
            mode = image.mode if image.mode in ("L", "RGB") else ""
            results.append(("ok", image.height, image.width, mode, _pixel_moments(pixels)))
        except Exception as error:  # noqa: BLE001 - any failure to decode names the file
            results.append(("error", path, f"{type(error).__name__}: {error}"))
    return results


def encode_images_chunk(paths_and_modes: list[tuple[str, str]], channels: int) -> list[bytes]:
    """Each image as stored: the file's own bytes when it is already in the target mode (the
    mode `inspect_images_chunk` found), else converted and encoded as PNG."""
    target = "L" if channels == 1 else "RGB"
    encoded = []
    for path, mode in paths_and_modes:
        if mode == target:
            with open(path, "rb") as f:
                encoded.append(f.read())
        else:
            encoded.append(png_bytes(np.asarray(_converted(_open_image(path), channels))))
    return encoded


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 (h, w) or (h, w, C) pixels as PNG."""
    import PIL.Image

    buffer = io.BytesIO()
    squeezed = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
    PIL.Image.fromarray(squeezed).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_rows_chunk(rows: np.ndarray) -> list[bytes]:
    """Each uint8 array row (h, w, C) as PNG."""
    return [png_bytes(row) for row in rows]


# ----------------------------------------------------------------------------- .npz arrays


@dataclasses.dataclass(frozen=True)
class NpzImages:
    """Where the rows of the "images" array of a .npz file lie, to read them in order without
    loading the array: its member, shape and the offset of the first row."""

    path: str
    member: str
    shape: tuple[int, ...]
    offset: int

    def rows(self, chunk: int) -> Iterator[np.ndarray]:
        """Every row as uint8 (h, w, C), `chunk` rows at a time."""
        height, width = self.shape[1:3]
        channels = self.shape[3] if len(self.shape) == 4 else 1
        row_bytes = height * width * channels
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as member:
            member.read(self.offset)
            for start in range(0, self.shape[0], chunk):
                count = min(chunk, self.shape[0] - start)
                data = member.read(count * row_bytes)
                yield np.frombuffer(data, np.uint8).reshape(count, height, width, channels)


def _npz_header(
    archive: zipfile.ZipFile, member: str
) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(f)
        return shape, fortran_order, dtype, f.tell()


def scan_npz(path: str) -> tuple[Source, NpzImages]:
    """The examples of a .npz file with arrays `images` (N, H, W) or (N, H, W, C) uint8 and
    `labels` (N,) integers, checked from the array headers; labels that are not 0..K-1 are
    mapped to 0..K-1 in sorted order (the class names are the original values)."""
    if not os.path.isfile(path):
        raise DataError(f"--npz={path} is not a file.")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DataError(f"--npz={path} is not a .npz file: {error}") from None
    with archive:
        members = {os.path.splitext(n)[0]: n for n in archive.namelist()}
        if not {"images", "labels"} <= set(members):
            raise DataError(
                f"{path} must hold arrays 'images' and 'labels'; it has "
                f"{', '.join(sorted(members)) or 'none'}."
            )
        shape, fortran_order, dtype, offset = _npz_header(archive, members["images"])
        with archive.open(members["labels"]) as f:
            labels = np.load(f)
    if dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8 (pixels 0..255), got {dtype}.")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise DataError(
            f"{path}: images must be (N, H, W) or (N, H, W, C) with C 1 or 3, got {shape}."
        )
    if fortran_order:
        raise DataError(
            f"{path}: images are stored in Fortran order; save np.ascontiguousarray(images)."
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: labels must be a 1-D array of integers, got {labels.dtype} {labels.shape}."
        )
    if len(labels) != shape[0]:
        raise DataError(f"{path}: images has {shape[0]} rows but labels has {len(labels)}.")
    if not len(labels):
        raise DataError(f"{path} holds no images.")
    values, mapped = np.unique(labels, return_inverse=True)
    if len(values) < 2:
        raise DataError(f"{path}: every label is {values[0]}; training needs >= 2 classes.")
    note = ""
    if not np.array_equal(values, np.arange(len(values))):
        shown = ", ".join(map(str, values[:10])) + (", ..." if len(values) > 10 else "")
        note = (
            f"labels {shown} are not 0..{len(values) - 1}: stored as 0..{len(values) - 1} in "
            f"sorted order, the original values kept as the class names."
        )
    source = Source(
        kind="npz",
        path=path,
        examples=range(len(labels)),
        labels=mapped.astype(np.int64),
        class_names=tuple(str(v) for v in values),
        note=note,
        label_values=[int(v) for v in values] if note else None,
    )
    return source, NpzImages(path, members["images"], tuple(shape), offset)
