"""The labelled queue of extra contrast rows the losses take (``queue=``), as a value."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Queue(NamedTuple):
    """Labelled extra contrast rows: a MoCo-style first-in-first-out queue of key projections.

    Attributes:
      z: (K, d) L2-normalised projections. Treated as constants: no gradient reaches them.
      labels: (K,) integer class ids (ignored by ucl and hucl).
      valid: (K,) bool; False marks a row not filled yet, which is left out of every mask
        (never contrasted as a zero vector).

    ``Queue.empty(K, d)`` makes an empty queue and ``queue.push(keys, labels)`` a new one with a
    batch's keys in front (newest rows first) and as many of its oldest rows dropped. It is a
    pytree (a NamedTuple of arrays): it can live in a train state, go through ``jax.jit`` and be
    checkpointed. ``Queue(z, labels, valid)`` builds one from arrays directly.

    What it must hold: the keys of a momentum encoder (an exponential moving average of the
    online network, e.g. ``optax.incremental_update``), not the online network's own
    projections. Filled with the online network's own (detached) projections, the queue let a
    small digits encoder collapse, every embedding onto one point and the loss to that of a
    fully collapsed batch, ``log(1 + Q)``, where the momentum encoder's keys trained normally
    (``docs/benchmarks.md`` has the measurement and the script, and
    ``docs/hardening-and-queue.md`` the guide).

    Queue rows are never anchors. As negatives they enter as the batch's views would: the
    other-class rows for scl/hscl/supcon, every valid row for ucl/hucl. Same-label rows are
    positives of the supervised losses only with ``queue_as_positives=True`` (and then SupCon's
    contrast set holds them too); otherwise they are left out. When the batch is split over
    devices the queue is the same on every device and is not gathered.
    """

    z: Array
    labels: Array
    valid: Array

    @classmethod
    def empty(cls, size: int, dim: int, dtype: Any = jnp.float32) -> Queue:
        """A queue of ``size`` rows of dimension ``dim``, none of them filled."""
        size, dim = _positive_int("size", size), _positive_int("dim", dim)
        return cls(
            jnp.zeros((size, dim), dtype),
            jnp.zeros((size,), jnp.int32),
            jnp.zeros((size,), bool),
        )

    def push(self, keys: Array, labels: Array) -> Queue:
        """This queue with ``keys`` (B, d) and their ``labels`` (B,) in front, in batch order,
        and its B oldest rows dropped; a batch larger than the queue keeps its first K rows.
        The keys are stored as constants (no gradient flows back into them)."""
        size, dim = self.z.shape
        if jnp.ndim(keys) != 2 or jnp.shape(keys)[1] != dim:
            raise ValueError(
                f"keys must have shape (B, {dim}) to match the queue, got {jnp.shape(keys)}"
            )
        batch = jnp.shape(keys)[0]
        if jnp.shape(labels) != (batch,) or not jnp.issubdtype(
            jnp.result_type(labels), jnp.integer
        ):
            raise ValueError(
                f"labels must be integers of shape ({batch},) to match keys, got "
                f"{jnp.result_type(labels)} {jnp.shape(labels)}"
            )
        keys = lax.stop_gradient(jnp.asarray(keys)).astype(self.z.dtype)

        def in_front(new: Array, old: Array) -> Array:
            return jnp.concatenate([new.astype(old.dtype), old])[:size]

        return Queue(
            in_front(keys, self.z),
            in_front(jnp.asarray(labels), self.labels),
            in_front(jnp.ones((batch,), bool), self.valid),
        )
