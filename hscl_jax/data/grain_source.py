"""This process's share of each batch, read by random access and decoded, served through Grain.

A batch is a pure function of its number: `TrainBatchReader(step)` asks the sampler for the
global batch's indices, keeps this process's contiguous slice and reads and decodes only those
records; `EvalBatchReader(batch)` does the same for the in-order, padded evaluation batches. Both
are served by batch number, so the stream starts at any step without iterator state.
`batch_loaders` serves them in order, decoding either in the caller's threads (decode_workers=0)
or in Grain worker processes (a `grain.MapDataset` over batch numbers).

Images come out as uint8 (b, H, W, C), as stored: augmentation is the caller's business. No jax
or TensorFlow import here: Grain's worker processes unpickle these readers.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Protocol, TypedDict, cast

import numpy as np

from hscl_jax.data.errors import DataError
from hscl_jax.data.samplers import BatchIndexer

# Batches each worker process prepares ahead of the consumer.
_WORKER_BUFFER_BATCHES = 2
_NEVER_SHARED_MEMORY = 2**62


class Record(TypedDict):
    """One example of a split: its image, uint8 (H, W, C) (or the encoded bytes, in a split
    opened without decoding), and its class label."""

    image: np.ndarray | bytes
    label: int | np.integer


class Records(Protocol):
    """A split read by random access: its length, and the record at each index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Record: ...


@dataclasses.dataclass(frozen=True)
class ResizeDecode:
    """Encoded image bytes -> uint8 (size, size, channels): the shorter side resized to `size`
    (bilinear, antialiased), then the centre size x size crop, as ImageNet evaluation does.

    JPEGs are decoded at the smallest DCT scale that keeps both sides >= size (PIL's draft
    mode), which makes decoding a large photo several times cheaper.
    """

    size: int
    channels: int

    def __call__(self, encoded: bytes) -> np.ndarray:
        import PIL.Image

        mode = "RGB" if self.channels == 3 else "L"
        with PIL.Image.open(io.BytesIO(encoded)) as opened:
            opened.draft(mode, (self.size, self.size))
            image = opened.convert(mode)
        width, height = image.size
        scale = self.size / min(width, height)
        resized = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        image = image.resize(resized, PIL.Image.Resampling.BILINEAR)
        left = (resized[0] - self.size) // 2
        top = (resized[1] - self.size) // 2
        pixels = np.asarray(image.crop((left, top, left + self.size, top + self.size)), np.uint8)
        return pixels.reshape(self.size, self.size, self.channels)


def read_examples(
    records: Records, indices: np.ndarray, decode: ResizeDecode | None = None
) -> dict[str, np.ndarray]:
    """{"image": uint8 (n, H, W, C), "label": int32 (n,)} of the records at `indices`.

    `decode` turns encoded image bytes into pixels; None: the records hold decoded images.
    """
    examples = [records[int(index)] for index in indices]
    images = [
        # A split is opened undecoded (its images are bytes) exactly when it has a `decode`.
        decode(cast(bytes, example["image"])) if decode else np.asarray(example["image"], np.uint8)
        for example in examples
    ]
    return {
        "image": np.stack(images),
        "label": np.array([example["label"] for example in examples], dtype=np.int32),
    }


@dataclasses.dataclass(frozen=True)
class TrainBatchReader:
    """step -> this process's slice [host_start, host_stop) of global batch `step`, decoded."""

    records: Records
    indexer: BatchIndexer
    host_start: int
    host_stop: int
    decode: ResizeDecode | None = None

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        indices = self.indexer(step)[self.host_start : self.host_stop]
        return read_examples(self.records, indices, self.decode)


