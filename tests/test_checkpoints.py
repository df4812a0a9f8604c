"""Tests for hscl_jax.checkpoints: save then restore round-trips the state and meta, the steps on
disk, the model variables of one step, a checkpoint of another shape refused in one line, and a
save that fails (a full disk) reported in one line at once, keeping the checkpoints before it."""

import os
import shutil

import chex
import numpy as np
import pytest

from hscl_jax import checkpoints


def _host_state(width=4, step=0):
    rng = np.random.default_rng(step)
    return {
        "step": np.asarray(step, np.int32),
        "params": {"dense": {"kernel": rng.normal(size=(3, width)).astype(np.float32)}},
        "batch_stats": {"bn": {"mean": rng.normal(size=(width,)).astype(np.float32)}},
        "opt_state": {"mu": rng.normal(size=(3, width)).astype(np.float32)},
    }


def _save(workdir, steps, keep=None):
    manager = checkpoints.checkpoint_manager(workdir, keep)
    for step in steps:
        checkpoints.save_checkpoint(
            manager, step, _host_state(step=step), {"step": step, "config": {"seed": 1}}
        )
    manager.wait_until_finished()
    manager.close()


def test_save_restore_round_trip_and_steps_on_disk(tmp_path):
    workdir = str(tmp_path)
    assert checkpoints.checkpoint_steps(workdir) == []
    _save(workdir, [2, 4, 6], keep=2)
    assert checkpoints.checkpoint_steps(workdir) == [4, 6]
    names = os.listdir(os.path.join(workdir, checkpoints.CHECKPOINTS_DIR))
    assert sorted(int(n) for n in names if n.isdigit()) == [4, 6]
    # An unfinished save (orbax's temporary directory) is not a step.
    shutil.copytree(
        tmp_path / "checkpoints" / "6", tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp"
    )
    assert checkpoints.checkpoint_steps(workdir) == [4, 6]

    manager = checkpoints.checkpoint_manager(workdir, create=False)
    try:
        state, meta = checkpoints.restore_checkpoint(manager, 4, _host_state())
    finally:
        manager.close()
    chex.assert_trees_all_equal(state, _host_state(step=4))
    assert meta == {"step": 4, "config": {"seed": 1}}

    variables = checkpoints.restore_variables(workdir)  # the latest
    assert set(variables) == {"params", "batch_stats"}
    chex.assert_trees_all_equal(variables["params"], _host_state(step=6)["params"])
    step, variables = checkpoints.restore_variables_and_step(workdir, 4)
    assert step == 4
    chex.assert_trees_all_equal(variables["batch_stats"], _host_state(step=4)["batch_stats"])
    with pytest.raises(
        checkpoints.MissingCheckpointError, match=r"no checkpoint of step 5 .*; have \[4, 6\]"
    ):
        checkpoints.restore_variables(workdir, 5)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpoints.restore_variables(str(tmp_path / "elsewhere"))


def test_restore_into_another_shape_is_one_line(tmp_path):
    workdir = str(tmp_path)
    _save(workdir, [2])
    manager = checkpoints.checkpoint_manager(workdir, create=False)
    try:
        with pytest.raises(
            checkpoints.CheckpointMismatchError,
            match=r"checkpoint step 2 .*\['mean'\] has shape \(4,\) but this config needs \(8,\)",
        ) as error:
            checkpoints.restore_checkpoint(manager, 2, _host_state(width=8))
        assert "\n" not in str(error.value)
    finally:
        manager.close()


def test_a_failed_save_is_one_line_at_once_and_keeps_the_checkpoints_before_it(
    tmp_path, monkeypatch
):
    import errno

    from etils.epath import abstract_path

    workdir = str(tmp_path)
    manager = checkpoints.checkpoint_manager(workdir, 2)
    checkpoints.save_checkpoint(manager, 2, _host_state(step=2), {"step": 2})
    write_text = abstract_path.Path.write_text

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(abstract_path.Path, "write_text", disk_full)
    with pytest.raises(checkpoints.CheckpointSaveError) as raised:
        checkpoints.save_checkpoint(manager, 4, _host_state(step=4), {"step": 4})
    assert str(raised.value) == (
        f"cannot save checkpoint step 4 in {workdir}/checkpoints ([Errno 28] No space left on "
        "device); the last good checkpoint is step 2: make room and run the same command again "
        "to resume from it"
    )
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]  # nothing half-written
    # Room again: the same step saves, and both restore.
    monkeypatch.setattr(abstract_path.Path, "write_text", write_text)
    checkpoints.save_checkpoint(manager, 4, _host_state(step=4), {"step": 4})
    manager.close()
    assert checkpoints.checkpoint_steps(workdir) == [2, 4]
    for step in (2, 4):
        chex.assert_trees_all_equal(
            checkpoints.restore_variables(workdir, step)["params"], _host_state(step=step)["params"]
        )
