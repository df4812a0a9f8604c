"""The train state and the training step: one pure per-device :func:`train_step`, its two
wrappings (``jax.pmap``, used by the trainer, and ``jax.shard_map``), moving state between host
and devices, and :func:`build_step`, which builds model, optimiser, state and pmapped step from a
config for the trainer and both benchmarks.

The step is written with named-axis collectives over ``AXIS_NAME`` only: the loss all-gathers the
projections and labels so every device's anchors meet the whole global batch, each device's
gradient is its share of the global-loss gradient and is therefore SUMMED (``lax.psum``) across
devices; BatchNorm statistics are averaged across devices (global BN).

Layer 3: imports losses, models, data (layer 0), theory and optim (layer 1) and config (layer 2,
for the loss and theory options of :func:`build_step`); imported by evaluate.py, trainer.py and
bench/.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from hscl_jax import config as config_lib
from hscl_jax import data, losses, models, optim, theory

AXIS_NAME = "batch"


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a plain pytree (checkpointed as a dict).

    ``queue`` is None unless config.queue.size > 0 (the state, its checkpoints and the compiled
    step are then exactly those of a run without a queue); else the dict of :func:`init_queue`.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    queue: Any = None

    def to_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "params": self.params,
            "batch_stats": self.batch_stats,
            "opt_state": self.opt_state,
        }
        if self.queue is not None:
            state["queue"] = self.queue
        return state


# ----------------------------------------------------------------------------- the queue


def init_queue(params, batch_stats, size: int, dim: int) -> dict[str, Any]:
    """An empty labelled queue of ``size`` key projections of dimension ``dim``, and the momentum
    encoder starting as a copy of the online model.

    ``{"momentum": {"params", "batch_stats"}, "keys": (size, dim) float32, "labels": (size,)
    int32, "count": ()}``: rows are newest first and the first ``count`` rows are filled (the
    rest are zeros that the loss never sees: see :func:`queue_valid`).
    """
    return {
        # Copies: a donated state must not hold one buffer twice.
        "momentum": jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats}),
        "keys": jnp.zeros((size, dim), jnp.float32),
        "labels": jnp.zeros((size,), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
    }


def queue_valid(queue: dict[str, Any]) -> jax.Array:
    """(K,) bool: the filled rows of ``queue`` (the first ``count``)."""
    return jnp.arange(queue["labels"].shape[0]) < queue["count"]


def enqueue(queue: dict[str, Any], keys: jax.Array, labels: jax.Array) -> dict[str, Any]:
    """``queue`` with ``keys``/``labels`` (B rows, in order) put in front and its B oldest rows
    dropped (first in, first out); a batch larger than the queue keeps its first K rows."""
    size = queue["labels"].shape[0]
    return {
        **queue,
        "keys": jnp.concatenate([keys.astype(jnp.float32), queue["keys"]])[:size],
        "labels": jnp.concatenate([labels.astype(jnp.int32), queue["labels"]])[:size],
        "count": jnp.minimum(queue["count"] + keys.shape[0], size).astype(jnp.int32),
    }


def loss_queue(queue: dict[str, Any]):
    """The queue as the loss takes it (``queue=`` of hscl_jax.losses): keys, labels and the
    mask of filled rows."""
    return losses.Queue(queue["keys"], queue["labels"], queue_valid(queue))


def momentum_update(online_variables, momentum_variables, momentum: float):
    """The EMA ``momentum * momentum_variables + (1 - momentum) * online_variables`` (params and
    BatchNorm statistics alike)."""
    return optax.incremental_update(online_variables, momentum_variables, 1.0 - momentum)


def create_train_state(
    key: jax.Array,
    model: models.ContrastiveModel,
    tx,
    input_shape: tuple[int, ...],
    queue_size: int = 0,
) -> TrainState:
    """Initialised parameters, BatchNorm statistics and optimizer state (on the default device).

    ``input_shape`` is one example's (H, W, C). ``queue_size`` > 0 adds an empty queue of that
    many keys and the momentum encoder (:func:`init_queue`).
    """
    # Partitionable threefry (JAX's default) makes XLA:CPU take ~18 s instead of ~3 s to compile
    # even a small CNN's init (measured on a 2-core CPU); init runs on one device, so the
    # non-partitionable variant loses nothing.
    with jax.threefry_partitionable(False):
        variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *input_shape)), train=False))(key)
    params = variables["params"]
    queue = None
    if queue_size > 0:
        _, projection = jax.eval_shape(
            lambda v: model.apply(v, jnp.zeros((1, *input_shape)), train=False), variables
        )
        queue = init_queue(params, variables["batch_stats"], queue_size, projection.shape[-1])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        queue=queue,
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
    augmentation: data.Augmentation,
    queue_momentum: float | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on this device's share of the global batch.

    ``batch``: the training-batch layout of hscl_jax.data ({"image": uint8 (b, H, W, C),
    "view1_params", "view2_params", "label": (b,)}); the step first makes the two views with
    ``data.augment_views(batch, augmentation)``. Must run inside a mapped context
    (pmap or shard_map) binding ``axis_name``; ``model`` must use ``bn_axis_name=axis_name``.
    A step whose loss or gradient is not finite leaves params, BatchNorm statistics and optimizer
    state unchanged (the step counter still advances) and reports ``finite = 0``.
    Every returned metric is global (identical on all devices).
    ``theory_kwargs`` ({"beta", "temperature"}, see config.theory_monitor_options) adds
    hscl_jax.theory.theory_metrics of the step's projections (keys theory.THEORY_KEYS; no
    effect on the update); None leaves it out of the compiled step.

    With a queue in ``state`` (``queue_momentum``: the EMA rate, config.queue.momentum), the
    momentum encoder (EMA of the online params and BatchNorm statistics, updated first) embeds
    view 2 into keys; the loss contrasts the anchors with the batch and with the queue's filled
    rows as it was before this step (keys are constants: gradients flow through the queries
    only); then the global batch's keys and labels are enqueued. Every device computes the same
    all-gathered keys, so the replicated queues stay identical.
    """
    view1, view2 = data.augment_views(batch, augmentation)
    num_images = view1.shape[0]
    # One forward pass over both views: BatchNorm sees (and syncs) the statistics of all 2b views.
    images = jnp.concatenate([view1, view2], axis=0)
    queue_kwargs = {}
    if state.queue is not None:
        momentum_variables = momentum_update(
            {"params": state.params, "batch_stats": state.batch_stats},
            state.queue["momentum"],
            queue_momentum,
        )
        # Train mode, as the online pass: BatchNorm normalises with the (global) batch's
        # statistics; the running statistics of the key pass are not kept (those of the
        # momentum model are the EMA of the online ones).
        (_, keys), _ = model.apply(momentum_variables, view2, train=True, mutable=["batch_stats"])
        keys = lax.stop_gradient(keys.astype(jnp.float32))
        queue_kwargs["queue"] = loss_queue(state.queue)

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
            **queue_kwargs,
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

    queue = None
    if state.queue is not None:
        queue = enqueue(
            state.queue,
            lax.all_gather(keys, axis_name, tiled=True),
            lax.all_gather(batch["label"], axis_name, tiled=True),
        )
        queue = keep_if_bad({**queue, "momentum": momentum_variables}, state.queue)
    new_state = TrainState(
        step=state.step + 1,
        params=keep_if_bad(params, state.params),
        batch_stats=keep_if_bad(batch_stats, state.batch_stats),
        opt_state=keep_if_bad(opt_state, state.opt_state),
        queue=queue,
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux._asdict().items()})
    if theory_kwargs is not None:
        z1, z2 = (lax.stop_gradient(z) for z in projections)
        metrics.update(
            theory.theory_metrics(z1, z2, batch["label"], axis_name=axis_name, **theory_kwargs)
        )
    return new_state, metrics


