"""Contrastive pre-training: the train state, the pmapped step, checkpoints and the training loop.

Entry point: :func:`train_and_evaluate` (used by ``train.py``). The pieces are importable on their
own: :func:`base_config` (the config schema), :func:`validate_config`, :func:`create_optimizer`,
:func:`create_train_state`, :func:`train_step` (one pure per-device step),
:func:`make_pmap_train_step` and :func:`make_shard_map_train_step` (two wrappings of that same
step), :func:`theory_options` and :func:`theory_settings` (the optional train-time theory
monitor), :func:`make_feature_fn`, :func:`knn_monitor`, and for finished runs
:func:`load_config`, :func:`checkpoint_steps` and :func:`restore_variables`.

The step is written with named-axis collectives over ``AXIS_NAME`` only: the loss all-gathers the
projections and labels so every device's anchors meet the whole global batch, each device's
gradient is its share of the global-loss gradient and is therefore SUMMED (``lax.psum``) across
devices; BatchNorm statistics are averaged across devices (global BN).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax import lax
from ml_collections import config_dict

from hscl_jax import analysis, distributed, evaluate, losses, models

AXIS_NAME = "batch"
OPTIMIZER_NAMES = ("adam", "adamw", "sgd", "lars")
SCHEDULE_NAMES = ("constant", "warmup_cosine")
# Metric keys produced by the step (besides the loss aux) and reduced over a logging interval.
_AUX_KEYS = losses.LossAux._fields


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training starts."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a plain pytree (checkpointed as a dict)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "params": self.params,
            "batch_stats": self.batch_stats,
            "opt_state": self.opt_state,
        }


# ----------------------------------------------------------------------------- config


def base_config(dataset: str = "cifar10") -> ml_collections.ConfigDict:
    """The full config schema with the reference recipe's values (configs/ start from here).

    Reference: ResNet-50, Adam 1e-3 with L2 1e-6 added to the gradient, batch 256, t 0.5, 200
    epochs, H-SCL beta 1. ``dataset`` picks ``config.data`` (hscl_jax.data.default_data_config).

    Schema (every field is overridable, e.g. ``--config.loss.beta=5``):

    - ``seed``: int; seeds the parameter init. The data order and augmentations are seeded by
      ``data.seed`` (batch n depends only on (data.seed, n, config.data)).
    - ``global_batch_size``: images per step over all devices of all processes (each gives 2 views).
    - ``num_steps`` (> 0 wins) or ``num_epochs`` (x steps per epoch of the train split).
    - ``num_devices``: local devices to use (None: all); ``distributed``: call
      jax.distributed.initialize() (also when the environment sets HSCL_DISTRIBUTED=1).
    - ``model``: ``name`` (small_cnn | resnet18 | resnet50), ``width`` (None: reference width),
      ``stage_sizes`` (ResNets; None: the named depth), ``head_hidden_dim`` (512),
      ``projection_dim`` (128), ``dtype`` (float32 | bfloat16 compute).
    - ``loss``: ``name`` (ucl | scl | hucl | hscl | supcon) and the options of all losses; only
      those the chosen loss takes are passed to it (see hscl_jax.losses): ``temperature``,
      ``beta``, ``positives`` (all | partner), ``detach_weights``, ``tau_plus``, ``clamp``,
      ``block_size``.
    - ``optim``: ``name`` (adam | adamw | sgd | lars), ``learning_rate``, ``weight_decay`` (L2
      added to the gradient for adam/sgd), ``weight_decay_on_bn_and_bias``, ``schedule``
      (constant | warmup_cosine), ``warmup_steps``, ``final_lr_fraction``, ``b1``, ``b2``,
      ``eps``, ``momentum``, ``nesterov``, ``trust_coefficient`` (lars).
    - ``data``: hscl_jax.data.default_data_config(name) (sampler, augmentation, data_dir, ...).
    - ``log_every_steps``, ``eval_every_steps`` (kNN monitor; 0: only at the end),
      ``checkpoint_every_steps``, ``keep_checkpoints``, ``skip_nonfinite_steps`` (False: stop the
      run).
    - ``knn``: ``k``, ``temperature``, ``eval_batch_size`` (global), ``test_chunk_size``.
    - ``theory``: the train-time theory monitor (hscl_jax.analysis.theory_metrics on every step's
      projections: the four losses, Assumption 1, the inequality flags; logged with the step
      metrics and as epoch means). ``enabled`` (False: the step is compiled without it),
      ``beta`` (None: config.loss.beta when the loss takes a beta, else 1.0), ``temperature``
      (None: config.loss.temperature).
    """
    from hscl_jax import data

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.global_batch_size = 256
    config.num_epochs = 200
    config.num_steps = 0
    config.num_devices = config_dict.placeholder(int)
    config.distributed = False

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet50"
    config.model.width = config_dict.placeholder(int)
    config.model.stage_sizes = config_dict.placeholder(tuple)
    config.model.head_hidden_dim = 512
    config.model.projection_dim = 128
    config.model.dtype = "float32"

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "hscl"
    config.loss.temperature = 0.5
    config.loss.beta = 1.0
    config.loss.positives = "all"
    config.loss.detach_weights = False
    config.loss.tau_plus = 0.0
    config.loss.clamp = False
    config.loss.block_size = config_dict.placeholder(int)

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 1e-6
    config.optim.weight_decay_on_bn_and_bias = True
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.optim.final_lr_fraction = 0.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.momentum = 0.9
    config.optim.nesterov = False
    config.optim.trust_coefficient = 0.001

    config.data = data.default_data_config(dataset)

    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.skip_nonfinite_steps = False

    config.knn = ml_collections.ConfigDict()
    config.knn.k = 200
    config.knn.temperature = 0.5
    config.knn.eval_batch_size = 512
    config.knn.test_chunk_size = 1024

    config.theory = ml_collections.ConfigDict()
    config.theory.enabled = False
    config.theory.beta = config_dict.placeholder(float)
    config.theory.temperature = config_dict.placeholder(float)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive_int(config, key: str, prefix: str = "config") -> None:
    value = config[key]
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{prefix}.{key}={value!r} must be a positive integer",
    )


def _non_negative_int(config, key: str, prefix: str = "config") -> None:
    value = config[key]
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        f"{prefix}.{key}={value!r} must be an integer >= 0",
    )


def loss_options(loss_config) -> dict[str, Any]:
    """The options of ``loss_config`` that loss ``loss_config.name`` takes (others are ignored:
    the config carries every loss's options so baselines are one ``--config.loss.name`` away).
    ``None`` values (unset placeholders) are left to the loss's default."""
    allowed = set(losses.allowed_options(loss_config.name)) - {"return_aux"}
    return {
        key: value for key, value in loss_config.items() if key in allowed and value is not None
    }


def theory_settings(config) -> dict[str, float]:
    """``{"beta", "temperature"}`` the train-time theory monitor uses (or would use) for ``config``.

    Unset values follow the loss: beta is config.loss.beta when the loss takes a beta (else 1.0),
    the temperature config.loss.temperature. A config without a ``theory`` entry (a run written
    before it existed) follows the loss.
    """
    theory = config.get("theory") or {}
    beta = theory.get("beta")
    if beta is None:
        beta = loss_options(config.loss).get("beta", 1.0)
    temperature = theory.get("temperature")
    if temperature is None:
        temperature = config.loss.temperature
    return {"beta": float(beta), "temperature": float(temperature)}


def theory_options(config) -> dict[str, float] | None:
    """:func:`theory_settings` when config.theory.enabled, else None (the monitor is off)."""
    theory = config.get("theory")
    if theory is None or not theory.get("enabled"):
        return None
    return theory_settings(config)


def num_devices_for(config) -> int:
    """Local devices this process trains on: config.num_devices, or all local devices."""
    available = jax.local_device_count()
    requested = config.get("num_devices")
    if requested is None:
        return available
    _require(
        isinstance(requested, int) and 1 <= requested <= available,
        f"config.num_devices={requested!r} must be between 1 and the {available} local devices",
    )
    return requested


def validate_config(config) -> None:
    """Checks every value the run depends on; raises ConfigError (a ValueError) with one line."""
    from hscl_jax import data

    for key in ("global_batch_size", "log_every_steps", "checkpoint_every_steps"):
        _positive_int(config, key)
    for key in ("num_steps", "num_epochs", "eval_every_steps", "keep_checkpoints", "seed"):
        _non_negative_int(config, key)
    _require(
        config.num_steps > 0 or config.num_epochs > 0,
        "config.num_steps and config.num_epochs are both 0: set one of them to train",
    )
    _require(config.keep_checkpoints >= 1, "config.keep_checkpoints must be >= 1")
    _require(
        isinstance(config.skip_nonfinite_steps, bool),
        f"config.skip_nonfinite_steps={config.skip_nonfinite_steps!r} must be True or False",
    )

    # Model.
    _require(
        config.model.name in models.MODEL_NAMES,
        f"config.model.name={config.model.name!r} is unknown; allowed: "
        f"{', '.join(models.MODEL_NAMES)}",
    )
    try:
        models.model_from_config(config.model)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    # Loss: the loss validates its own options; run it once on a toy batch to surface errors now.
    _require(
        config.loss.name in losses.LOSS_NAMES,
        f"config.loss.name={config.loss.name!r} is unknown; allowed: "
        f"{', '.join(losses.LOSS_NAMES)}",
    )
    toy = jnp.eye(4, 8)
    try:
        losses.compute(
            config.loss.name, toy, toy[::-1], jnp.array([0, 1, 0, 1]), **loss_options(config.loss)
        )
    except ValueError as error:
        raise ConfigError(f"config.loss: {error}") from None

    # Optimiser.
    optim = config.optim
    _require(
        optim.name in OPTIMIZER_NAMES,
        f"config.optim.name={optim.name!r} is unknown; allowed: {', '.join(OPTIMIZER_NAMES)}",
    )
    _require(
        optim.schedule in SCHEDULE_NAMES,
        f"config.optim.schedule={optim.schedule!r} is unknown; allowed: "
        f"{', '.join(SCHEDULE_NAMES)}",
    )
    _require(
        optim.learning_rate > 0, f"config.optim.learning_rate={optim.learning_rate!r} must be > 0"
    )
    _require(
        optim.weight_decay >= 0, f"config.optim.weight_decay={optim.weight_decay!r} must be >= 0"
    )
    _non_negative_int(optim, "warmup_steps", "config.optim")

    # Data.
    try:
        info = data.dataset_info(config.data.name)
    except (ValueError, KeyError) as error:
        raise ConfigError(f"config.data.name={config.data.name!r}: {error}") from None
    del info
    total_devices = jax.process_count() * num_devices_for(config)
    _require(
        config.global_batch_size % total_devices == 0,
        f"config.global_batch_size={config.global_batch_size} is not divisible by the "
        f"{total_devices} devices (processes x local devices)",
    )

    # kNN monitor.
    _positive_int(config.knn, "k", "config.knn")
    _require(
        config.knn.temperature > 0,
        f"config.knn.temperature={config.knn.temperature!r} must be > 0",
    )
    _positive_int(config.knn, "eval_batch_size", "config.knn")
    _positive_int(config.knn, "test_chunk_size", "config.knn")
    _require(
        config.knn.eval_batch_size % total_devices == 0,
        f"config.knn.eval_batch_size={config.knn.eval_batch_size} is not divisible by the "
        f"{total_devices} devices",
    )

    # Theory monitor.
    theory = config.get("theory")
    if theory is not None:
        _require(
            isinstance(theory.enabled, bool),
            f"config.theory.enabled={theory.enabled!r} must be True or False",
        )
        for key, lowest, allowed in (("beta", 0.0, ">= 0"), ("temperature", None, "> 0")):
            value = theory.get(key)
            _require(
                value is None
                or (
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and (value >= lowest if lowest is not None else value > 0)
                ),
                f"config.theory.{key}={value!r} must be None (follow config.loss) or a finite "
                f"number {allowed}",
            )


def total_steps_for(config) -> int:
    """config.num_steps if set, else num_epochs x steps per epoch of the training split."""
    if config.num_steps > 0:
        return config.num_steps
    from hscl_jax import data

    return config.num_epochs * data.steps_per_epoch(config.data, config.global_batch_size)


# ----------------------------------------------------------------------------- optimiser


def create_learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
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


def _kernels_only(params):
    """Mask selecting weight matrices/kernels (not biases or BatchNorm scales/offsets)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(
    optim_config, total_steps: int
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
    elif name == "lars":
        tx = optax.lars(
            schedule,
            weight_decay=decay,
            weight_decay_mask=True if mask is None else mask,
            trust_coefficient=optim_config.trust_coefficient,
            trust_ratio_mask=True if mask is None else mask,
            momentum=optim_config.momentum,
            nesterov=optim_config.nesterov,
        )
    else:
        raise ConfigError(
            f"config.optim.name={name!r} is unknown; allowed: {', '.join(OPTIMIZER_NAMES)}"
        )
    return tx, schedule


# ----------------------------------------------------------------------------- state and step


def create_train_state(
    key: jax.Array, model: models.ContrastiveModel, tx, input_shape: tuple[int, ...]
) -> TrainState:
    """Initialised parameters, BatchNorm statistics and optimizer state (on the default device).

    ``input_shape`` is one example's (H, W, C).
    """
    # Partitionable threefry (JAX's default) makes XLA:CPU take ~18 s instead of ~3 s to compile
    # even a small CNN's init (measured on a 2-core CPU); init runs on one device, so the
    # non-partitionable variant loses nothing.
    with jax.threefry_partitionable(False):
        variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *input_shape)), train=False))(key)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: models.ContrastiveModel,
    tx: optax.GradientTransformation,
    loss_name: str,
    loss_kwargs: dict[str, Any],
    axis_name: str = AXIS_NAME,
    theory_kwargs: dict[str, float] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on this device's share of the global batch.

    ``batch``: {"view1", "view2": (b, H, W, C), "label": (b,)}. Must run inside a mapped context
    (pmap or shard_map) binding ``axis_name``; ``model`` must use ``bn_axis_name=axis_name``.
    A step whose loss or gradient is not finite leaves params, BatchNorm statistics and optimizer
    state unchanged (the step counter still advances) and reports ``finite = 0``.
    Every returned metric is global (identical on all devices).
    ``theory_kwargs`` ({"beta", "temperature"}, see :func:`theory_options`) adds
    hscl_jax.analysis.theory_metrics of the step's projections (keys analysis.THEORY_KEYS; no
    effect on the update); None leaves it out of the compiled step.
    """
    num_images = batch["view1"].shape[0]
    # One forward pass over both views: BatchNorm sees (and syncs) the statistics of all 2b views.
    images = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)

    def objective(params):
        (_, projection), updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        projection = projection.astype(jnp.float32)
        z1, z2 = projection[:num_images], projection[num_images:]
        loss, aux = losses.compute(
            loss_name,
            z1,
            z2,
            batch["label"],
            axis_name=axis_name,
            return_aux=True,
            **loss_kwargs,
        )
        projections = None if theory_kwargs is None else (z1, z2)
        return loss, (aux, updates["batch_stats"], projections)

    (loss, (aux, batch_stats, projections)), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params
    )
    # Each device holds its share of the global-loss gradient: the total is the sum.
    grads = lax.psum(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep_if_bad(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = TrainState(
        step=state.step + 1,
        params=keep_if_bad(params, state.params),
        batch_stats=keep_if_bad(batch_stats, state.batch_stats),
        opt_state=keep_if_bad(opt_state, state.opt_state),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux._asdict().items()})
    if theory_kwargs is not None:
        z1, z2 = (lax.stop_gradient(z) for z in projections)
        metrics.update(
            analysis.theory_metrics(z1, z2, batch["label"], axis_name=axis_name, **theory_kwargs)
        )
    return new_state, metrics


def _step_fn(model, tx, loss_name, loss_kwargs, theory_kwargs):
    return functools.partial(
        train_step,
        model=model,
        tx=tx,
        loss_name=loss_name,
        loss_kwargs=dict(loss_kwargs),
        axis_name=AXIS_NAME,
        theory_kwargs=None if theory_kwargs is None else dict(theory_kwargs),
    )


def replicate(tree, devices):
    """Copies of ``tree`` on ``devices``, stacked on a leading axis, as the pmapped step wants.

    The arrays are sharded over a mesh whose axis is AXIS_NAME, the sharding pmap gives its own
    outputs: with any other sharding the second step (fed the first step's outputs) would compile
    the step a second time.
    """
    return flax.jax_utils.replicate(tree, devices, axis_name=AXIS_NAME)


def first_replica_to_host(tree):
    """Host (numpy) copy of the first local replica of a replicated/pmapped tree.

    (flax.jax_utils.unreplicate keeps the leading axis when pmap ran on a subset of the local
    devices, e.g. 1 of 8; reading the first addressable shard is right in every case and moves
    no data between devices.)
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def make_pmap_train_step(
    model, tx, loss_name, loss_kwargs, devices=None, *, theory_kwargs=None
) -> Callable:
    """``train_step`` under ``jax.pmap(axis_name=AXIS_NAME)``: replicated state, (D, b, ...) batch.

    The state argument is donated (its buffers are reused for the new state). ``theory_kwargs``:
    see :func:`train_step`.
    """
    return jax.pmap(
        _step_fn(model, tx, loss_name, loss_kwargs, theory_kwargs),
        axis_name=AXIS_NAME,
        devices=devices,
        donate_argnums=(0,),
    )


def make_shard_map_train_step(
    model, tx, loss_name, loss_kwargs, mesh, *, theory_kwargs=None
) -> Callable:
    """The same ``train_step`` under ``jax.shard_map`` over a 1-D mesh with axis AXIS_NAME.

    Takes the unreplicated state and the global batch (leading axis = global batch, sharded over
    the mesh); returns the new state and global metrics.
    """
    from jax.sharding import PartitionSpec

    replicated, sharded = PartitionSpec(), PartitionSpec(AXIS_NAME)
    mapped = jax.shard_map(
        _step_fn(model, tx, loss_name, loss_kwargs, theory_kwargs),
        mesh=mesh,
        in_specs=(replicated, sharded),
        out_specs=(replicated, replicated),
        # pmap semantics: the explicit psum in train_step is the only cross-device reduction of
        # gradients. With check_vma=True JAX would track device-varying values itself (and cannot
        # infer that the new state is replicated: tried, it rejects out_specs=P()).
        check_vma=False,
    )
    return jax.jit(mapped)


# ----------------------------------------------------------------------------- evaluation


def compute_features(
    apply_features: Callable, variables, batches: Iterator[dict[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder features and labels of every unmasked example of ``batches`` (numpy, host).

    ``apply_features`` is a pmapped ``(variables, images) -> features``; ``batches`` yields
    {"image": (D, b, ...), "label": (D, b), "mask": (D, b)} as data.eval_iterator does.
    """
    features, labels = [], []
    for batch in batches:
        batch_features = np.asarray(apply_features(variables, batch["image"]))
        mask = np.asarray(batch["mask"]).reshape(-1)
        features.append(batch_features.reshape(mask.shape[0], -1)[mask])
        labels.append(np.asarray(batch["label"]).reshape(-1)[mask])
    return np.concatenate(features), np.concatenate(labels)


def _gather_across_processes(array: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils

    # Processes can hold different counts: pad to the largest, gather, then drop the padding.
    counts = multihost_utils.process_allgather(np.array([array.shape[0]]))
    padded = np.zeros((int(counts.max()), *array.shape[1:]), array.dtype)
    padded[: array.shape[0]] = array
    gathered = multihost_utils.process_allgather(padded)
    return np.concatenate([gathered[i, : int(n)] for i, n in enumerate(counts.reshape(-1))])


def make_feature_fn(model: models.ContrastiveModel, devices) -> Callable:
    """pmapped ``(variables, images (D, b, ...)) -> normalised encoder features (D, b, d)``."""

    def features_of(variables, images):
        features, _ = model.apply(variables, images, train=False)
        return features

    return jax.pmap(features_of, devices=devices)


def knn_monitor(config, feature_fn: Callable, replicated_variables, devices) -> dict[str, float]:
    """Weighted-kNN top-1/top-5 of the current encoder: train split as bank, test split queried.

    ``feature_fn`` comes from :func:`make_feature_fn`; ``replicated_variables`` are the model
    variables replicated over ``devices``. Features of all processes are gathered.
    """
    from hscl_jax import data

    info = data.dataset_info(config.data.name)

    def split_features(split):
        batches = data.eval_iterator(
            config.data,
            split=split,
            batch_size=config.knn.eval_batch_size,
            num_local_devices=len(devices),
        )
        features, labels = compute_features(feature_fn, replicated_variables, batches)
        return _gather_across_processes(features), _gather_across_processes(labels)

    train_features, train_labels = split_features(info.train_split)
    test_features, test_labels = split_features(info.test_split)
    return evaluate.knn_accuracy(
        train_features,
        train_labels,
        test_features,
        test_labels,
        num_classes=info.num_classes,
        k=config.knn.k,
        temperature=float(config.knn.temperature),
        test_chunk_size=config.knn.test_chunk_size,
    )


# ----------------------------------------------------------------------------- output


class MetricWriter:
    """metrics.jsonl + TensorBoard event files in ``workdir``; a no-op on processes other than 0.

    TensorBoard events are written with tensorboard's own event writer (no TensorFlow needed);
    when the tensorboard package is missing, only metrics.jsonl is written.
    """

    def __init__(self, workdir: str, *, enabled: bool, resumed_at: int | None = None):
        self._enabled = enabled
        self._jsonl = None
        self._events = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resumed_at is not None and os.path.exists(path):
            _drop_records_after(path, resumed_at)
        self._jsonl = open(path, "a")  # noqa: SIM115
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError:
            logging.warning("tensorboard is not installed: no TensorBoard event files")
        else:
            self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))
            if resumed_at is not None:
                from tensorboard.compat.proto import event_pb2

                # A restart marker: TensorBoard drops the earlier run's events after this step.
                self._events.add_event(
                    event_pb2.Event(
                        wall_time=time.time(),
                        step=resumed_at,
                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
                    )
                )

    def write(self, step: int, metrics: dict[str, float], *, tensorboard_prefix: str = "") -> None:
        """One metrics.jsonl record {"step", **metrics}; TensorBoard tags get
        ``tensorboard_prefix`` (keeps e.g. epoch means apart from the step values of a tag)."""
        if not self._enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            summary = summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag=tensorboard_prefix + k, simple_value=float(v))
                    for k, v in metrics.items()
                ]
            )
            self._events.add_event(
                event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
            )
            self._events.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._events is not None:
            self._events.close()


