"""How a run spreads over devices and processes: joining a multi-process run, the two ways of
mapping the per-device step over every device (:class:`Parallelism`), and moving replicated trees
between host and devices.

A run is multi-process when ``config.distributed`` is True or the environment sets
``HSCL_DISTRIBUTED=1``. The process then calls ``jax.distributed.initialize`` with the coordinator
address, process count and process id from the environment variables below when they are set
(``python -m hscl_jax.launch`` sets them for processes on one machine), and without them
otherwise (Cloud TPU pods, Slurm and Open MPI are detected by JAX itself).

- ``HSCL_COORDINATOR_ADDRESS``: ``host:port`` of process 0's coordination service.
- ``HSCL_NUM_PROCESSES``, ``HSCL_PROCESS_ID``: the process count and this process's id (0-based).
- ``HSCL_HEARTBEAT_TIMEOUT_SECONDS``: seconds after which the coordination service declares a
  silent process dead and stops every other process (JAX's default: 100). This bounds how long
  the survivors of a process that died alone wait in a collective before they abort.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:
    import ml_collections

AXIS_NAME = "batch"  # the one named axis of every mapped function (pmap and mesh alike)
PARALLELISMS = ("mesh", "pmap")

DISTRIBUTED_ENV = "HSCL_DISTRIBUTED"
COORDINATOR_ADDRESS_ENV = "HSCL_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "HSCL_NUM_PROCESSES"
PROCESS_ID_ENV = "HSCL_PROCESS_ID"
HEARTBEAT_TIMEOUT_ENV = "HSCL_HEARTBEAT_TIMEOUT_SECONDS"


def _int_from(environ: Mapping[str, str], name: str, lowest: int) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < lowest:
        raise ValueError(f"{name}={text!r} must be an integer >= {lowest}")
    return value


def initialize_arguments(environ: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for ``jax.distributed.initialize`` read from ``environ``.

    Empty when none of the variables is set (JAX then detects the cluster). The coordinator
    address, process count and process id come together or not at all.
    """
    address = environ.get(COORDINATOR_ADDRESS_ENV) or None
    num_processes = _int_from(environ, NUM_PROCESSES_ENV, 1)
    process_id = _int_from(environ, PROCESS_ID_ENV, 0)
    given = {
        COORDINATOR_ADDRESS_ENV: address,
        NUM_PROCESSES_ENV: num_processes,
        PROCESS_ID_ENV: process_id,
    }
    missing = [name for name, value in given.items() if value is None]
    if 0 < len(missing) < len(given):
        raise ValueError(
            f"{', '.join(missing)} not set: set {COORDINATOR_ADDRESS_ENV}, {NUM_PROCESSES_ENV} "
            f"and {PROCESS_ID_ENV} together, or none of them (cluster auto-detection)"
        )
    arguments: dict[str, Any] = {}
    if not missing:
        assert num_processes is not None and process_id is not None
        if process_id >= num_processes:
            raise ValueError(
                f"{PROCESS_ID_ENV}={process_id} must be below {NUM_PROCESSES_ENV}={num_processes}"
            )
        arguments.update(
            coordinator_address=address, num_processes=num_processes, process_id=process_id
        )
    heartbeat = _int_from(environ, HEARTBEAT_TIMEOUT_ENV, 1)
    if heartbeat is not None:
        arguments["heartbeat_timeout_seconds"] = heartbeat
    return arguments


