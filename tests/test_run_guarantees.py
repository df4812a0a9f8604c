"""What a run guarantees when things go wrong: damaged checkpoints are skipped (trainer, evaluate,
analysis), a resume with another optimiser is one line, a second run on a busy workdir stops at
once, SIGTERM stops a run with a checkpoint it resumes from exactly (SIGINT sets the same stop
flag), a damaged config.json is named in one line, analysis skips a checkpoint deleted while it
runs, a run the data refuses writes nothing, and a full disk stops a run in one line with a
checkpoint it resumes from exactly."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from hscl_jax import analysis, checkpoints, config, data, evaluate, locks, preemption, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_digits_config):
    """A finished 4-step tiny digits run with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    trainer.train_and_evaluate(tiny_digits_config(), workdir)
    assert checkpoints.checkpoint_steps(workdir) == [2, 4]
    return workdir


def _params(workdir, step):
    return checkpoints.restore_variables(workdir, step)["params"]


def _assert_same_tree(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, e)


def _damage(step_dir: str, how: str) -> None:
    if how == "truncated data file":
        data_files = [
            os.path.join(root, name)
            for root, _, names in os.walk(os.path.join(step_dir, "state"))
            for name in names
            if os.sep + "d" in root
        ]
        largest = max(data_files, key=os.path.getsize)
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    elif how == "deleted state/_METADATA":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
    elif how == "emptied step directory":
        for name in os.listdir(step_dir):
            path = os.path.join(step_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    else:
        raise ValueError(how)


DAMAGES = ("truncated data file", "deleted state/_METADATA", "emptied step directory")


def _damaged_copy(finished_run, tmp_path, how, steps=(4,)):
    workdir = str(tmp_path / "damaged")
    shutil.copytree(finished_run, workdir)
    for step in steps:
        _damage(os.path.join(workdir, "checkpoints", str(step)), how)
    return workdir


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_latest_checkpoint_is_skipped_by_trainer_evaluate_and_analysis(
    finished_run, tmp_path, tiny_digits_config, caplog, capsys, how
):
    workdir = _damaged_copy(finished_run, tmp_path, how)
    caplog.set_level(logging.WARNING)

    # evaluate and analysis read the previous complete checkpoint.
    step, variables = checkpoints.restore_variables_and_step(workdir)
    assert step == 2
    _assert_same_tree(variables["params"], _params(finished_run, 2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"checkpoint step 4 in {workdir}/checkpoints cannot be restored (" in w for w in warnings
    ), warnings
    written = analysis.analyze_checkpoints(workdir, num_batches=1, max_embeddings=0)
    assert "checkpoint step 4" in capsys.readouterr().err
    with open(written["theory"]) as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["2"]

    # The trainer resumes from step 2, sets step 4 aside and ends where the undamaged run ended.
    caplog.clear()
    trainer.train_and_evaluate(tiny_digits_config(), workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint step 4 in " in w and "skipping it" in w for w in warnings), warnings
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4.damaged"))
    assert checkpoints.checkpoint_steps(workdir) == [2, 4]
    _assert_same_tree(_params(workdir, 4), _params(finished_run, 4))


def test_no_restorable_checkpoint_stops_with_one_line(finished_run, tmp_path, tiny_digits_config):
    workdir = _damaged_copy(finished_run, tmp_path, "truncated data file", steps=(2, 4))
    with pytest.raises(checkpoints.DamagedCheckpointError) as raised:
        trainer.train_and_evaluate(tiny_digits_config(), workdir)
    message = str(raised.value)
    assert "\n" not in message
    assert f"no checkpoint in {workdir}/checkpoints can be restored (steps [2, 4]" in message
    assert evaluate.main(["--workdir", workdir]) == 1
    with pytest.raises(ValueError, match="^no checkpoint .* can be restored"):
        analysis.analyze_checkpoints(workdir, num_batches=1, max_embeddings=0)


def test_resume_with_another_optimizer_says_what_differs(
    finished_run, tmp_path, tiny_digits_config
):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    changed = tiny_digits_config(num_steps=6)
    changed.optim.name = "sgd"
    with pytest.raises(config.ConfigError) as raised:
        trainer.train_and_evaluate(changed, workdir)
    message = str(raised.value)
    assert "\n" not in message
    assert (
        f"checkpoint step 4 in {workdir}/checkpoints holds a different model/optimizer" in message
    )
    assert "optim.name='adam' in the checkpoint, 'sgd' now" in message


_HOLDER = """
import sys, time
from hscl_jax import locks
with locks.hold_workdir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_busy_workdir_stops_at_once_and_changes_nothing(
    finished_run, tmp_path, tiny_digits_config
):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, workdir],
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {
            name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)
        }
        with pytest.raises(locks.WorkdirInUseError) as raised:
            trainer.train_and_evaluate(tiny_digits_config(num_steps=6), workdir)
        assert f"is in use by another run (pid {holder.pid} on host " in str(raised.value)
    finally:
        holder.kill()
        holder.wait()
    after = {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)}
    assert after == before


# train.py, with the signal sent to this process from inside step STOP_AT (as if it arrived then).
_SIGNALLING_RUNNER = """
import os, runpy, signal, sys
from hscl_jax import preemption
stop_at = int(os.environ["HSCL_TEST_STOP_AT_STEP"])
signum = getattr(signal, os.environ["HSCL_TEST_SIGNAL"])
should_stop = preemption.StopSignals.should_stop
def signal_then_check(self, step):
    if step == stop_at:
        os.kill(os.getpid(), signum)
    return should_stop(self, step)
preemption.StopSignals.should_stop = signal_then_check
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""

_TINY_FLAGS = [
    "--config=configs/default.py",
    "--config.num_devices=2",
    "--config.model.width=4",
    "--config.model.head_hidden_dim=16",
    "--config.model.projection_dim=8",
    "--config.global_batch_size=16",
    "--config.num_steps=10",
    "--config.checkpoint_every_steps=4",
    "--config.log_every_steps=2",
    "--config.knn.k=10",
]


# train.py, with the disk full (every write fails, as with no space left) from the save of step
# HSCL_TEST_DISK_FULL_AT_STEP on; RLIMIT_FSIZE = 0 makes writes fail with EFBIG (pipes, such as
# the captured stderr, are not limited), and needs no privileges.
_FULL_DISK_RUNNER = """
import os, resource, runpy, signal, sys
from hscl_jax import checkpoints
full_at = int(os.environ["HSCL_TEST_DISK_FULL_AT_STEP"])
save = checkpoints.save_checkpoint
def fill_the_disk_then_save(manager, step, *args):
    if step == full_at:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
    return save(manager, step, *args)
checkpoints.save_checkpoint = fill_the_disk_then_save
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def _train(workdir, *, signal_name=None, stop_at=None, disk_full_at=None):
    env = dict(
        os.environ,
        PYTHONPATH=REPO,
    )
    command = [sys.executable, "train.py", f"--workdir={workdir}", *_TINY_FLAGS]
    if signal_name is not None:
        command[1:2] = ["-c", _SIGNALLING_RUNNER]
        env.update(HSCL_TEST_SIGNAL=signal_name, HSCL_TEST_STOP_AT_STEP=str(stop_at))
    if disk_full_at is not None:
        command[1:2] = ["-c", _FULL_DISK_RUNNER]
        env.update(HSCL_TEST_DISK_FULL_AT_STEP=str(disk_full_at))
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The workdir of an uninterrupted train.py run."""
    reference = str(tmp_path_factory.mktemp("uninterrupted") / "reference")
    result = _train(reference)
    assert result.returncode == 0, result.stderr[-3000:]
    return reference


@pytest.mark.slow
@pytest.mark.xdist_group("signals")  # one worker: the uninterrupted run is made once
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resuming_is_exact(
    uninterrupted_run, tmp_path
):
    # SIGINT sets the same stop flag (test_stop_signals_set_a_flag_and_restore_the_handlers).
    signal_name = "SIGTERM"
    reference = uninterrupted_run
    stopped = str(tmp_path / "stopped")
    result = _train(stopped, signal_name=signal_name, stop_at=6)
    assert result.returncode == preemption.EXIT_STATUS, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        f"stopped by {signal_name} after step 6: checkpoint saved in "
        f"{stopped}/checkpoints/6; run the same command again to resume from it"
    )
    assert checkpoints.checkpoint_steps(stopped) == [4, 6]
    with open(os.path.join(stopped, "metrics.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f]
    assert logged == [2, 4, 6]  # the metrics of the stopping step were flushed

    result = _train(stopped)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from checkpoint at step 6" in result.stderr
    _assert_same_tree(_params(stopped, 10), _params(reference, 10))


def _assert_refused_in_one_line(result, message: str) -> None:
    """train.py exited with status 1 and ``error: <message>`` as its only line on stderr besides
    absl's INFO and WARNING log lines."""
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if not re.match(r"[IW]\d{4} ", line)]
    assert lines == [f"error: {message}"]


@pytest.mark.slow
@pytest.mark.xdist_group("signals")  # one worker: the uninterrupted run is made once
def test_a_full_disk_stops_the_run_in_one_line_and_the_rerun_resumes_exactly(
    uninterrupted_run, tmp_path
):
    reference = uninterrupted_run
    # The disk fills up before the step-8 checkpoint: the run stops there, keeping step 4's.
    workdir = str(tmp_path / "run")
    _assert_refused_in_one_line(
        _train(workdir, disk_full_at=8),
        f"cannot save checkpoint step 8 in {workdir}/checkpoints ([Errno 27] File too large); "
        "the last good checkpoint is step 4: make room and run the same command again to resume "
        "from it",
    )
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
    result = _train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from checkpoint at step 4" in result.stderr
    _assert_same_tree(_params(workdir, 10), _params(reference, 10))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f if "loss" in line]
    assert logged == [2, 4, 6, 8, 10]


def test_a_damaged_config_json_is_named_in_one_line(finished_run, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])  # cut short, as by a full disk or a copy interrupted
    for main in (evaluate.main, analysis.main):
        assert main([f"--workdir={workdir}"]) == 1
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"error: {path} is not valid JSON: "), line
        assert line.endswith(
            "the file is damaged or was cut short (a training run on this "
            "workdir writes it again when it starts)"
        ), line


def test_analysis_skips_a_checkpoint_deleted_while_it_runs(finished_run, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    listed = checkpoints.checkpoint_steps

    def listed_then_retention_deletes_the_oldest(directory):
        steps = listed(directory)
        shutil.rmtree(os.path.join(directory, "checkpoints", str(steps[0])))
        return steps

    monkeypatch.setattr(checkpoints, "checkpoint_steps", listed_then_retention_deletes_the_oldest)
    written = analysis.analyze_checkpoints(workdir, num_batches=1, max_embeddings=0, betas=())
    with open(written["theory"]) as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["4"]


def test_a_run_the_data_refuses_writes_nothing(tmp_path, tiny_digits_config):
    workdir = tmp_path / "run"
    with pytest.raises(
        data.DataError, match=r"^global_batch_size 2000 exceeds the 1438 training examples.$"
    ):
        trainer.train_and_evaluate(tiny_digits_config(global_batch_size=2000), str(workdir))
    assert not workdir.exists()


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with preemption.StopSignals() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop(2) and stop.received == "SIGINT"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