def _drop_records_after(path: str, step: int) -> None:
    """Rewrites metrics.jsonl without the records of steps after ``step`` (a run resumed from the
    checkpoint at ``step`` logs them again) and without a record cut short by a kill."""

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:
            return False

    with open(path) as f:
        kept = [line if line.endswith("\n") else line + "\n" for line in f if keep(line)]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_manager(workdir: str, keep: int | None = None, *, create: bool = True):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), options=options
    )


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with, from ``workdir/config.json`` (without the
    ``resolved`` entry the trainer adds there)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: not a training run directory")
    with open(path) as f:
        saved = json.load(f)
    saved.pop("resolved", None)
    return ml_collections.ConfigDict(saved)


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in ``workdir/checkpoints`` (unfinished ones excluded)."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return []
    manager = _checkpoint_manager(workdir, create=False)
    try:
        return sorted(int(step) for step in manager.all_steps())
    finally:
        manager.close()


def restore_variables(workdir: str, step: int | None = None) -> dict[str, Any]:
    """Model variables {"params", "batch_stats"} (host arrays) of the checkpoint at ``step``
    (the latest when None) of a training run directory."""
    import orbax.checkpoint as ocp

    steps = checkpoint_steps(workdir)
    if not steps:
        raise ValueError(f"no complete checkpoint in {workdir}/checkpoints")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint of step {step} in {workdir}/checkpoints; have {steps}")
    manager = _checkpoint_manager(workdir, create=False)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    state = jax.device_get(restored["state"])
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def _save_checkpoint(manager, step: int, host_state: dict, meta: dict) -> None:
    import orbax.checkpoint as ocp

    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
        ),
    )