def wanted(config: ml_collections.ConfigDict, environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one of a multi-process run (config.distributed or the env)."""
    environ = os.environ if environ is None else environ
    return bool(config.get("distributed")) or environ.get(DISTRIBUTED_ENV) == "1"


def maybe_initialize(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize`` (once) when :func:`wanted`, with the environment's arguments.

    Must run before anything touches a JAX device.
    """
    if wanted(config) and not jax.distributed.is_initialized():
        jax.distributed.initialize(**initialize_arguments(os.environ))


def mapped_devices(num_local_devices: int) -> list[jax.Device]:
    """The devices a step mapped over every process spans (:class:`Parallelism`'s devices): the
    first ``num_local_devices`` local devices of every process, in ``jax.devices()`` order,
    so that each process's devices hold the slice of every global batch it reads.

    (``jax.pmap(devices=jax.local_devices())`` in a multi-process run maps over this process's
    devices alone: its collectives never leave the process, and each process trains a model of
    its own.)
    """
    return [
        device
        for device in jax.devices()
        if device in jax.local_devices(device.process_index)[:num_local_devices]
    ]


def all_processes_agree(ok: bool) -> bool:
    """Process 0's ``ok``, on every process (a broadcast; just ``ok`` in a one-process run).

    Lets a decision that only process 0 can make (e.g. holding the workdir lock) stop every
    process together instead of leaving the others waiting in a collective.
    """
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def exit_without_waiting(status: int) -> None:
    """Ends this process at once with ``status``, skipping JAX's exit-time shutdown barrier.

    A process of a multi-process run that fails alone would otherwise wait in that barrier for
    the others (300 s by default) while they wait for it in their next collective. Exiting
    without it lets the coordination service see the process gone: at once when it was process 0,
    after the heartbeat timeout otherwise, and then it stops the others.
    """
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(status)


# ----------------------------------------------------------------------------- mapping over devices


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Copies of ``tree`` on ``devices``, stacked on a leading axis: pmap's replicated layout.

    The arrays are sharded over a mesh whose axis is AXIS_NAME, the sharding pmap gives its own
    outputs: with any other sharding the second step (fed the first step's outputs) would compile
    the step a second time.
    """
    import flax.jax_utils

    return flax.jax_utils.replicate(tree, devices, axis_name=AXIS_NAME)


def first_replica_to_host(tree: Any) -> Any:
    """Host (numpy) copy of the first local replica of a tree in pmap's replicated layout.

    (flax.jax_utils.unreplicate keeps the leading axis when pmap ran on a subset of the local
    devices, e.g. 1 of 8; reading the first addressable shard is right in every case and moves
    no data between devices.)
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0], tree)


def _first_shards_to_host(trees: list[Any], combine: Callable[[list[jax.Array]], jax.Array]) -> Any:
    """The first addressable shard of every leaf of ``trees``, combined leaf by leaf on that
    shard's device, so the whole list crosses to the host in one transfer."""
    combined = jax.tree.map(
        lambda *leaves: combine([leaf.addressable_shards[0].data for leaf in leaves]), *trees
    )
    return jax.device_get(combined)


