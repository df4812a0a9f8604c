"""hscl_jax.locks: the workdir lock (one run per workdir) and the dataset-building lock."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hscl_jax import locks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLDER = """
import sys, time
from hscl_jax import locks
with locks.hold_workdir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _start_holder(workdir):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, workdir],
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_holder_is_refused_at_once_naming_the_first(tmp_path):
    workdir = str(tmp_path / "run")
    holder = _start_holder(workdir)
    try:
        start = time.monotonic()
        with pytest.raises(locks.WorkdirInUseError) as raised, locks.hold_workdir(workdir):
            pass
        assert time.monotonic() - start < 1
        message = str(raised.value)
        assert "\n" not in message
        assert f"workdir {workdir} is in use by another run" in message
        assert f"pid {holder.pid} on host {socket.gethostname()}, started 20" in message
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    workdir = str(tmp_path / "run")
    holder = _start_holder(workdir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # The lock file stays behind, naming the dead holder, but nothing holds it.
    assert os.path.exists(os.path.join(workdir, locks.WORKDIR_LOCK_NAME))
    with locks.hold_workdir(workdir) as path:
        assert f'"pid": {os.getpid()}' in open(path).read()


def test_the_lock_is_released_when_the_block_ends(tmp_path):
    workdir = str(tmp_path / "run")
    with locks.hold_workdir(workdir):
        # Another open file of the same process conflicts too (flock locks an open file).
        with pytest.raises(locks.WorkdirInUseError), locks.hold_workdir(workdir):
            pass
    with locks.hold_workdir(workdir):
        pass
    with pytest.raises(ZeroDivisionError), locks.hold_workdir(workdir):
        1 / 0  # noqa: B018
    with locks.hold_workdir(workdir):
        pass


def test_a_remote_workdir_is_not_locked():
    with locks.hold_workdir("gs://bucket/run") as path:
        assert path is None


_EXCLUSIVE_HOLDER = """
import sys, time
from hscl_jax import locks
with locks.exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(1.5)
"""


def test_exclusive_waits_for_the_holder(tmp_path):
    path = str(tmp_path / "x.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", _EXCLUSIVE_HOLDER, path],
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with locks.exclusive(path):
        waited = time.monotonic() - start
    holder.wait()
    assert waited > 0.5


_PREPARE = """
import sys
from hscl_jax.data.digits_builder import prepare_digits
print("prepared", prepare_digits(sys.argv[1]).is_prepared())
"""


@pytest.mark.slow
def test_processes_building_digits_at_once_all_succeed(tmp_path):
    data_dir = str(tmp_path / "data")
    env = dict(os.environ, PYTHONPATH=REPO)
    builders = [
        subprocess.Popen(
            [sys.executable, "-c", _PREPARE, data_dir],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    for builder in builders:
        output = builder.communicate(timeout=300)[0]
        assert builder.returncode == 0, output[-3000:]
        assert "prepared True" in output


def test_a_lock_file_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    import errno

    workdir = str(tmp_path / "run")

    def disk_full(descriptor, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(locks.os, "write", disk_full)
    with pytest.raises(locks.WorkdirLockError) as raised, locks.hold_workdir(workdir):
        pass
    assert str(raised.value) == (
        f"cannot lock workdir {workdir}: writing {workdir}/run.lock failed ([Errno 28] No space "
        "left on device); make room or use another --workdir"
    )