def _restore_checkpoint(manager, step: int, host_state_template: dict) -> tuple[dict, dict]:
    import orbax.checkpoint as ocp

    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(host_state_template), meta=ocp.args.JsonRestore()
        ),
    )
    state = restored["state"]
    template_leaves = jax.tree_util.tree_leaves_with_path(host_state_template)
    restored_leaves = jax.tree_util.tree_leaves_with_path(state)
    if [p for p, _ in template_leaves] != [p for p, _ in restored_leaves]:
        raise ConfigError(
            f"checkpoint step {step} in {manager.directory} holds a different model/optimizer "
            "structure than this config; resume with the config it was trained with or use a new "
            "workdir"
        )
    for (path, expected), (_, actual) in zip(template_leaves, restored_leaves, strict=True):
        if np.shape(expected) != np.shape(actual):
            raise ConfigError(
                f"checkpoint step {step} in {manager.directory}: "
                f"{jax.tree_util.keystr(path)} has shape {np.shape(actual)} but this config "
                f"needs {np.shape(expected)}; resume with the config it was trained with or use "
                "a new workdir"
            )
    return state, restored["meta"]


# Config entries that change the sequence of batches or the optimisation; resuming with different
# values cannot reproduce the uninterrupted run, so the run says so.
_RESUME_SENSITIVE = ("seed", "global_batch_size", "data", "loss", "optim", "model")