def _step_fn(model, tx, loss_name, loss_kwargs, theory_kwargs, augmentation, queue_momentum=None):
    # Without a queue the partial is exactly the one built before queues existed (no new keyword):
    # the compiled step stays unchanged (tests/test_queue.py compares the HLO).
    extra = {} if queue_momentum is None else {"queue_momentum": float(queue_momentum)}
    return functools.partial(
        train_step,
        model=model,
        tx=tx,
        loss_name=loss_name,
        loss_kwargs=dict(loss_kwargs),
        axis_name=AXIS_NAME,
        theory_kwargs=None if theory_kwargs is None else dict(theory_kwargs),
        augmentation=augmentation,
        **extra,
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
    model,
    tx,
    loss_name,
    loss_kwargs,
    devices=None,
    *,
    augmentation,
    theory_kwargs=None,
    queue_momentum=None,
) -> Callable:
    """``train_step`` under ``jax.pmap(axis_name=AXIS_NAME)``: replicated state, (D, b, ...) batch.

    The state argument is donated (its buffers are reused for the new state). ``augmentation``,
    ``theory_kwargs`` and ``queue_momentum`` (needed when the state holds a queue): see
    :func:`train_step`.
    """
    return jax.pmap(
        _step_fn(model, tx, loss_name, loss_kwargs, theory_kwargs, augmentation, queue_momentum),
        axis_name=AXIS_NAME,
        devices=devices,
        donate_argnums=(0,),
    )


