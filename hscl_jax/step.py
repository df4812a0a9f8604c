"""The train state and the training step: one pure per-device :func:`train_step`, mapped over
every device by :func:`make_train_step` (``jax.jit`` of ``jax.shard_map`` over a mesh, or
``jax.pmap``: hscl_jax.distributed.Parallelism), and :func:`build_step`, which builds model,
optimiser and mapped step from a config for the trainer and the benchmarks.

The step is written with named-axis collectives over ``AXIS_NAME`` only: the loss all-gathers the
projections and labels so every device's anchors meet the whole global batch, each device's
gradient is its share of the global-loss gradient and is therefore SUMMED (``lax.psum``) across
devices; BatchNorm statistics are averaged across devices (global BN). See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec

from hscl_jax import config as config_lib
from hscl_jax import data, distributed, losses, models, optim, theory

if TYPE_CHECKING:
    import ml_collections

AXIS_NAME = distributed.AXIS_NAME


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a plain pytree (checkpointed as a dict).
    ``queue`` (a hscl_jax.losses.Queue of the momentum encoder's keys, saved as its arrays ``z``,
    ``labels``, ``valid``) and ``momentum`` (the momentum encoder's {"params", "batch_stats"})
    are None without a queue (config.queue.size = 0), and then absent from checkpoints."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    queue: losses.Queue | None = None
    momentum: Any = None

    def to_dict(self) -> dict[str, Any]:
        fields = (field.name for field in dataclasses.fields(self))
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


# ----------------------------------------------------------------------------- state and step


def momentum_update(online_variables: Any, momentum_variables: Any, momentum: float) -> Any:
    """The EMA ``momentum * momentum_variables + (1 - momentum) * online_variables`` (params and
    BatchNorm statistics alike)."""
    return optax.incremental_update(online_variables, momentum_variables, 1.0 - momentum)


def create_train_state(
    key: jax.Array,
    model: models.ContrastiveModel,
    tx: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    queue_size: int = 0,
) -> TrainState:
    """Initialised parameters, BatchNorm statistics and optimizer state (on the default device)
    for examples of ``input_shape`` (H, W, C). ``queue_size`` > 0 adds an empty queue of that
    many keys and the momentum encoder, a copy of the online model."""
    # Partitionable threefry (JAX's default) makes XLA:CPU compile even a small CNN's init
    # several times slower; init runs on one device, so the non-partitionable variant loses
    # nothing.
    with jax.threefry_partitionable(False):
        variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *input_shape)), train=False))(key)
    queue = momentum = None
    if queue_size > 0:
        _, projection = jax.eval_shape(
            lambda v: model.apply(v, jnp.zeros((1, *input_shape)), train=False), variables
        )
        queue = losses.Queue.empty(queue_size, projection.shape[-1])
        # Copies: a donated state must not hold one buffer twice.
        momentum = jax.tree.map(jnp.copy, variables)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        queue=queue,
        momentum=momentum,
    )


def _momentum_keys(
    state: TrainState,
    view2: jax.Array,
    model: models.ContrastiveModel,
    queue_momentum: float | None,
) -> tuple[Any, jax.Array]:
    """(the updated momentum variables, stop-gradient keys of ``view2`` embedded by them)."""
    if queue_momentum is None:
        raise ValueError("queue_momentum=None: a state with a queue needs the EMA rate in [0, 1)")
    momentum = momentum_update(
        {"params": state.params, "batch_stats": state.batch_stats}, state.momentum, queue_momentum
    )
    # Train mode, as the online pass: BatchNorm normalises with the (global) batch's statistics;
    # the running statistics of the key pass are not kept (the momentum model's are the EMA of
    # the online ones).
    (_, keys), _ = model.apply(momentum, view2, train=True, mutable=["batch_stats"])
    return momentum, lax.stop_gradient(keys.astype(jnp.float32))


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
    """One optimisation step on this device's share of the global batch (docs/training.md).

    ``batch``: the training-batch layout of hscl_jax.data ({"image": uint8 (b, H, W, C),
    "view1_params", "view2_params", "label": (b,)}); the step first makes the two views with
    ``data.augment_views(batch, augmentation)``. Runs inside a mapped context binding
    ``axis_name``, which ``model``'s BatchNorm syncs over. A step whose loss or gradient is not
    finite changes nothing but the step counter and reports ``finite = 0``. Every metric is
    global. ``theory_kwargs`` adds hscl_jax.theory.theory_metrics of the projections. With a
    queue (``queue_momentum``: the EMA rate) the momentum encoder embeds view 2 into keys, the
    loss also contrasts the queue as it was before the step, then the global batch's keys and
    labels are enqueued (identically on every device).
    """
    view1, view2 = data.augment_views(batch, augmentation)
    num_images = view1.shape[0]
    # One forward pass over both views: BatchNorm sees (and syncs) the statistics of all 2b views.
    images = jnp.concatenate([view1, view2], axis=0)
    queue_kwargs: dict[str, losses.Queue] = {}
    if state.queue is not None:
        momentum, keys = _momentum_keys(state, view2, model, queue_momentum)
        queue_kwargs["queue"] = state.queue

    def objective(params: Any) -> tuple[jax.Array, tuple[Any, Any, tuple[jax.Array, jax.Array]]]:
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
        return loss, (aux, updates["batch_stats"], (z1, z2))

    # Differentiated as a device-varying copy of the (replicated) params, so that each device's
    # gradient is its own share of the global-loss gradient under every mapping: pmap and
    # shard_map(check_vma=False) do not type values (pcast changes nothing there), while under
    # shard_map(check_vma=True) the gradient of the replicated params itself would come back
    # already summed (the transpose of their implicit broadcast is a psum) and the psum below
    # would count it once per device.
    (loss, (aux, batch_stats, (z1, z2))), grads = jax.value_and_grad(objective, has_aux=True)(
        lax.pcast(state.params, axis_name, to="varying")
    )
    # Each device holds its share of the global-loss gradient: the total is the sum.
    grads = lax.psum(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def keep_if_bad(new: Any, old: Any) -> Any:
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = dataclasses.replace(
        state,
        step=state.step + 1,
        params=keep_if_bad(optax.apply_updates(state.params, updates), state.params),
        batch_stats=keep_if_bad(batch_stats, state.batch_stats),
        opt_state=keep_if_bad(opt_state, state.opt_state),
    )
    if state.queue is not None:
        # The global batch's keys and labels, the same on every device: typed replicated
        # ("invarying") so that the pushed queue is a replicated output of the mapped step.
        gathered = lax.all_gather((keys, batch["label"]), axis_name, tiled=True, to="invarying")
        queue = state.queue.push(*gathered)
        new_state = dataclasses.replace(
            new_state,
            queue=keep_if_bad(queue, state.queue),
            momentum=keep_if_bad(momentum, state.momentum),
        )
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in aux._asdict().items()})
    if theory_kwargs is not None:
        z1, z2 = lax.stop_gradient(z1), lax.stop_gradient(z2)
        metrics.update(
            theory.theory_metrics(z1, z2, batch["label"], axis_name=axis_name, **theory_kwargs)
        )
    return new_state, metrics


def make_train_step(parallel: distributed.Parallelism, **options: Any) -> Callable[..., Any]:
    """:func:`train_step` with its keyword ``options`` bound (``model``, ``tx``, ``loss_name``,
    ``loss_kwargs``, ...), mapped over ``parallel``'s devices: ``(replicated state, batch as
    parallel.put_batch makes it) -> (state, metrics)``. The state is donated: its buffers are
    reused for the new state."""
    per_device = functools.partial(train_step, axis_name=AXIS_NAME, **options)
    replicated, sharded = PartitionSpec(), PartitionSpec(AXIS_NAME)
    return parallel.map(
        per_device, (replicated, sharded), (replicated, replicated), donate_argnums=(0,)
    )


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
    parallel: distributed.Parallelism
    train_step: Callable[..., Any]  # (replicated state, batch) -> (state, metrics): make_train_step
    init_state: Callable[[], TrainState]  # the initial state (config.seed), on the default device


def build_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> BuiltStep:
    """Model (with cross-device BatchNorm over AXIS_NAME), optimiser and schedule over the run's
    total steps, and :func:`train_step` mapped over ``devices`` as ``config.parallelism`` says,
    all from ``config``.

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
    parallel = distributed.Parallelism(config.parallelism, tuple(devices))
    step = make_train_step(
        parallel,
        model=model,
        tx=tx,
        loss_name=config.loss.name,
        loss_kwargs=loss_kwargs,
        augmentation=data.augmentation_for(config.data),
        theory_kwargs=theory_kwargs,
        queue_momentum=queue["momentum"],
    )
    input_shape = (info.crop_size, info.crop_size, info.channels)
    init = (jax.random.key(config.seed), model, tx, input_shape, queue["size"])
    return BuiltStep(
        model=model,
        tx=tx,
        schedule=schedule,
        total_steps=total_steps,
        input_shape=input_shape,
        loss_options=loss_kwargs,
        theory_options=theory_kwargs,
        parallel=parallel,
        train_step=step,
        init_state=functools.partial(create_train_state, *init),
    )
