"""Which examples form each global batch (numpy only).

Every function here is pure: the batches of epoch e depend only on (labels, sizes, seed, e), so the
stream can restart at any step.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from hscl_jax.data.errors import DataError

SAMPLERS = ("shuffle", "class_balanced")

# Distinct SeedSequence streams, so the data order never correlates with the augmentations.
ORDER_STREAM = 0
AUGMENT_STREAM = 1


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that orders epoch `epoch`."""
    return np.random.default_rng([seed, ORDER_STREAM, epoch])


def shuffle_epoch(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's uniform shuffle, (steps, batch_size) indices; last partial batch dropped."""
    num_steps = num_examples // batch_size
    permutation = epoch_rng(seed, epoch).permutation(num_examples)
    return permutation[: num_steps * batch_size].reshape(num_steps, batch_size)


def resolve_class_balance(
    labels: np.ndarray, batch_size: int, classes_per_batch: int, samples_per_class: int
) -> tuple[int, int]:
    """Checks a class-balanced batch shape against the data; returns (P, K)."""
    if samples_per_class < 1:
        raise DataError(f"samples_per_class must be >= 1, got {samples_per_class}.")
    if classes_per_batch < 0:
        raise DataError(
            f"classes_per_batch must be >= 0 (0: batch size // samples_per_class), "
            f"got {classes_per_batch}."
        )
    num_classes_per_batch = classes_per_batch or batch_size // samples_per_class
    classes, counts = np.unique(labels, return_counts=True)
    if num_classes_per_batch * samples_per_class != batch_size:
        raise DataError(
            f"class_balanced sampler: classes_per_batch ({num_classes_per_batch}) x "
            f"samples_per_class ({samples_per_class}) = "
            f"{num_classes_per_batch * samples_per_class} must equal the global batch size "
            f"{batch_size}."
        )
    if num_classes_per_batch < 2:
        raise DataError(
            f"class_balanced sampler: classes_per_batch must be >= 2 so that anchors have "
            f"other-class negatives, got {num_classes_per_batch}."
        )
    if num_classes_per_batch > len(classes):
        raise DataError(
            f"class_balanced sampler: classes_per_batch {num_classes_per_batch} exceeds the "
            f"{len(classes)} classes of the data."
        )
    smallest = int(np.argmin(counts))
    if samples_per_class > counts[smallest]:
        raise DataError(
            f"class_balanced sampler: samples_per_class {samples_per_class} exceeds the smallest "
            f"class (label {classes[smallest]} has {counts[smallest]} examples)."
        )
    return num_classes_per_batch, samples_per_class


def _take_distinct(
    queue: np.ndarray, count: int, refill: Callable[[], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Takes `count` distinct items from the front of `queue`, appending `refill()` when short.

    Within one refill (a permutation) items are distinct; only across the seam between the old
    remainder and a fresh permutation can a duplicate appear. It is then left in the queue for a
    later draw, so items are used without replacement as far as possible.
    """
    if len(queue) < count:
        queue = np.concatenate([queue, refill()])
    head = queue[:count]
    if len(np.unique(head)) == count:
        return head, queue[count:]
    taken = np.zeros(len(queue), dtype=bool)
    seen: set[int] = set()
    for position, item in enumerate(queue.tolist()):
        if item not in seen:
            seen.add(item)
            taken[position] = True
            if len(seen) == count:
                break
    return queue[taken], queue[~taken]


def class_balanced_epoch(
    labels: np.ndarray,
    classes_per_batch: int,
    samples_per_class: int,
    seed: int,
    epoch: int,
    num_steps: int,
) -> np.ndarray:
    """(num_steps, P * K) indices; each row holds K examples of each of P distinct classes.

    Classes are drawn without replacement across consecutive batches (a fresh class permutation
    when the current one runs out), examples without replacement within their class (a fresh
    permutation of the class when it runs out). Rows are shuffled so that any slice of a batch
    (one device's share) mixes classes. Call `resolve_class_balance` first to validate P and K.
    """
    rng = epoch_rng(seed, epoch)
    classes = np.unique(labels)
    members = {int(c): np.flatnonzero(labels == c) for c in classes}
    member_queues = {c: rng.permutation(m) for c, m in members.items()}
    class_queue = rng.permutation(classes)
    batches = np.empty((num_steps, classes_per_batch * samples_per_class), dtype=np.int64)
    for step in range(num_steps):
        chosen, class_queue = _take_distinct(
            class_queue, classes_per_batch, lambda: rng.permutation(classes)
        )
        rows = []
        for label in chosen.tolist():
            picked, member_queues[label] = _take_distinct(
                member_queues[label],
                samples_per_class,
                functools.partial(rng.permutation, members[label]),
            )
            rows.append(picked)
        batches[step] = rng.permutation(np.concatenate(rows))
    return batches


class BatchIndexer:
    """Maps a step to the indices of its global batch.

    Keeps the plans of the two latest epochs in memory, so that the steps in flight around an
    epoch boundary do not recompute them; safe to call from several threads. Pickles without its
    plans (Grain's worker processes get a copy).
    """

    def __init__(
        self,
        *,
        num_examples: int,
        sampler: str,
        batch_size: int,
        seed: int,
        labels: np.ndarray | None = None,
        classes_per_batch: int = 0,
        samples_per_class: int = 1,
    ):
        if sampler not in SAMPLERS:
            raise DataError(f"Unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}.")
        if seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed}.")
        self.num_examples = num_examples
        self.steps_per_epoch = steps_per_epoch_for(num_examples, batch_size)
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = seed
        self.labels: np.ndarray | None = None
        if sampler == "class_balanced":
            if labels is None or len(labels) != num_examples:
                raise DataError(
                    f"class_balanced sampler needs the labels of all {num_examples} examples."
                )
            self.labels = np.asarray(labels)
            self.classes_per_batch, self.samples_per_class = resolve_class_balance(
                self.labels, batch_size, classes_per_batch, samples_per_class
            )
        self._plans: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"], state["_plans"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _plans={}, _lock=threading.Lock())

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, batch_size) indices of epoch `epoch`."""
        if self.sampler == "shuffle":
            return shuffle_epoch(self.num_examples, self.batch_size, self.seed, epoch)
        assert self.labels is not None  # set by __init__ for the class-balanced sampler
        return class_balanced_epoch(
            self.labels,
            self.classes_per_batch,
            self.samples_per_class,
            self.seed,
            epoch,
            self.steps_per_epoch,
        )

    def __call__(self, step: int) -> np.ndarray:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = self._plans[epoch] = self.epoch_plan(epoch)
                for old in sorted(self._plans)[:-2]:
                    del self._plans[old]
        return plan[step_in_epoch]


def stratified_test_mask(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """bool (n,): the examples of a fixed, seeded, stratified test split.

    Each class (in sorted order) gives round(test_fraction x its size) of its examples, picked by
    one generator seeded by `seed`, and keeps at least one for training.
    """
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        num_test = min(int(round(test_fraction * len(members))), len(members) - 1)
        is_test[rng.permutation(members)[:num_test]] = True
    return is_test


def steps_per_epoch_for(num_examples: int, batch_size: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped)."""
    if batch_size < 1:
        raise DataError(f"global_batch_size must be >= 1, got {batch_size}.")
    if batch_size > num_examples:
        raise DataError(
            f"global_batch_size {batch_size} exceeds the {num_examples} training examples."
        )
    return num_examples // batch_size
