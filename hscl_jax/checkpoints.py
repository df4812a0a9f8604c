"""Checkpoints of a run on disk: the orbax manager of ``workdir/checkpoints``, save, restore (with a
structure and shape check against the state the config builds), the steps present, and the model
variables of one step.

A checkpoint is an orbax Composite of ``state`` (the train state as a dict of host arrays:
``step``, ``params``, ``batch_stats``, ``opt_state``) and ``meta`` (JSON: ``step`` and the run's
``config``).
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import logging

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

CHECKPOINTS_DIR = "checkpoints"


class CheckpointMismatchError(ValueError):
    """A checkpoint holds a different model/optimizer structure or shapes than the config builds."""


class DamagedCheckpointError(ValueError):
    """A checkpoint that cannot be read back (truncated or missing files, an emptied step)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written (a full disk, a quota, a read-only file system)."""


class MissingCheckpointError(ValueError):
    """No checkpoint of the step asked for: never saved, or deleted since it was listed (a
    training run's retention deletes its oldest checkpoint after each save)."""


# Config entries whose change alters the train state's structure; named when a resume mismatches.
_STATE_DEFINING = ("model", "optim")


def checkpoint_manager(
    workdir: str, keep: int | None = None, *, create: bool = True
) -> ocp.CheckpointManager:
    """The orbax CheckpointManager of ``workdir/checkpoints`` keeping the last ``keep`` steps
    (None: all); ``create=False`` opens an existing run without creating the directory.

    Saves are synchronous: a save that fails fails in the call that asked for it (an
    asynchronous one would surface at the next save, as a traceback of orbax's threads)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR)), options=options
    )


def save_checkpoint(
    manager: ocp.CheckpointManager, step: int, host_state: dict[str, Any], meta: dict[str, Any]
) -> None:
    """Saves ``host_state`` and ``meta`` as step ``step``; returns once they are on disk.

    A save that fails raises CheckpointSaveError (one line naming the directory and the cause) at
    the step it was due, instead of orbax's traceback one save later. The checkpoints saved before
    stay as they were: orbax writes a step into a temporary directory, renamed once complete,
    and deletes old steps only after a save succeeds; the unfinished one is removed here.
    """
    import orbax.checkpoint as ocp

    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
            ),
        )
    except Exception as error:  # noqa: BLE001 - any failure to write it is reported alike
        directory = str(manager.directory)
        for name in os.listdir(directory):
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        manager.reload()
        kept = manager.latest_step()
        raise CheckpointSaveError(
            f"cannot save checkpoint step {step} in {directory} ({_cause(error)}); the last "
            f"good checkpoint is {'none' if kept is None else f'step {kept}'}: make room and run "
            "the same command again to resume from it"
        ) from None


def _cause(error: BaseException) -> str:
    """The operating system's error behind ``error`` (e.g. "[Errno 28] No space left on
    device"), else :func:`_reason`."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return f"[Errno {seen.errno}] {seen.strerror}"
        seen = seen.__cause__ or seen.__context__
    return _reason(error)


def _reason(error: BaseException) -> str:
    """One line saying why a restore failed (orbax's messages run over many lines)."""
    lines = str(error).strip().splitlines() or [""]
    text = lines[0] if len(lines[0]) <= 200 else lines[0][:197] + "..."
    return f"{type(error).__name__}: {text}"


def _plain_path(path: Any) -> tuple[str, ...]:
    """A tree path with dict keys, sequence indices and attribute names alike (a namedtuple in
    the config's state is a dict or list once saved)."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _saved_leaf_paths(step_dir: str) -> list[tuple[str, ...]]:
    import orbax.checkpoint as ocp

    metadata = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
    tree = getattr(metadata, "item_metadata", metadata)
    return sorted(_plain_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree))


def _config_differences(
    saved: dict[str, Any], current: dict[str, Any], prefix: str = ""
) -> list[str]:
    """``key: saved -> current`` for every leaf of the config that differs."""
    differences: list[str] = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            differences += _config_differences(old, new, name + ".")
        elif old != new:
            differences.append(f"{name}={old!r} in the checkpoint, {new!r} now")
    return differences


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as error:  # noqa: BLE001 - any failure to read it back is damage
        raise DamagedCheckpointError(
            f"checkpoint step {step} in {manager.directory} cannot be read ({_reason(error)})"
        ) from None


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    host_state_template: dict[str, Any],
    config_json: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of step ``step``, restored into the structure of ``host_state_template``.

    Raises CheckpointMismatchError (one line) when the saved tree's structure or a leaf's shape
    differs from the template's, naming the config entries (of ``config_json``, the config that
    built the template) that differ from the checkpoint's; DamagedCheckpointError (one line) when
    the checkpoint cannot be read back.
    """
    import orbax.checkpoint as ocp

    directory = manager.directory
    meta = _read_meta(manager, step)
    step_dir = os.path.join(str(directory), str(step))
    try:
        saved_paths = _saved_leaf_paths(step_dir)
    except Exception as error:  # noqa: BLE001
        raise DamagedCheckpointError(
            f"checkpoint step {step} in {directory} cannot be read ({_reason(error)})"
        ) from None
    if not saved_paths:
        raise DamagedCheckpointError(f"checkpoint step {step} in {directory} holds no state")
    template_leaves = jax.tree_util.tree_leaves_with_path(host_state_template)
    expected_paths = sorted(_plain_path(p) for p, _ in template_leaves)
    if saved_paths != expected_paths:
        # Checked before restoring: orbax's own message is a long traceback about partial restores.
        differences = [
            d
            for d in _config_differences(meta.get("config", {}), config_json or {})
            if d.split(".")[0] in _STATE_DEFINING
        ]
        only_saved = sorted(set(saved_paths) - set(expected_paths))
        only_now = sorted(set(expected_paths) - set(saved_paths))
        example = "/".join((only_saved or only_now)[0])
        what = "; ".join(differences) if differences else f"{example} differs"
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {directory} holds a different model/optimizer state than "
            f"this config ({what}); resume with the config it was trained with or use a new "
            "workdir"
        )
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(host_state_template))
        )
    except Exception as error:  # noqa: BLE001
        raise DamagedCheckpointError(
            f"checkpoint step {step} in {directory} cannot be restored ({_reason(error)})"
        ) from None
    state = restored["state"]
    restored_leaves = jax.tree_util.tree_leaves_with_path(state)
    for (path, expected), (_, actual) in zip(template_leaves, restored_leaves, strict=True):
        if np.shape(expected) != np.shape(actual):
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {directory}: "
                f"{jax.tree_util.keystr(path)} has shape {np.shape(actual)} but this config "
                f"needs {np.shape(expected)}; resume with the config it was trained with or use "
                "a new workdir"
            )
    return state, meta


