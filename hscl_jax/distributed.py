"""Multi-host set-up: how a process of a multi-process run joins the others.

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

import os
from collections.abc import Mapping

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


def initialize_arguments(environ: Mapping[str, str]) -> dict[str, object]:
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
    arguments: dict[str, object] = {}
    if not missing:
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


def wanted(config, environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one of a multi-process run (config.distributed or the env)."""
    environ = os.environ if environ is None else environ
    return bool(config.get("distributed")) or environ.get(DISTRIBUTED_ENV) == "1"


def maybe_initialize(config) -> None:
    """``jax.distributed.initialize`` (once) when :func:`wanted`, with the environment's arguments.

    Must run before anything touches a JAX device.
    """
    import jax

    if wanted(config) and not jax.distributed.is_initialized():
        jax.distributed.initialize(**initialize_arguments(os.environ))


def mapped_devices(num_local_devices: int) -> list:
    """The devices a pmap over every process must name: the first ``num_local_devices`` local
    devices of every process, in ``jax.devices()`` order.

    (``jax.pmap(devices=jax.local_devices())`` in a multi-process run maps over this process's
    devices alone: its collectives never leave the process, and each process trains a model of
    its own.)
    """
    import jax

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
    import jax

    if jax.process_count() == 1:
        return ok
    import numpy as np
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