def _resume_mismatches(saved_config: dict, config_dict: dict) -> list[str]:
    return [k for k in _RESUME_SENSITIVE if saved_config.get(k) != config_dict.get(k)]


# ----------------------------------------------------------------------------- training loop


def maybe_initialize_distributed(config) -> None:
    """hscl_jax.distributed.maybe_initialize: joins a multi-process run when one is asked for."""
    distributed.maybe_initialize(config)


def _config_errors_from(data_function: Callable, *args, **kwargs):
    """Calls a hscl_jax.data function; its ValueErrors (bad data config) become ConfigError."""
    try:
        return data_function(*args, **kwargs)
    except ValueError as error:
        raise ConfigError(f"config.data: {error}") from None


def _to_json_ready(config_dict: dict) -> dict:
    return json.loads(json.dumps(config_dict, default=str))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains per ``config``, writing checkpoints, metrics and events to ``workdir``.

    Resumes from the latest checkpoint in ``workdir/checkpoints`` when there is one. Returns the
    final metrics (the last logged training metrics and the final kNN accuracy).
    Raises ConfigError for bad config values (before training) and FloatingPointError when a step
    is not finite and ``config.skip_nonfinite_steps`` is False.
    """
    from hscl_jax import data

    maybe_initialize_distributed(config)
    validate_config(config)
    is_chief = jax.process_index() == 0
    num_local_devices = num_devices_for(config)
    devices = jax.local_devices()[:num_local_devices]
    mapped_devices = distributed.mapped_devices(num_local_devices)
    info = data.dataset_info(config.data.name)
    total_steps = _config_errors_from(total_steps_for, config)
    loss_kwargs = loss_options(config.loss)
    theory_kwargs = theory_options(config)
    # Epoch ends get a record of the epoch's mean theory metrics (0: none).
    steps_per_epoch = 0
    if theory_kwargs is not None:
        steps_per_epoch = _config_errors_from(
            data.steps_per_epoch, config.data, config.global_batch_size
        )

    manager = _checkpoint_manager(workdir, config.keep_checkpoints)
    latest = manager.latest_step()
    start_step = 0 if latest is None else latest
    # Opened before anything is compiled, so that a bad data config stops the run at start.
    batches = _config_errors_from(
        data.train_iterator,
        config.data,
        global_batch_size=config.global_batch_size,
        seed=config.data.seed,
        start_step=start_step,
        num_local_devices=num_local_devices,
    )

    model = models.model_from_config(config.model, bn_axis_name=AXIS_NAME)
    tx, schedule = create_optimizer(config.optim, total_steps)
    config_dict = _to_json_ready(config.to_dict())
    resolved = {
        **config_dict,
        "resolved": {
            "total_steps": total_steps,
            "num_processes": jax.process_count(),
            "num_local_devices": num_local_devices,
            "per_device_batch_size": config.global_batch_size
            // (jax.process_count() * num_local_devices),
            "loss_options": loss_kwargs,
            "theory_options": theory_kwargs,
            "feature_dim": models.feature_dim(model),
            "jax_backend": jax.default_backend(),
        },
    }
    if is_chief:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2, sort_keys=True)

    input_shape = (info.crop_size, info.crop_size, info.channels)
    state = create_train_state(jax.random.key(config.seed), model, tx, input_shape)
    host_state = jax.device_get(state.to_dict())
    if latest is not None:
        host_state, meta = _restore_checkpoint(manager, latest, host_state)
        assert int(host_state["step"]) == latest, (host_state["step"], latest)
        mismatched = _resume_mismatches(meta.get("config", {}), config_dict)
        if mismatched:
            logging.warning(
                "Resuming from step %d with a config that differs in %s: the run will not "
                "reproduce an uninterrupted one.",
                start_step,
                ", ".join(mismatched),
            )
        logging.info("Resumed from checkpoint at step %d", start_step)
    state = TrainState(**host_state)
    replicated_state = replicate(state, mapped_devices)

    logging.info(
        "Training %s on %s with loss %s %s: %d steps, global batch %d over %d process(es) x %d "
        "device(s)",
        config.model.name,
        config.data.name,
        config.loss.name,
        loss_kwargs,
        total_steps,
        config.global_batch_size,
        jax.process_count(),
        num_local_devices,
    )

    writer = MetricWriter(workdir, enabled=is_chief, resumed_at=latest)
    p_train_step = make_pmap_train_step(
        model, tx, config.loss.name, loss_kwargs, mapped_devices, theory_kwargs=theory_kwargs
    )
    step_metric_keys = ("loss", "grad_norm", *_AUX_KEYS)
    if theory_kwargs is not None:
        step_metric_keys += analysis.THEORY_KEYS
        logging.info("Theory monitor on: %s", theory_kwargs)
    feature_fn = make_feature_fn(model, mapped_devices)

    def run_knn(step: int) -> dict[str, float]:
        eval_start = time.time()
        variables = {"params": replicated_state.params, "batch_stats": replicated_state.batch_stats}
        result = knn_monitor(config, feature_fn, variables, devices)
        result["knn_seconds"] = time.time() - eval_start
        writer.write(step, result)
        logging.info(
            "step %d: knn_top1 %.4f knn_top5 %.4f (%.1fs)",
            step,
            result["knn_top1"],
            result["knn_top5"],
            result["knn_seconds"],
        )
        return result

    def save(step: int) -> None:
        host = first_replica_to_host(replicated_state.to_dict())
        _save_checkpoint(manager, step, host, {"step": step, "config": config_dict})

    final_metrics: dict[str, float] = {}
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    # Theory metrics of this epoch's finite steps (host floats); one step's dict each.
    epoch_theory: list[dict[str, float]] = []
    skipped_total = 0
    interval_start_time = time.time()
    interval_start_step = start_step

    def flush_metrics(step: int) -> None:
        """Checks finiteness of the steps run since the last flush and logs their mean metrics."""
        nonlocal pending, skipped_total, interval_start_time, interval_start_step
        if not pending:
            return
        fetched = [(s, first_replica_to_host(m)) for s, m in pending]
        pending = []
        bad_steps = [s for s, m in fetched if m["finite"] < 1]
        if bad_steps and not config.skip_nonfinite_steps:
            first = next(m for s, m in fetched if s == bad_steps[0])
            kept = manager.latest_step()
            raise FloatingPointError(
                f"non-finite loss or gradient at step {bad_steps[0]} (loss={first['loss']}, "
                f"grad_norm={first['grad_norm']}); stopping. Last good checkpoint: "
                f"{'none' if kept is None else f'step {kept}'} in {workdir}/checkpoints. "
                "Set config.skip_nonfinite_steps=True to skip such steps instead."
            )
        if bad_steps:
            skipped_total += len(bad_steps)
            logging.warning("skipped non-finite steps %s", bad_steps)
        finite_metrics = [m for s, m in fetched if m["finite"] >= 1]
        if theory_kwargs is not None:
            epoch_theory.extend({k: m[k] for k in analysis.THEORY_KEYS} for m in finite_metrics)
        finite_metrics = finite_metrics or [fetched[-1][1]]
        summary = {
            key: float(np.mean([m[key] for m in finite_metrics])) for key in step_metric_keys
        }
        elapsed = time.time() - interval_start_time
        steps_per_sec = (step - interval_start_step) / max(elapsed, 1e-9)
        summary.update(
            learning_rate=float(schedule(step - 1)),
            steps_per_sec=steps_per_sec,
            skipped_steps=float(skipped_total),
        )
        writer.write(step, summary)
        final_metrics.update(summary)
        eta = (total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
        logging.info(
            "step %d/%d | loss %.4f | anchors %.0f | pos %.3f neg %.3f | eff_neg %.1f | lr %.2e | "
            "%.2f steps/s | ETA %s",
            step,
            total_steps,
            summary["loss"],
            summary["num_anchors"],
            summary["mean_pos_cos"],
            summary["mean_neg_cos"],
            summary["effective_negatives"],
            summary["learning_rate"],
            steps_per_sec,
            _format_duration(eta),
        )
        interval_start_time = time.time()
        interval_start_step = step

    def write_epoch_theory(step: int) -> None:
        """Record {"step", "epoch", THEORY_KEYS} of the epoch ending at ``step``: means over its
        finite steps (after a resume mid-epoch, over the steps run since the resume)."""
        nonlocal epoch_theory
        steps, epoch_theory = epoch_theory, []
        if not steps:
            logging.warning("epoch ending at step %d had no finite step: no theory record", step)
            return
        record = {"epoch": step // steps_per_epoch}
        record.update({k: float(np.mean([m[k] for m in steps])) for k in analysis.THEORY_KEYS})
        writer.write(step, record, tensorboard_prefix="epoch/")
        logging.info(
            "epoch %d: hscl %.4f hucl %.4f scl %.4f ucl %.4f | assumption holds for %.3f",
            record["epoch"],
            record["hscl"],
            record["hucl"],
            record["scl"],
            record["ucl"],
            record["assumption_fraction"],
        )

    batches = data.prefetch_to_device(batches, size=2)
    last_knn_step = None
    loop_start = time.time()
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = next(batches)
            replicated_state, metrics = p_train_step(replicated_state, batch)
            pending.append((step, metrics))
            if step == start_step + 1:
                # Keep compilation out of steps/s and the ETA.
                jax.block_until_ready(metrics)
                logging.info("first step (with compilation): %.1fs", time.time() - loop_start)
                interval_start_time, interval_start_step = time.time(), step
            is_last = step == total_steps
            checkpoint_due = step % config.checkpoint_every_steps == 0 or is_last
            eval_due = is_last or (
                config.eval_every_steps > 0 and step % config.eval_every_steps == 0
            )
            epoch_due = steps_per_epoch > 0 and step % steps_per_epoch == 0
            if step % config.log_every_steps == 0 or checkpoint_due or eval_due or epoch_due:
                flush_metrics(step)
            if epoch_due:
                write_epoch_theory(step)
            if checkpoint_due:
                save(step)
            if eval_due:
                final_metrics.update(run_knn(step))
                last_knn_step = step
                interval_start_time = time.time()  # keep evaluation out of steps/s
        if last_knn_step is None:
            # Nothing left to train (resumed a finished run): still report the final accuracy.
            final_metrics.update(run_knn(start_step))
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return final_metrics
