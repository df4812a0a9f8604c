"""The losses by name: dispatch (``compute``), the options each takes, which take labels, and the
loss section of a training config (its options and its check)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from absl import logging

from hscl_jax.losses._checks import float32_beta_limit
from hscl_jax.losses._spec import (
    FLOAT32_BETA_LIMIT_CAP,
    FLOAT32_BETA_LIMIT_PER_INVERSE_TEMPERATURE,
    FLOAT32_GRADIENT_TOLERANCE,
    LOSS_NAMES,
    SUPERVISED_LOSSES,
    ArrayLike,
    AxisName,
)
from hscl_jax.losses._supervised import hscl, scl, supcon
from hscl_jax.losses._unsupervised import hucl, ucl

BY_NAME: dict[str, Callable[..., Any]] = {
    "ucl": ucl,
    "scl": scl,
    "hucl": hucl,
    "hscl": hscl,
    "supcon": supcon,
}


def _known(name: str) -> None:
    if name not in BY_NAME:
        raise ValueError(f"unknown loss {name!r}; allowed: {LOSS_NAMES}")


def compute(
    name: str,
    z1: ArrayLike,
    z2: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    *,
    axis_name: AxisName = None,
    **options: Any,
) -> Any:
    """Dispatches to the loss called ``name`` (one of LOSS_NAMES) with its keyword options:
    ``compute("hscl", z1, z2, labels, beta=1.0)``, or ``compute("hscl", z, labels=labels,
    beta=1.0)`` with one (B, V, d) array of views.

    ``labels`` is ignored by the label-free losses (ucl, hucl). An option the loss does not take
    raises ValueError naming it and the options allowed. Returns the loss, or (loss, LossAux)
    with ``return_aux=True``.
    """
    _known(name)
    fn = BY_NAME[name]
    allowed = sorted(allowed_options(name))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"loss {name!r} does not take option(s) {unknown}; allowed: {allowed}")
    if name in SUPERVISED_LOSSES:
        if labels is None:
            raise ValueError(f"loss {name!r} needs labels, got None")
        return fn(z1, z2, labels, axis_name=axis_name, **options)
    return fn(z1, z2, axis_name=axis_name, **options)


def allowed_options(name: str) -> tuple[str, ...]:
    """Keyword options of loss ``name``, besides the embeddings, labels and axis_name."""
    _known(name)
    params = inspect.signature(BY_NAME[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "axis_name")


def takes_labels(name: str) -> bool:
    """Whether loss ``name`` is supervised (scl, hscl, supcon): its negatives are views of other
    classes, so a batch needs two classes for any anchor to have one."""
    _known(name)
    return name in SUPERVISED_LOSSES


def options_from_config(loss_config: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a config's loss section that loss ``loss_config["name"]`` takes (others are
    ignored: the config carries every loss's options so baselines are one name away). ``None``
    values (unset placeholders) are left to the loss's default."""
    allowed = set(allowed_options(loss_config["name"])) - {"return_aux"}
    options = {
        key: value for key, value in loss_config.items() if key in allowed and value is not None
    }
    if options.get("hardening") == "topk":
        options.pop("beta", None)  # the config always carries a beta; "topk" takes none
    return options


def check_config(loss_config: Mapping[str, Any]) -> None:
    """A config's loss section: a known name, options the loss accepts (it runs once on a toy
    batch so that a bad option surfaces now rather than at the first step). Raises ValueError
    with one line; logs a warning above the float32 beta limit."""
    name = loss_config["name"]
    if name not in LOSS_NAMES:
        raise ValueError(f"config.loss.name={name!r} is unknown; allowed: {', '.join(LOSS_NAMES)}")
    toy = jnp.eye(4, 8)
    try:
        compute(name, toy, toy[::-1], jnp.array([0, 1, 0, 1]), **options_from_config(loss_config))
    except ValueError as error:
        raise ValueError(f"config.loss: {error}") from None
    warn_above_float32_beta_limit(loss_config)


def warn_above_float32_beta_limit(loss_config: Mapping[str, Any]) -> bool:
    """Logs a warning (and returns True) when the loss's beta exceeds the largest beta at which
    its float32 gradients were measured within FLOAT32_GRADIENT_TOLERANCE of float64
    (float32_beta_limit); the run still trains: typical batches stay far more accurate."""
    options = options_from_config(loss_config)
    if "beta" not in options:
        return False
    temperature = options.get("temperature", 0.5)
    limit = float32_beta_limit(temperature)
    if options["beta"] <= limit:
        return False
    logging.warning(
        "config.loss.beta=%r is above %g, the largest beta at which float32 gradients of %r were "
        "measured within %g of float64 at temperature %g (losses.float32_beta_limit: "
        "min(%g * t, %g)); gradients may be inexact",
        options["beta"],
        limit,
        loss_config["name"],
        FLOAT32_GRADIENT_TOLERANCE,
        temperature,
        FLOAT32_BETA_LIMIT_PER_INVERSE_TEMPERATURE,
        FLOAT32_BETA_LIMIT_CAP,
    )
    return True
