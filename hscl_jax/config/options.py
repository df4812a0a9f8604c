"""What a checked config means for the code that consumes it: the loss's, the queue's and the
theory monitor's keyword arguments, the devices and the length of a run."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from hscl_jax import data, losses
from hscl_jax.config.schema import ConfigError


def theory_hyperparameters(config: ml_collections.ConfigDict) -> dict[str, float]:
    """``{"beta", "temperature"}`` the theory checks use for ``config``, whether or not the
    train-time monitor is on (hscl_jax.analysis uses them on a finished run); unset values follow
    the loss (beta 1.0 for a loss that takes none)."""
    beta = config.theory.beta
    if beta is None:
        beta = losses.options_from_config(config.loss).get("beta", 1.0)
    temperature = config.theory.temperature
    if temperature is None:
        temperature = config.loss.temperature
    return {"beta": float(beta), "temperature": float(temperature)}


def theory_monitor_options(config: ml_collections.ConfigDict) -> dict[str, float] | None:
    """The train-time theory monitor's keyword arguments (:func:`theory_hyperparameters`) when
    config.theory.enabled, else None: the monitor is off and the step is compiled without it."""
    return theory_hyperparameters(config) if config.theory.enabled else None


# config.queue entries passed to the loss when the queue is on (to the losses that take them),
# and the loss's names for them.
QUEUE_LOSS_OPTIONS = {"as_positives": "queue_as_positives", "q": "queue_q"}


def queue_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """None when the queue is off (config.queue.size == 0), else ``{"size", "momentum",
    "loss_kwargs"}``: the step's queue size and EMA rate and the loss's queue keyword arguments."""
    queue = config.queue
    if not queue.size:
        return None
    allowed = losses.allowed_options(config.loss.name)
    loss_kwargs = {name: queue[key] for key, name in QUEUE_LOSS_OPTIONS.items() if name in allowed}
    return {"size": int(queue.size), "momentum": float(queue.momentum), "loss_kwargs": loss_kwargs}


def reference_size_for(config: ml_collections.ConfigDict) -> int:
    """Training examples in the theory monitor's fixed reference set; 0 when the monitor or the
    reference view is off."""
    return int(config.theory.reference_size) if config.theory.enabled else 0


def num_devices_for(config: ml_collections.ConfigDict) -> int:
    """Local devices this process trains on: config.num_devices, or all local devices."""
    available = jax.local_device_count()
    requested = config.num_devices
    if requested is None:
        return available
    if (
        isinstance(requested, bool)
        or not isinstance(requested, int)
        or not 1 <= requested <= available
    ):
        raise ConfigError(
            f"config.num_devices={requested!r} must be between 1 and the {available} local devices"
        )
    return requested


def total_steps_for(config: ml_collections.ConfigDict) -> int:
    """config.num_steps if set, else num_epochs x steps per epoch of the training split."""
    if config.num_steps > 0:
        return config.num_steps
    return config.num_epochs * data.steps_per_epoch(config.data, config.global_batch_size)
