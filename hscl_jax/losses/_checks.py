"""Argument checks of the public losses: each bad value raises one ValueError line naming it and
what is allowed. Hyper-parameters that are traced (``jax.vmap`` over beta, say) pass unchecked."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hscl_jax.losses._queue import Queue
from hscl_jax.losses._spec import (
    FLOAT32_BETA_LIMIT_CAP,
    FLOAT32_BETA_LIMIT_PER_INVERSE_TEMPERATURE,
    HARDENINGS,
    POSITIVES,
    QUEUE_Q_MODES,
)


def check_number(
    name: str, value: Any, *, low: float, low_inclusive: bool, high: float | None = None
) -> Any:
    """Validates a hyper-parameter; a traced value (e.g. under jax.vmap over beta) passes as is."""
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, jax.Array | np.ndarray) and value.shape == ():
        value = value.item()
    allowed = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number {allowed}, got {value!r}")
    value = float(value)
    too_low = value < low if low_inclusive else value <= low
    if not math.isfinite(value) or too_low or (high is not None and value >= high):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    return value


def check_beta(value: Any) -> Any:
    """A concrete beta as a float (finite, >= 0); a traced value passes as is."""
    return check_number("beta", value, low=0.0, low_inclusive=True)


def check_temperature(value: Any) -> Any:
    """A concrete temperature as a float (finite, > 0); a traced value passes as is."""
    return check_number("temperature", value, low=0.0, low_inclusive=False)


def float32_beta_limit(temperature: float) -> float:
    """The largest beta at which float32 gradients of hscl/hucl stay within 1e-3 of float64.

    ``min(3000 * temperature, 600)``. The error is ``||g32 - g64|| / ||g64||`` over the gradients
    of z1 and z2, g64 from the same inputs in float64. What limits float32 is the rounding of
    the similarities themselves (about 2^-24 / t absolute), which the tilt multiplies by beta;
    the kernels add no error of their own beyond it. The limit is set by the worst case we could
    construct, every embedding within a cone so narrow that the spread of s over the negatives
    is about 1/beta; typical batches are far more accurate. ``docs/benchmarks.md`` has the
    measured errors and the command that measures them. The trainer's config check warns above
    this limit.
    """
    temperature = check_temperature(temperature)
    return min(FLOAT32_BETA_LIMIT_PER_INVERSE_TEMPERATURE * temperature, FLOAT32_BETA_LIMIT_CAP)


def check_inputs(z1: Any, z2: Any, labels: Any, block_size: Any) -> None:
    """Shapes and dtypes of the embeddings and labels, and the block size."""
    z1_shape, z2_shape = jnp.shape(z1), jnp.shape(z2)
    if len(z1_shape) != 2 or z1_shape != z2_shape:
        raise ValueError(
            f"z1 and z2 must both have shape (batch, dim), got {z1_shape} and {z2_shape}"
        )
    if z1_shape[0] < 1:
        raise ValueError(f"the batch must hold at least one image, got shape {z1_shape}")
    for name, z in (("z1", z1), ("z2", z2)):
        if not jnp.issubdtype(jnp.result_type(z), jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {jnp.result_type(z)}")
    if labels is not None:
        if jnp.shape(labels) != (z1_shape[0],):
            raise ValueError(
                f"labels must have shape ({z1_shape[0]},) to match z1, got {jnp.shape(labels)}"
            )
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise ValueError(
                f"labels must be integers, got dtype {jnp.result_type(labels)}; "
                "cast class ids with labels.astype(jnp.int32)"
            )
    if block_size is not None and (
        isinstance(block_size, bool)
        or not isinstance(block_size, numbers.Integral)
        or block_size < 1
    ):
        raise ValueError(f"block_size must be None or a positive integer, got {block_size!r}")


def maybe_positive(value: Any) -> bool:
    """Whether a hyper-parameter may be > 0: the general code path serves a traced value."""
    return isinstance(value, jax.core.Tracer) or value > 0


def check_hardening(hardening: Any, beta: Any, top_k: Any) -> tuple[dict[str, Any], Any]:
    """(spec fields, beta to trace) for a hardening; beta is left out where it is not used."""
    if callable(hardening):
        name = "callable"
    elif isinstance(hardening, str) and hardening in HARDENINGS:
        name = hardening
    else:
        raise ValueError(
            f"hardening must be one of {HARDENINGS} or a callable s -> log-weight, "
            f"got {hardening!r}"
        )
    shown = "a callable" if name == "callable" else repr(name)
    if name in ("exp", "poly"):
        if beta is None:
            raise ValueError(f"beta is required with hardening={shown}, got None")
        beta = check_beta(beta)
    elif beta is not None:
        raise ValueError(
            f"beta is not used with hardening={shown}, got beta={beta!r}; leave it out"
            + (" (fold it into the callable)" if name == "callable" else "")
        )
    if name == "topk":
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(
                f"top_k must be a positive integer with hardening='topk', got {top_k!r}"
            )
        top_k = int(top_k)
    elif top_k is not None:
        raise ValueError(f"top_k is used with hardening='topk' only, got top_k={top_k!r}")
    fields = {
        "hardening": name,
        "log_weight": hardening if name == "callable" else None,
        "top_k": top_k,
        "tilted": name in ("poly", "callable") or (name == "exp" and maybe_positive(beta)),
    }
    return fields, (0.0 if beta is None else beta)


def check_queue(
    queue: Any, z1: Any, queue_q: Any, queue_as_positives: Any = False
) -> tuple[dict[str, Any], Queue | None]:
    """(spec fields, the queue as arrays) for the queue options."""
    if queue_q not in QUEUE_Q_MODES:
        raise ValueError(f"queue_q must be one of {QUEUE_Q_MODES}, got {queue_q!r}")
    if not isinstance(queue_as_positives, bool):
        raise ValueError(f"queue_as_positives must be True or False, got {queue_as_positives!r}")
    if queue is None:
        return {}, None
    if not isinstance(queue, tuple) or len(queue) != 3:
        raise ValueError(f"queue must be a losses.Queue(z, labels, valid) or None, got {queue!r}")
    z, labels, valid = queue
    dim = jnp.shape(z1)[-1] if len(jnp.shape(z1)) == 2 else None
    if len(jnp.shape(z)) != 2 or jnp.shape(z)[1] != dim:
        raise ValueError(f"queue.z must have shape (K, {dim}) to match z1, got {jnp.shape(z)}")
    size = jnp.shape(z)[0]
    if not jnp.issubdtype(jnp.result_type(z), jnp.floating):
        raise ValueError(f"queue.z must be floating point, got dtype {jnp.result_type(z)}")
    if jnp.shape(labels) != (size,) or not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(
            f"queue.labels must be integers of shape ({size},), got "
            f"{jnp.result_type(labels)} {jnp.shape(labels)}"
        )
    if jnp.shape(valid) != (size,) or jnp.result_type(valid) != jnp.bool_:
        raise ValueError(
            f"queue.valid must be booleans of shape ({size},), got "
            f"{jnp.result_type(valid)} {jnp.shape(valid)}"
        )
    fields = {"queue": True, "queue_as_positives": queue_as_positives, "queue_q": queue_q}
    return fields, Queue(z, labels, valid)


def check_positives(positives: Any) -> str:
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    return str(positives)
