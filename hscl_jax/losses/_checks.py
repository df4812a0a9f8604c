"""Argument checks of the public losses: each bad value raises one ValueError line naming it and
what is allowed. Hyper-parameters that are traced (``jax.vmap`` over beta, say) pass unchecked."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

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


def as_views(z1: Any, z2: Any) -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """The views, V arrays (B, d), and their names for messages: (z1, z2), or the V slices of
    one (B, V, d) array."""
    if z2 is None:
        shape = jnp.shape(z1)
        if len(shape) != 3 or shape[1] < 2:
            raise ValueError(
                "pass z1 and z2 of shape (batch, dim), or one array of shape (batch, views, dim) "
                f"with views >= 2; got z1 of shape {shape} and no z2"
            )
        z = jnp.asarray(z1)
        return tuple(z[:, v] for v in range(shape[1])), tuple(f"z[:, {v}]" for v in range(shape[1]))
    if len(jnp.shape(z1)) == 3:
        raise ValueError(
            "with one (batch, views, dim) array of views pass labels by keyword (labels=...); "
            f"got a second positional argument of shape {jnp.shape(z2)}"
        )
    return (z1, z2), ("z1", "z2")


def check_inputs(
    views: tuple[Any, ...], names: tuple[str, ...], labels: Any, block_size: Any
) -> None:
    """Shapes and dtypes of the embeddings and labels, and the block size."""
    shapes = [jnp.shape(view) for view in views]
    if len(shapes[0]) != 2 or any(shape != shapes[0] for shape in shapes):
        if len(views) == 2:
            raise ValueError(
                f"z1 and z2 must both have shape (batch, dim), got {shapes[0]} and {shapes[1]}"
            )
        raise ValueError(f"the views must have shape (batch, views, dim), got {shapes}")
    if shapes[0][0] < 1:
        raise ValueError(f"the batch must hold at least one image, got shape {shapes[0]}")
    for name, z in zip(names, views, strict=True):
        if not jnp.issubdtype(jnp.result_type(z), jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {jnp.result_type(z)}")
    if labels is not None:
        batch, matched = shapes[0][0], names[0].split("[")[0]
        if jnp.shape(labels) != (batch,):
            raise ValueError(
                f"labels must have shape ({batch},) to match {matched}, got {jnp.shape(labels)}"
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


def _unit_norm_tolerance(dtype: Any) -> float:
    """How far from 1 a row's norm may be: rounding of the embeddings in their own dtype."""
    eps = jnp.finfo(dtype).eps  # type: ignore[no-untyped-call]  # ml_dtypes' finfo, unannotated
    return max(1e-3, 8 * float(eps))


def _shown_rows(rows: np.ndarray, values: np.ndarray | None = None) -> str:
    shown = ", ".join(
        str(r) if values is None else f"{r} (norm {v:.4g})"
        for r, v in zip(rows[:5], rows[:5] if values is None else values[:5], strict=True)
    )
    return shown + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def check_values(views: tuple[Any, ...], names: tuple[str, ...], normalize: bool) -> None:
    """``check_inputs=True``: non-finite values, and rows that are not of unit norm (unless the
    loss normalises them), named in one ValueError line. Concrete arrays are checked now; traced
    ones with ``jax.experimental.checkify`` checks, which the caller functionalises with
    ``checkify.checkify`` (JAX refuses to stage an unfunctionalised check)."""
    if any(isinstance(view, jax.core.Tracer) for view in views):
        _staged_checks(views, names, normalize)
        return
    problems = []
    for name, view in zip(names, views, strict=True):
        tolerance = _unit_norm_tolerance(jnp.result_type(view))
        x = np.asarray(jnp.asarray(view, jnp.float32))
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            problems.append(
                f"{name} has non-finite values in rows {_shown_rows(np.flatnonzero(~finite))}"
            )
        if not normalize:
            norms = np.linalg.norm(np.where(finite[:, None], x, 0.0), axis=1)
            off = np.flatnonzero(finite & (np.abs(norms - 1.0) > tolerance))
            if off.size:
                problems.append(
                    f"{name} rows {_shown_rows(off, norms[off])} are not of unit norm "
                    f"(tolerance {tolerance:g})"
                )
    if problems:
        hint = "" if normalize else "; L2-normalise the embeddings or pass normalize=True"
        raise ValueError("check_inputs: " + "; ".join(problems) + hint)


def _staged_checks(views: tuple[Any, ...], names: tuple[str, ...], normalize: bool) -> None:
    for name, view in zip(names, views, strict=True):
        tolerance = _unit_norm_tolerance(jnp.result_type(view))
        x = jnp.asarray(view, jnp.float32)
        finite = jnp.all(jnp.isfinite(x), axis=1)
        checkify.check(
            jnp.all(finite),
            f"check_inputs: {name} has non-finite values (first in row {{row}})",
            row=jnp.argmin(finite),
        )
        if not normalize:
            norms = jnp.linalg.norm(jnp.where(finite[:, None], x, 0.0), axis=1)
            off = finite & (jnp.abs(norms - 1.0) > tolerance)
            row = jnp.argmax(off)
            checkify.check(
                ~jnp.any(off),
                f"check_inputs: {name} row {{row}} has norm {{norm}}, not 1 within "
                f"{tolerance:g}; L2-normalise the embeddings or pass normalize=True",
                row=row,
                norm=norms[row],
            )


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
    dim = jnp.shape(z1)[-1] if len(jnp.shape(z1)) in (2, 3) else None
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
