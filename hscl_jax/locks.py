"""Advisory file locks: one run per workdir, one builder of a dataset at a time.

The locks are ``fcntl.flock`` locks, which belong to an open file: the kernel drops them when the
holding process ends, however it ends (SIGKILL included). A crashed run therefore never leaves a
stale lock; its lock file stays, describing the last holder, but nothing holds it. They work on
local and most network file systems; on object stores (``gs://``...) there is nothing to lock and
the run goes on without one.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator

WORKDIR_LOCK_NAME = "run.lock"


class WorkdirLockError(RuntimeError):
    """The workdir's lock cannot be taken: its file cannot be written (a full disk, a read-only
    file system), or another run holds it (:class:`WorkdirInUseError`)."""


class WorkdirInUseError(WorkdirLockError):
    """Another live run holds the workdir's lock."""


def _is_local(path: str) -> bool:
    return "://" not in path


def _holder_description() -> dict[str, object]:
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started}


def _describe(path: str) -> str:
    try:
        with open(path) as f:
            holder = json.load(f)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        # Read while the holder was still writing its description.
        return "holder not yet described"


@contextlib.contextmanager
def hold_workdir(workdir: str) -> Iterator[str | None]:
    """Holds ``workdir/run.lock`` for the duration of the block; yields the lock file's path
    (None for a non-local workdir, which is not locked).

    Raises WorkdirInUseError at once, naming the holder (pid, host, start time), when another
    live process holds it, and WorkdirLockError (one line naming the file and the cause) when the
    lock file cannot be written. Creates ``workdir`` if needed.
    """
    if not _is_local(workdir):
        yield None
        return
    path = os.path.join(workdir, WORKDIR_LOCK_NAME)
    try:
        os.makedirs(workdir, exist_ok=True)
        # Opened without truncation: the holder's description must survive a failed attempt.
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise WorkdirLockError(f"cannot lock workdir {workdir}: {path}: {error.strerror}") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirInUseError(
                f"workdir {workdir} is in use by another run ({_describe(path)}); wait for it "
                "to end or use another --workdir"
            ) from None
        try:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, json.dumps(_holder_description()).encode())
            os.fsync(descriptor)
        except OSError as error:
            raise WorkdirLockError(
                f"cannot lock workdir {workdir}: writing {path} failed ([Errno {error.errno}] "
                f"{error.strerror}); make room or use another --workdir"
            ) from None
        yield path
    finally:
        # Closing the descriptor releases the lock.
        os.close(descriptor)


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Waits for, then holds, an exclusive lock on the file ``path`` (created if missing) for the
    duration of the block; a no-op for non-local paths."""
    if not _is_local(path):
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
