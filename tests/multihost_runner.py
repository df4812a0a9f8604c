"""Runs train.py (arguments as train.py's) and records what this process read and wrote.

Used by tests/test_multihost.py, once per process (through python -m hscl_jax.launch) or alone.
At the end it writes ``$HSCL_TEST_RECORDS/process_<id>.json``:

- ``reads``: for each ``"<stream>:<split>"`` (stream: train_iterator or eval_iterator), the
  example indices of every batch slice this process read from that split's records;
- ``writes``: paths this process opened for writing or renamed onto (Python-level), and ``pid``.

``HSCL_TEST_KILL_AT_STEP=n``: SIGKILL this process right after it started saving step n (only
process ``HSCL_TEST_ONLY_PROCESS`` when that is set).
``HSCL_TEST_SIGTERM_AT_STEP=n``: send SIGTERM to this process after step n, as a preemption notice
arriving then (only process ``HSCL_TEST_ONLY_PROCESS`` when that is set).
"""

import atexit
import json
import os
import runpy
import signal
import sys
import time

import numpy as np

from hscl_jax import checkpoints, preemption
from hscl_jax.data import grain_source, pipeline

_records_dir = os.environ["HSCL_TEST_RECORDS"]
_reads: dict[str, list[list[int]]] = {}
_writes: list[str] = []


_split_of_records: dict[int, str] = {}
_open_split = pipeline._open_split


def _recording_open_split(info, data_config, split):
    records, decode = _open_split(info, data_config, split)
    _split_of_records[id(records)] = split
    return records, decode


_read_examples = grain_source.read_examples


def _recording_read_examples(records, indices, decode=None):
    reader = sys._getframe(1).f_code.co_qualname
    stream = "train_iterator" if reader.startswith("TrainBatchReader") else "eval_iterator"
    split = _split_of_records.get(id(records))
    _reads.setdefault(f"{stream}:{split}", []).append(np.asarray(indices).tolist())
    return _read_examples(records, indices, decode)


# The pipeline reads a process's slice of a batch through these two (decoding in this process:
# the tiny configs keep data.decode_workers at 0).
pipeline._open_split = _recording_open_split
grain_source.read_examples = _recording_read_examples


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _audit(event, args):
    if event == "open" and isinstance(args[0], str):
        path, mode, flags = args
        if (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and flags & _WRITE_FLAGS
        ):
            _writes.append(os.path.abspath(path))
    elif event == "os.rename":  # os.rename and os.replace: the file written under a temporary name
        _writes.append(os.path.abspath(os.fsdecode(args[1])))


sys.addaudithook(_audit)


def _chosen(step: int, at: str) -> bool:
    """Whether this process is to act at ``step`` (environment variable ``at``)."""
    import jax

    only = os.environ.get("HSCL_TEST_ONLY_PROCESS")
    return step == int(os.environ[at]) and (only is None or int(only) == jax.process_index())


if "HSCL_TEST_KILL_AT_STEP" in os.environ:
    _save = checkpoints.save_checkpoint

    def _save_then_die(manager, step, host_state, meta):
        _save(manager, step, host_state, meta)
        if _chosen(step, "HSCL_TEST_KILL_AT_STEP"):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.save_checkpoint = _save_then_die

if "HSCL_TEST_SIGTERM_AT_STEP" in os.environ:
    _should_stop = preemption.StopSignals.should_stop

    def _sigterm_then_check(self, step):
        if _chosen(step, "HSCL_TEST_SIGTERM_AT_STEP"):
            os.kill(os.getpid(), signal.SIGTERM)
            # Time for JAX's preemption sync to agree on a step while the others wait for this
            # process in their next collective (it took ~0.6 s, 6 steps, without the pause).
            time.sleep(2)
        return _should_stop(self, step)

    preemption.StopSignals.should_stop = _sigterm_then_check


def _dump_records():
    import jax

    process = jax.process_index() if jax.distributed.is_initialized() else 0
    os.makedirs(_records_dir, exist_ok=True)
    with open(os.path.join(_records_dir, f"process_{process}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "reads": _reads, "writes": _writes}, f)


# Registered after JAX's exit handler (jax is imported above): runs before it shuts down the
# distributed client, so the process index is still known.
atexit.register(_dump_records)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