@dataclasses.dataclass(frozen=True)
class EvalBatchReader:
    """batch -> this process's slice of evaluation batch `batch`, in order, padded at the end.

    Returns {"image": uint8, "label": int32, "mask": bool}; padding rows hold zero images,
    label 0 and mask False.
    """

    records: Records
    batch_size: int
    host_start: int
    host_stop: int
    decode: ResizeDecode | None = None

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        positions = batch * self.batch_size + np.arange(self.host_start, self.host_stop)
        mask = positions < len(self.records)
        host_batch = self.host_stop - self.host_start
        if not mask.any():
            # This process's slice of the last batch is all padding (a split shorter than the
            # batch, several processes): one record gives the image shape.
            first = read_examples(self.records, np.zeros(1, np.int64), self.decode)["image"]
            return {
                "image": np.zeros((host_batch, *first.shape[1:]), np.uint8),
                "label": np.zeros(host_batch, np.int32),
                "mask": mask,
            }
        examples = read_examples(self.records, positions[mask], self.decode)
        images = np.zeros((host_batch, *examples["image"].shape[1:]), np.uint8)
        labels = np.zeros(host_batch, np.int32)
        # Padding only ever follows the last example, so the real rows come first.
        images[: mask.sum()] = examples["image"]
        labels[: mask.sum()] = examples["label"]
        return {"image": images, "label": labels, "mask": mask}


def import_grain() -> ModuleType:
    """Imports grain, or says in one line how to install it."""
    try:
        import grain
    except ImportError:
        raise ImportError(
            "decode_workers > 0 needs the grain package: pip install 'hscl_jax[data]'."
        ) from None
    return grain


def check_decode_workers(decode_workers: int) -> None:
    """Raises DataError (one line, with the fix) when Grain cannot start its worker processes."""
    if decode_workers < 0:
        raise DataError(
            f"decode_workers must be >= 0 (0: decode in this process), got {decode_workers}."
        )
    if decode_workers == 0:
        return
    from absl import flags

    # Grain's workers read Grain's absl flags, which exist only once flags are parsed.
    if not flags.FLAGS.is_parsed():
        raise DataError(
            f"decode_workers={decode_workers} starts Grain worker processes, which need absl "
            "flags parsed: run inside absl.app.run (train.py does) or call "
            "absl.flags.FLAGS(sys.argv[:1]) first, or set decode_workers=0."
        )


def batch_loaders(
    reader: Callable[[int], dict[str, np.ndarray]],
    *,
    start: int,
    stop: int | None,
    decode_workers: int,
) -> Iterator[tuple[int, Callable[[], dict[str, np.ndarray]]]]:
    """(n, load) for n = start, start + 1, ... (< stop; None: endless); load() returns reader(n).

    With decode_workers=0 load() reads and decodes when called, so a pool of threads calling
    the loaders decodes in parallel; otherwise Grain worker processes have already decoded the
    batch (in order, `_WORKER_BUFFER_BATCHES` ahead per worker) and load() only hands it over.
    Close the iterator to stop the workers.
    """
    check_decode_workers(decode_workers)
    numbers = range(start, sys.maxsize if stop is None else stop)
    if decode_workers == 0:
        for number in numbers:
            yield number, functools.partial(reader, number)
        return
    grain = import_grain()
    batches = grain.MapDataset.range(numbers.start, numbers.stop).map(reader)
    # One batch per worker at a time: a worker's threads would only fight over its GIL.
    read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
    options = grain.MultiprocessingOptions(
        num_workers=decode_workers, per_worker_buffer_size=_WORKER_BUFFER_BATCHES
    )
    # Batches travel pickled through pipes, not in shared memory: Grain leaves the shared-memory
    # segments of batches still in flight when the stream is closed to the resource tracker,
    # which warns about them at exit. A batch is a few MB; the copy costs far less than decoding.
    pickled = grain.experimental.DatasetOptions(min_shm_size=_NEVER_SHARED_MEMORY)
    in_workers = grain.experimental.WithOptionsIterDataset(
        batches.to_iter_dataset(read_options), pickled
    ).mp_prefetch(options)
    iterator = iter(in_workers)
    try:
        for number, batch in zip(numbers, iterator, strict=False):
            yield number, functools.partial(dict, batch)
    finally:
        iterator.close()
