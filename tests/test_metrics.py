"""Tests for hscl_jax.metrics: the metrics.jsonl reader (a record cut short by a kill is skipped),
dropping the records a resumed run logs again, the atomic JSON writer, the workdir check."""

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
