"""Checkpoints of a run on disk: the orbax manager of ``workdir/checkpoints``, save, restore (with a
structure and shape check against the state the config builds), the steps present, and the model
variables of one step.

A checkpoint is an orbax Composite of ``state`` (the train state as a dict of host arrays:
``step``, ``params``, ``batch_stats``, ``opt_state``) and ``meta`` (JSON: ``step`` and the run's
``config``).

Layer 1: imports nothing from hscl_jax; imported by evaluate.py, analysis.py and trainer.py.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

CHECKPOINTS_DIR = "checkpoints"


class CheckpointMismatchError(ValueError):
    """A checkpoint holds a different model/optimizer structure or shapes than the config builds."""


def checkpoint_manager(workdir: str, keep: int | None = None, *, create: bool = True):
    """The orbax CheckpointManager of ``workdir/checkpoints`` keeping the last ``keep`` steps
    (None: all); ``create=False`` opens an existing run without creating the directory."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR)), options=options
    )


def save_checkpoint(manager, step: int, host_state: dict, meta: dict) -> None:
    """Starts saving ``host_state`` and ``meta`` as step ``step`` (orbax finishes asynchronously:
    ``manager.wait_until_finished()`` before reading it back)."""
    import orbax.checkpoint as ocp

    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
        ),
    )


def restore_checkpoint(manager, step: int, host_state_template: dict) -> tuple[dict, dict]:
    """(state, meta) of step ``step``, restored into the structure of ``host_state_template``.

    Raises CheckpointMismatchError (one line) when the saved tree's structure or a leaf's shape
    differs from the template's.
    """
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
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {manager.directory} holds a different model/optimizer "
            "structure than this config; resume with the config it was trained with or use a new "
            "workdir"
        )
    for (path, expected), (_, actual) in zip(template_leaves, restored_leaves, strict=True):
        if np.shape(expected) != np.shape(actual):
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {manager.directory}: "
                f"{jax.tree_util.keystr(path)} has shape {np.shape(actual)} but this config "
                f"needs {np.shape(expected)}; resume with the config it was trained with or use "
                "a new workdir"
            )
    return state, restored["meta"]


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in ``workdir/checkpoints`` (unfinished ones excluded)."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR)):
        return []
    manager = checkpoint_manager(workdir, create=False)
    try:
        return sorted(int(step) for step in manager.all_steps())
    finally:
        manager.close()


def restore_variables_and_step(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, model variables {"params", "batch_stats"} as host arrays) of the checkpoint at
    ``step`` (the latest when None) of a training run directory; opens the manager once."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR)):
        raise ValueError(f"no complete checkpoint in {workdir}/checkpoints")
    manager = checkpoint_manager(workdir, create=False)
    try:
        steps = sorted(int(s) for s in manager.all_steps())
        if not steps:
            raise ValueError(f"no complete checkpoint in {workdir}/checkpoints")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint of step {step} in {workdir}/checkpoints; have {steps}")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    state = jax.device_get(restored["state"])
    return step, {"params": state["params"], "batch_stats": state["batch_stats"]}


def restore_variables(workdir: str, step: int | None = None) -> dict[str, Any]:
    """Model variables {"params", "batch_stats"} (host arrays) of the checkpoint at ``step``
    (the latest when None) of a training run directory."""
    return restore_variables_and_step(workdir, step)[1]