def restore_latest(
    manager: ocp.CheckpointManager,
    host_state_template: dict[str, Any],
    config_json: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, state, meta) of the newest checkpoint that restores (:func:`restore_checkpoint`),
    or None when there is no checkpoint.

    A damaged checkpoint is skipped with a warning naming its step and why; when every one is
    damaged, DamagedCheckpointError (one line). A mismatch with the config is not skipped.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            state, meta = restore_checkpoint(manager, step, host_state_template, config_json)
        except DamagedCheckpointError as error:
            logging.warning("%s: skipping it", error)
            continue
        return step, state, meta
    if not steps:
        return None
    raise DamagedCheckpointError(
        f"no checkpoint in {manager.directory} can be restored (steps {sorted(steps)} are "
        "damaged; see the warnings above); move them away to start afresh"
    )


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames the step directories ``steps`` to ``<step>.damaged`` (kept for inspection; orbax
    ignores them), so that those steps can be saved again."""
    for step in steps:
        path = os.path.join(str(manager.directory), str(step))
        if os.path.isdir(path):
            os.replace(path, f"{path}.damaged")
    manager.reload()


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
    ``step`` of a training run directory; opens the manager once.

    ``step=None``: the newest checkpoint that restores; damaged ones are skipped with a warning
    naming the step and why. A damaged ``step`` given explicitly raises DamagedCheckpointError.
    """
    import orbax.checkpoint as ocp

    if not os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR)):
        raise ValueError(f"no complete checkpoint in {workdir}/checkpoints")
    manager = checkpoint_manager(workdir, create=False)
    try:
        steps = sorted(int(s) for s in manager.all_steps())
        if not steps:
            raise ValueError(f"no complete checkpoint in {workdir}/checkpoints")
        if step is not None and step not in steps:
            raise MissingCheckpointError(
                f"no checkpoint of step {step} in {workdir}/checkpoints; have {steps}"
            )
        for candidate in [step] if step is not None else steps[::-1]:
            try:
                restored = manager.restore(
                    candidate, args=ocp.args.Composite(state=ocp.args.StandardRestore())
                )
                state = jax.device_get(restored["state"])
                variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
            except Exception as error:  # noqa: BLE001 - any failure to read it back is damage
                if not os.path.isdir(os.path.join(str(manager.directory), str(candidate))):
                    gone = MissingCheckpointError(
                        f"checkpoint step {candidate} in {workdir}/checkpoints was deleted while "
                        "it was read (a training run's retention?)"
                    )
                    if step is not None:
                        raise gone from None
                    logging.warning("%s: skipping it", gone)
                    continue
                damaged = DamagedCheckpointError(
                    f"checkpoint step {candidate} in {workdir}/checkpoints cannot be restored "
                    f"({_reason(error)})"
                )
                if step is not None:
                    raise damaged from None
                logging.warning("%s: skipping it", damaged)
                continue
            return candidate, variables
    finally:
        manager.close()
    raise DamagedCheckpointError(
        f"no checkpoint in {workdir}/checkpoints can be restored (steps {steps} are damaged; see "
        "the warnings above)"
    )


def restore_variables(workdir: str, step: int | None = None) -> dict[str, Any]:
    """Model variables {"params", "batch_stats"} (host arrays) of the checkpoint at ``step``
    (the latest when None) of a training run directory."""
    return restore_variables_and_step(workdir, step)[1]