def make_shard_map_train_step(
    model,
    tx,
    loss_name,
    loss_kwargs,
    mesh,
    *,
    augmentation,
    theory_kwargs=None,
    queue_momentum=None,
) -> Callable:
    """The same ``train_step`` under ``jax.shard_map`` over a 1-D mesh with axis AXIS_NAME.

    Takes the unreplicated state and the global batch (leading axis = global batch, sharded over
    the mesh); returns the new state and global metrics.
    """
    from jax.sharding import PartitionSpec

    replicated, sharded = PartitionSpec(), PartitionSpec(AXIS_NAME)
    mapped = jax.shard_map(
        _step_fn(model, tx, loss_name, loss_kwargs, theory_kwargs, augmentation, queue_momentum),
        mesh=mesh,
        in_specs=(replicated, sharded),
        out_specs=(replicated, replicated),
        # pmap semantics: the explicit psum in train_step is the only cross-device reduction of
        # gradients. With check_vma=True JAX would track device-varying values itself (and cannot
        # infer that the new state is replicated: tried, it rejects out_specs=P()).
        check_vma=False,
    )
    return jax.jit(mapped)


@dataclasses.dataclass(frozen=True)
class BuiltStep:
    """What :func:`build_step` makes from a config: the pieces a training loop needs."""

    model: models.ContrastiveModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int
    input_shape: tuple[int, int, int]
    loss_options: dict[str, Any]
    theory_options: dict[str, float] | None
    devices: tuple
    train_step: Callable  # pmapped: (replicated state, (D, b, ...) batch) -> (state, metrics)
    seed: int
    queue_size: int = 0  # config.queue.size; 0: no queue

    def init_state(self) -> TrainState:
        """The freshly initialised state (``config.seed``) on the default device."""
        return create_train_state(
            jax.random.key(self.seed), self.model, self.tx, self.input_shape, self.queue_size
        )


def build_step(config, devices) -> BuiltStep:
    """Model (with cross-device BatchNorm over AXIS_NAME), optimiser and schedule over the run's
    total steps, and the pmapped :func:`train_step` over ``devices``, all from ``config``.

    ``config`` is assumed valid (config.validate_config); a bad data config raises ConfigError.
    """
    info = data.dataset_info(config.data.name, config.data.data_dir)
    total_steps = config_lib.total_steps_for(config)
    model = models.model_from_config(config.model, bn_axis_name=AXIS_NAME)
    tx, schedule = optim.create_optimizer(config.optim, total_steps)
    loss_kwargs = losses.options_from_config(config.loss)
    theory_kwargs = config_lib.theory_monitor_options(config)
    queue = config_lib.queue_options(config) or {"size": 0, "momentum": None, "loss_kwargs": {}}
    loss_kwargs.update(queue["loss_kwargs"])
    step = make_pmap_train_step(
        model,
        tx,
        config.loss.name,
        loss_kwargs,
        devices,
        augmentation=data.augmentation_for(config.data),
        theory_kwargs=theory_kwargs,
        queue_momentum=queue["momentum"],
    )
    return BuiltStep(
        model=model,
        tx=tx,
        schedule=schedule,
        total_steps=total_steps,
        input_shape=(info.crop_size, info.crop_size, info.channels),
        loss_options=loss_kwargs,
        theory_options=theory_kwargs,
        devices=tuple(devices),
        train_step=step,
        seed=config.seed,
        queue_size=queue["size"],
    )


def stack_first_replicas_to_host(trees: list) -> Any:
    """Host (numpy) copy of the first local replica of each of several replicated trees of the
    same structure, stacked on a new leading axis.

    The stacking happens on the first replica's device, so the whole list crosses to the host in
    one transfer (the trainer's metrics: once per logging interval, not once per step and leaf).
    """
    stacked = jax.tree.map(
        lambda *leaves: jnp.concatenate([leaf.addressable_shards[0].data for leaf in leaves]),
        *trees,
    )
    return jax.device_get(stacked)
