"""Smoke tests of the benchmark scripts: each runs end to end at toy sizes and prints its figures.

The figures themselves are never asserted (timings belong to bench/, not to tests); what is
asserted is that every row docs/benchmarks.md quotes is printed, with numbers in it.
"""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_loss_benchmark_prints_its_table_and_both_memory_rows():
    out = _run(
        "bench/losses.py",
        "--sizes",
        "64",
        "96",
        "--repeats=1",
        "--block-size=32",
        "--memory-views=256",
        "--memory-block-size=48",
    )
    for views in (64, 96):
        row = rf"^\s*{views}" + rf"\s+{NUMBER}" * 4 + r"\s*$"
        assert re.search(row, out, re.MULTILINE), out
    assert re.search(rf"blocked \(block_size=48\) loss\+grad at 2B=256: .* {NUMBER} GB", out), out
    assert re.search(rf"dense loss\+grad at 2B=256: .* {NUMBER} GB", out), out


def test_train_step_benchmark_prints_both_parallelisms_the_ratio_and_the_augmentation_row():
    out = _run(
        "bench/train_step.py",
        "--cases=small_cnn",
        "--steps=1",
        "--repeats=2",
        "--batch=16",
        "--save-hiccup",
        "--augment",
        "--augment-model=small_cnn",
        "--augment-batch=16",
    )
    for mode in ("mesh", "pmap"):
        row = rf"^small_cnn\s+16\s+{mode}" + rf"\s+{NUMBER}" * 5 + r"\s+-\s*$"  # CPU: no peak
        assert re.search(row, out, re.MULTILINE), out
    ratio = rf"^small_cnn: mesh/pmap step time {NUMBER} \(median of 2 alternating rounds"
    assert re.search(ratio, out, re.MULTILINE), out
    for mode in ("async", "sync"):
        hiccup = rf"^small_cnn\s+{mode}" + rf"\s+-?{NUMBER}" * 4 + r"\s*$"
        assert re.search(hiccup, out, re.MULTILINE), out
    augment = rf"pipeline {NUMBER} pairs/s .* step {NUMBER} pairs/s; ratio pipeline/step: {NUMBER}$"
    assert re.search(augment, out, re.MULTILINE), out


def test_pipeline_benchmark_augment_mode_prints_a_row_per_shape():
    out = _run(
        "bench/pipeline.py",
        "--augment",
        "--augment-step=none",
        "--cifar-batches=1",
        "--large-batches=1",
    )
    for shape in ("digits 8x8x1", "cifar 32x32x3", "224 px"):
        row = (
            rf"^augment {shape}.*: host \(parameters\)\s+{NUMBER} pairs/s/core, device \(JAX\)"
            rf"\s+{NUMBER} pairs/s/core$"
        )
        assert re.search(row, out, re.MULTILINE), out