def stack_first_replicas_to_host(trees: list[Any]) -> Any:
    """Host (numpy) copy of the first local replica of each of several trees in pmap's
    replicated layout (all of one structure), stacked on a new leading axis."""
    import jax.numpy as jnp

    return _first_shards_to_host(trees, jnp.concatenate)


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """How a run maps its per-device functions (written with collectives over AXIS_NAME) over
    ``devices``: every device of every process, as :func:`mapped_devices` lists them.

    - ``"mesh"``: ``jax.jit(jax.shard_map(...))`` over the 1-D :attr:`mesh` of ``devices``. A
      replicated value is one ``jax.Array`` replicated by its sharding, with no device axis; a
      batch is one global ``jax.Array`` whose leading axis is sharded over the mesh, each process
      supplying its own rows (``jax.make_array_from_process_local_data``).
    - ``"pmap"``: ``jax.pmap``. A replicated value is stacked copies on a leading device axis; a
      batch is each process's ``(local devices, b, ...)`` arrays.

    Both run the same per-device program, so they compute the same values; host copies
    (:meth:`to_host`) have no device axis, so checkpoints written under one restore under the
    other.
    """

    kind: str
    devices: tuple[jax.Device, ...]
    mesh: Mesh = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in PARALLELISMS:
            raise ValueError(
                f"parallelism={self.kind!r} is unknown; allowed: {', '.join(PARALLELISMS)}"
            )
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "mesh", Mesh(np.array(self.devices), (AXIS_NAME,)))

    @property
    def local_devices(self) -> list[jax.Device]:
        """This process's share of :attr:`devices` (its batches' rows go to these)."""
        return [d for d in self.devices if d.process_index == jax.process_index()]

    def map(
        self,
        fn: Callable[..., Any],
        in_specs: tuple[Any, ...],
        out_specs: Any,
        donate_argnums: tuple[int, ...] = (),
    ) -> Callable[..., Any]:
        """``fn`` mapped over :attr:`devices`. ``in_specs``/``out_specs`` say which values are
        replicated (``PartitionSpec()``) and which are batches (``PartitionSpec(AXIS_NAME)``):
        the mesh's ``shard_map`` specs (pmap puts every value on a leading device axis)."""
        if self.kind == "pmap":
            return self.paced(
                jax.pmap(
                    fn, axis_name=AXIS_NAME, devices=self.devices, donate_argnums=donate_argnums
                )
            )
        mapped = jax.jit(
            jax.shard_map(
                fn,
                mesh=self.mesh,
                in_specs=in_specs,
                out_specs=out_specs,
                # Values are typed device-varying or replicated, and collectives are transposed
                # by those types: the per-device step differentiates a device-varying copy of
                # the params (lax.pcast) so that its explicit psum is the one sum of gradients,
                # and the replicated outputs (params, queue, metrics) are checked to be so.
                # Under pmap the same function runs untyped, with the same result.
                check_vma=True,
            ),
            donate_argnums=donate_argnums,
        )
        return self.paced(mapped)

    def paced(self, mapped: Callable[..., Any]) -> Callable[..., Any]:
        """``mapped`` (a function of :meth:`map`, or its compiled executable) as it is to be
        called: on several CPU devices each call waits for its results; else ``mapped`` itself."""
        if self.devices[0].platform != "cpu" or len(self.devices) == 1:
            return mapped

        # XLA:CPU runs each device of a call on its own thread. Calls whose body all-gathers,
        # dispatched many times without waiting, can leave one device's thread behind in the
        # all-gather rendezvous while the others run ahead, until XLA aborts after 40 s (seen
        # with this train step on 8 devices under both parallelisms, pmap included, within 300
        # calls). Waiting for each call's results keeps one call in flight; on CPU the
        # "devices" are the host's own cores, so little overlap of host and device work is lost.
        def call(*args: Any) -> Any:
            return jax.block_until_ready(mapped(*args))

        if hasattr(mapped, "lower"):
            call.lower = mapped.lower  # type: ignore[attr-defined]
        return call

    def replicate(self, tree: Any) -> Any:
        """``tree`` (host or device arrays, the same on every process) on every device."""
        if self.kind == "pmap":
            return replicate(tree, self.devices)
        sharding = NamedSharding(self.mesh, PartitionSpec())

        def put(x: Any) -> jax.Array:
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree.map(put, tree)

    def to_host(self, tree: Any) -> Any:
        """Host (numpy) copy of the first local replica of a replicated ``tree``."""
        if self.kind == "pmap":
            return first_replica_to_host(tree)
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), tree)

    def stack_to_host(self, trees: list[Any]) -> Any:
        """Host (numpy) copies of the first local replica of several replicated trees of one
        structure, stacked on a new leading axis, in one transfer (the trainer's step metrics
        of a logging interval)."""
        if self.kind == "pmap":
            return stack_first_replicas_to_host(trees)
        import jax.numpy as jnp

        return _first_shards_to_host(trees, jnp.stack)

    def put_batch(self, local_batch: Any) -> Any:
        """This process's slice of a global batch, ``(local devices, b, ...)`` arrays, as the
        mapped functions take it: under "mesh" global arrays ``(all devices x b, ...)`` sharded
        on their leading axis; under "pmap" as it is (pmap moves it to the devices)."""
        if self.kind == "pmap":
            return local_batch
        sharding = NamedSharding(self.mesh, PartitionSpec(AXIS_NAME))
        num_processes = len(self.devices) // len(self.local_devices)

        def put(x: Any) -> jax.Array:
            rows = np.asarray(x).reshape(-1, *np.shape(x)[2:])
            global_shape = (num_processes * rows.shape[0], *rows.shape[1:])
            return jax.make_array_from_process_local_data(sharding, rows, global_shape)

        return jax.tree.map(put, local_batch)

    def local_rows(self, array: jax.Array) -> np.ndarray:
        """This process's rows (host numpy, in order) of a batch-shaped output: (its examples,
        ...) of a mapped function's ``PartitionSpec(AXIS_NAME)`` output."""
        if self.kind == "pmap":
            host = np.asarray(array)
            return host.reshape(-1, *host.shape[2:])
        shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
        return np.concatenate([np.asarray(shard.data) for shard in shards])
