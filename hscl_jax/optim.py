"""Optimisers and learning-rate schedules, built from ``config.optim``, and the check of that
section (:func:`check_config`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import optax

if TYPE_CHECKING:
    import ml_collections

OPTIMIZER_NAMES = ("adam", "adamw", "sgd", "lars")
SCHEDULE_NAMES = ("constant", "warmup_cosine")


def check_config(optim_config: ml_collections.ConfigDict) -> None:
    """``config.optim``: a known optimiser and schedule, a positive learning rate, a decay >= 0 and
    whole warm-up steps >= 0; ValueError (one line naming the field) otherwise."""
    for field, names in (("name", OPTIMIZER_NAMES), ("schedule", SCHEDULE_NAMES)):
        if optim_config[field] not in names:
            raise ValueError(
                f"optim.{field}={optim_config[field]!r} is unknown; allowed: {', '.join(names)}"
            )
    if not optim_config.learning_rate > 0:
        raise ValueError(f"optim.learning_rate={optim_config.learning_rate!r} must be > 0")
    if not optim_config.weight_decay >= 0:
        raise ValueError(f"optim.weight_decay={optim_config.weight_decay!r} must be >= 0")
    warmup = optim_config.warmup_steps
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"optim.warmup_steps={warmup!r} must be an integer >= 0")


def create_learning_rate_schedule(
    optim_config: ml_collections.ConfigDict, total_steps: int
) -> optax.Schedule:
    """'constant' (after an optional linear warm-up) or 'warmup_cosine' to
    ``learning_rate * final_lr_fraction`` at ``total_steps``."""
    peak = float(optim_config.learning_rate)
    warmup = min(int(optim_config.warmup_steps), total_steps)
    if optim_config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=peak * float(optim_config.final_lr_fraction),
        )
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )


def _kernels_only(params: Any) -> Any:
    """Mask selecting weight matrices/kernels (not biases or BatchNorm scales/offsets)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(
    optim_config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation and its learning-rate schedule.

    - 'adam' (reference): L2 weight decay ADDED TO THE GRADIENT before Adam, as PyTorch's
      ``Adam(weight_decay=...)`` (not decoupled AdamW).
    - 'adamw': decoupled weight decay.
    - 'sgd': momentum SGD, L2 decay added to the gradient (PyTorch ``SGD(weight_decay=...)``).
    - 'lars': optax.lars (momentum, trust ratio).
    ``weight_decay_on_bn_and_bias=False`` restricts decay (and LARS trust ratios) to kernels.
    """
    schedule = create_learning_rate_schedule(optim_config, total_steps)
    decay = float(optim_config.weight_decay)
    mask = None if optim_config.weight_decay_on_bn_and_bias else _kernels_only
    name = optim_config.name
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer {name!r} is unknown; allowed: {', '.join(OPTIMIZER_NAMES)}")
    if name == "adam":
        tx = optax.chain(
            optax.add_decayed_weights(decay, mask),
            optax.scale_by_adam(
                b1=optim_config.b1, b2=optim_config.b2, eps=float(optim_config.eps)
            ),
            optax.scale_by_learning_rate(schedule),
        )
    elif name == "adamw":
        tx = optax.adamw(
            schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=float(optim_config.eps),
            weight_decay=decay,
            mask=mask,
        )
    elif name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(decay, mask),
            optax.sgd(
                schedule,
                momentum=optim_config.momentum or None,
                nesterov=optim_config.nesterov,
            ),
        )
    else:  # "lars"
        tx = optax.lars(
            schedule,
            weight_decay=decay,
            weight_decay_mask=True if mask is None else mask,
            trust_coefficient=optim_config.trust_coefficient,
            trust_ratio_mask=True if mask is None else mask,
            momentum=optim_config.momentum,
            nesterov=optim_config.nesterov,
        )
    return tx, schedule
