"""Smoke test of `bench/pipeline.py --memory` at toy sizes: it prints a row per dataset size
(prepare images/s and peak RSS, stream peak RSS) and ends with the growth of both peaks (the
figures themselves belong to bench/, not to tests)."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUMBER = r"-?[0-9]+(?:\.[0-9]+)?"


@pytest.mark.slow
def test_memory_benchmark_prints_a_row_per_size_and_the_growth_last(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "bench/pipeline.py",
            "--memory",
            "--memory-sizes",
            "48",
            "96",
            "--image-size=16",
            "--memory-steps=2",
            "--memory-batch=16",
            f"--cache-dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    for size in (48, 96):
        row = (
            rf"^images\s+{size} x 16x16x3 PNG .*: prepare\s+{NUMBER} images/s, peak RSS\s+{NUMBER} "
            rf"MB; stream 2 steps of batch 16: peak RSS\s+{NUMBER} MB$"
        )
        assert any(re.match(row, line) for line in lines), done.stdout
    assert re.fullmatch(rf"prepare_rss_growth_mb: {NUMBER}", lines[-2]), done.stdout
    assert re.fullmatch(rf"rss_growth_mb: {NUMBER}", lines[-1]), done.stdout
