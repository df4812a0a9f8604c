"""What a run writes beside its checkpoints: the file names of a run directory, the metric writer
(metrics.jsonl + TensorBoard events), the one metrics.jsonl reader and the one atomic JSON writer.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from typing import Any

from absl import logging

# The files of a run directory (train.py --workdir); checkpoints.CHECKPOINTS_DIR is the other.
CONFIG_JSON = "config.json"
METRICS_JSONL = "metrics.jsonl"
EVAL_JSON = "eval.json"
TENSORBOARD_DIR = "tensorboard"
THEORY_CSV = "theory.csv"
THEORY_TRAIN_CSV = "theory_train.csv"
BETA_SWEEP_CSV = "beta_sweep.csv"
EMBEDDINGS_NPZ = "embeddings.npz"


class WorkdirError(ValueError):
    """A run directory that cannot be used: a URL, a regular file, or not writable."""


class _EventFile:
    """A TensorBoard event file: tensorboard's record framing over a plain local file.

    tensorboard's own EventFileWriter opens its file through ``tensorboard.compat.tf``, which
    imports the whole of TensorFlow whenever it is installed (seconds of every run's start, and
    TensorFlow on a path that otherwise never needs it); a run directory is a local path, so a
    plain file does. Raises ImportError when tensorboard is not installed.
    """

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        os.makedirs(logdir, exist_ok=True)
        # TensorBoard's naming; the last field tells apart the files one process opens in the
        # same second (a run resumed in the process that wrote the previous file).
        stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        uid = 0
        while True:
            try:
                handle = open(os.path.join(logdir, f"{stem}.{uid}"), "xb")  # noqa: SIM115
                break
            except FileExistsError:
                uid += 1
        self._records = RecordWriter(handle)
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def add_event(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def prepare_workdir(workdir: str) -> None:
    """Creates ``workdir`` when it is missing and checks that a file can be written in it.

    Raises WorkdirError (one line) for a URL (``gs://``...), a path that is a file or one that is
    not writable, before the run writes anything.
    """
    if "://" in workdir:
        # Run files are appended to and renamed in place, which object stores do not offer.
        raise WorkdirError(
            f"workdir {workdir!r} is a URL; give a local or mounted directory (for several "
            "hosts: a shared file system mounted at the same path on every host)"
        )
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(
            f"workdir {workdir!r} is a file, not a directory; give a directory (created when "
            "missing)"
        )
    try:
        os.makedirs(workdir, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write_probe_", dir=workdir)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise WorkdirError(
            f"workdir {workdir!r} is not writable ({error.strerror}); give a directory this "
            "process can create and write files in"
        ) from None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """One dict per line of a JSON-lines file ([] if there is no such file).

    Blank lines and a line that does not parse (a record cut short by a kill) are skipped.
    """
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl`` (empty if there is no such file)."""
    return read_jsonl(os.path.join(workdir, METRICS_JSONL))


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes ``payload`` as indented, key-sorted JSON; readers see the old file or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def drop_records_after(path: str, step: int) -> None:
    """Rewrites a metrics.jsonl without the records of steps after ``step`` (a run resumed from the
    checkpoint at ``step`` logs them again) and without a record cut short by a kill."""
    kept = [record for record in read_jsonl(path) if record.get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in kept)
    os.replace(path + ".tmp", path)


class MetricWriter:
    """metrics.jsonl + TensorBoard event files in ``workdir``; a no-op on processes other than 0.

    A run that starts at step ``resumed_at`` (None: from scratch, step 0) in a workdir an earlier
    run logged to drops that run's records of later steps, which it logs again: a run killed
    before its first checkpoint and started again leaves no duplicates.

    TensorBoard events are written with tensorboard's record framing over a plain file, never
    importing TensorFlow; when the tensorboard package is missing, only metrics.jsonl is written.
    """

    def __init__(self, workdir: str, *, enabled: bool, resumed_at: int | None = None):
        self._jsonl = None
        self._events = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_JSONL)
        start = resumed_at or 0
        restarted = os.path.exists(path)
        if restarted:
            drop_records_after(path, start)
        self._jsonl = open(path, "a")  # noqa: SIM115
        try:
            self._events = _EventFile(os.path.join(workdir, TENSORBOARD_DIR))
        except ImportError:
            logging.warning("tensorboard is not installed: no TensorBoard event files")
        else:
            if restarted:
                from tensorboard.compat.proto import event_pb2

                # A restart marker: TensorBoard drops the earlier run's events after this step.
                self._events.add_event(
                    event_pb2.Event(
                        wall_time=time.time(),
                        step=start,
                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
                    )
                )

    def write(self, step: int, metrics: dict[str, float], *, tensorboard_prefix: str = "") -> None:
        """One metrics.jsonl record {"step", **metrics}; TensorBoard tags get
        ``tensorboard_prefix`` (keeps e.g. epoch means apart from the step values of a tag)."""
        if self._jsonl is None:  # not process 0
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            summary = summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag=tensorboard_prefix + k, simple_value=float(v))
                    for k, v in metrics.items()
                ]
            )
            self._events.add_event(
                event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
            )
            self._events.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._events is not None:
            self._events.close()
