"""What every public loss does once its options are checked: the views from ``z1, z2`` (or one
(B, V, d) array), the input checks, and the call into the orchestration."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from hscl_jax.losses._checks import as_views, check_inputs, check_values
from hscl_jax.losses._orchestrate import run
from hscl_jax.losses._queue import Queue
from hscl_jax.losses._spec import Array, Hyper, LossAux, Spec


def call_loss(
    spec: Spec,
    hyper: Hyper,
    z1: Any,
    z2: Any,
    labels: Any,
    queue: Queue | None,
    *,
    check: bool,
    axis_name: Any,
    block_size: Any,
) -> Array | tuple[Array, LossAux]:
    """The loss of ``spec`` on the views of ``z1, z2`` after checking them (and, with ``check``,
    their values). With more than two views per image, "partner" positives are the other views
    of the anchor's image."""
    views, names = as_views(z1, z2)
    supervised = spec.negatives == "other_class" or spec.family == "supcon"
    if supervised and labels is None:
        raise ValueError("labels are required: (batch,) integer class ids, got None")
    check_inputs(views, names, labels, block_size)
    if check:
        check_values(views, names, spec.normalize)
    if len(views) > 2 and spec.positives == "partner":
        spec = dataclasses.replace(spec, positives="image")
    loss = run(spec, hyper, views, labels if supervised else None, axis_name, block_size, queue)
    return cast(Array | tuple[Array, LossAux], loss)
