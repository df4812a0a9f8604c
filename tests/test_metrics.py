"""Tests for hscl_jax.metrics: the metrics.jsonl reader (a record cut short by a kill is skipped),
dropping the records a resumed or restarted run logs again, the atomic JSON writer, the workdir
check."""

import json
import os

import pytest

from hscl_jax import metrics


def test_reader_skips_a_cut_record_and_resume_drops_later_steps(tmp_path):
    path = tmp_path / metrics.METRICS_JSONL
    assert metrics.read_metrics(str(tmp_path)) == []
    records = [{"step": 2, "loss": 1.5}, {"step": 2, "knn_top1": 0.5}, {"step": 4, "loss": 1.25}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '\n{"step": 6, "lo')
    assert metrics.read_metrics(str(tmp_path)) == records
    metrics.drop_records_after(str(path), 2)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records[:2])
    writer = metrics.MetricWriter(str(tmp_path), enabled=True, resumed_at=1)
    writer.write(2, {"loss": 1.0})
    writer.close()
    assert metrics.read_metrics(str(tmp_path)) == [{"step": 2, "loss": 1.0}]


def test_a_run_started_again_from_scratch_drops_the_earlier_runs_records(tmp_path):
    # A run killed before its first checkpoint leaves records; started again, it logs them again.
    writer = metrics.MetricWriter(str(tmp_path), enabled=True)
    writer.write(2, {"loss": 2.5})
    writer.write(4, {"loss": 1.5})
    writer.close()
    writer = metrics.MetricWriter(str(tmp_path), enabled=True, resumed_at=None)
    writer.write(2, {"loss": 2.0})
    writer.close()
    assert metrics.read_metrics(str(tmp_path)) == [{"step": 2, "loss": 2.0}]


def test_json_written_atomically_and_workdir_checked(tmp_path):
    path = str(tmp_path / "x.json")
    metrics.write_json_atomic(path, {"b": 1, "a": [1, 2]})
    with open(path) as f:
        assert f.read() == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True)
    assert os.listdir(tmp_path) == ["x.json"]
    run = tmp_path / "new" / "run"
    metrics.prepare_workdir(str(run))
    assert run.is_dir() and os.listdir(run) == []  # the write probe is gone
    with pytest.raises(metrics.WorkdirError, match=r"workdir '.*x.json' is a file, not a dir"):
        metrics.prepare_workdir(path)
    with pytest.raises(metrics.WorkdirError, match=r"workdir '.*x.json/run' is not writable"):
        metrics.prepare_workdir(os.path.join(path, "run"))


_WRITE_TWO_RUNS = """
import sys
from hscl_jax import metrics
workdir = sys.argv[1]
writer = metrics.MetricWriter(workdir, enabled=True)
writer.write(1, {"loss": 2.5})
writer.write(2, {"loss": 1.5, "knn_top1": 0.5})
writer.close()
writer = metrics.MetricWriter(workdir, enabled=True, resumed_at=1)  # same process, same second
writer.write(2, {"loss": 1.25}, tensorboard_prefix="epoch/")
writer.close()
print("tensorflow" in sys.modules)
"""


def test_tensorboard_events_are_written_without_importing_tensorflow(tmp_path):
    pytest.importorskip("tensorboard")
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", _WRITE_TWO_RUNS, str(tmp_path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"  # TensorFlow was never imported
    files = sorted(os.listdir(tmp_path / metrics.TENSORBOARD_DIR))
    assert len(files) == 2 and files[0].endswith(".0") and files[1].endswith(".1"), files
    events = [
        list(LegacyEventFileLoader(str(tmp_path / metrics.TENSORBOARD_DIR / name)).Load())
        for name in files
    ]
    assert all(run[0].file_version == "brain.Event:2" for run in events)
    scalars = [
        [(e.step, v.tag, v.simple_value) for e in run for v in e.summary.value] for run in events
    ]
    assert scalars[0] == [(1, "loss", 2.5), (2, "loss", 1.5), (2, "knn_top1", 0.5)]
    assert scalars[1] == [(2, "epoch/loss", 1.25)]
    # The resumed writer marks the restart, so TensorBoard drops the first file's later steps.
    assert [(e.step, e.session_log.status) for e in events[1] if e.HasField("session_log")] == [
        (1, 1)
    ]
    with open(tmp_path / metrics.METRICS_JSONL) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
