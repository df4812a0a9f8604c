"""The labelled queue of extra contrast rows the losses take (``queue=``)."""

from __future__ import annotations

from typing import NamedTuple

import jax

Array = jax.Array


class Queue(NamedTuple):
    """Labelled extra contrast rows, e.g. a MoCo-style FIFO of key projections.

    Attributes:
      z: (K, d) L2-normalised projections. Treated as constants: no gradient reaches them.
      labels: (K,) integer class ids (ignored by ucl and hucl).
      valid: (K,) bool; False marks a row not filled yet, which is left out of every mask
        (never contrasted as a zero vector).

    Queue rows are never anchors. As negatives they enter as the batch's views would: the
    other-class rows for scl/hscl/supcon, every valid row for ucl/hucl. Same-label rows are
    positives of the supervised losses only with ``queue_as_positives=True`` (and then SupCon's
    contrast set holds them too); otherwise they are left out. When the batch is split over
    devices the queue is the same on every device and is not gathered.
    """

    z: Array
    labels: Array
    valid: Array
