"""Tests for hscl_jax.plot: every plot writes a PNG, PCA finds the main direction, the CLI."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hscl_jax import plot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THEORY_HEADER = (
    "step",
    "epoch",
    "hscl",
    "hucl",
    "scl",
    "ucl",
    "assumption_fraction",
    "assumption_log_ratio",
    "hscl_le_hucl",
    "scl_le_ucl",
    "ucl_lt_hscl",
    "beta",
    "temperature",
    "num_batches",
)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def _theory_table(num_rows=4):
    steps = np.arange(1, num_rows + 1) * 100.0
    return {
        "step": steps,
        "hscl": 3.0 - 0.1 * np.arange(num_rows),
        "hucl": 3.2 - 0.1 * np.arange(num_rows),
        "scl": 2.5 - 0.1 * np.arange(num_rows),
        "ucl": 2.7 - 0.1 * np.arange(num_rows),
        "assumption_fraction": np.linspace(0.4, 0.9, num_rows),
        "assumption_log_ratio": np.linspace(-0.2, 0.5, num_rows),
        "beta": np.full(num_rows, 1.0),
    }


def _write_run(workdir):
    records = [
        {"step": 10, "loss": 3.5, "grad_norm": 1.0},
        {"step": 20, "loss": 3.2, "grad_norm": 0.9},
        {"step": 20, "knn_top1": 0.3, "knn_top5": 0.7},
    ]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    table = _theory_table()
    with open(os.path.join(workdir, "theory.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(THEORY_HEADER)
        for i in range(len(table["step"])):
            writer.writerow([table[k][i] if k in table else "" for k in THEORY_HEADER])
    with open(os.path.join(workdir, "beta_sweep.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["beta", "hscl", "hucl", "scl", "ucl", "ucl_lt_hscl"])
        for beta, hscl, hucl in ((0.0, 2.5, 2.6), (1.0, 2.8, 2.9), (5.0, 3.2, 3.3)):
            writer.writerow([beta, hscl, hucl, 2.5, 2.6, float(2.6 < hscl)])
    rng = np.random.default_rng(0)
    np.savez(
        os.path.join(workdir, "embeddings.npz"),
        features=rng.normal(size=(60, 5)),
        labels=np.arange(60) % 3,
    )
    np.savez(os.path.join(workdir, "unrelated.npz"), weights=np.zeros(3))


def test_every_plot_writes_a_png(tmp_path):
    written = [
        plot.plot_training_curves(
            [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "knn_top1": 0.4}],
            str(tmp_path / "curves.png"),
        ),
        plot.plot_four_losses(_theory_table(), str(tmp_path / "losses.png")),
        plot.plot_assumption(_theory_table(), str(tmp_path / "assumption.png")),
        plot.plot_beta_sweep(
            {
                "beta": np.array([5.0, 0.0, 1.0]),
                "hscl": np.array([3.2, 2.5, 2.8]),
                "ucl": np.array([2.6, 2.6, 2.6]),
            },
            str(tmp_path / "sweep.png"),
        ),
        plot.plot_embeddings_pca(
            np.random.default_rng(0).normal(size=(50, 4)),
            np.arange(50) % 12,
            str(tmp_path / "p.png"),
        ),
    ]
    for path in written:
        assert _is_png(path), path


def test_pca_2d_finds_the_direction_of_largest_variance():
    rng = np.random.default_rng(0)
    along = rng.normal(size=200) * 10.0
    across = rng.normal(size=200)
    direction, orthogonal = np.array([0.6, 0.8, 0.0]), np.array([-0.8, 0.6, 0.0])
    features = np.outer(along, direction) + np.outer(across, orthogonal) + 5.0
    projected = plot.pca_2d(features)
    assert projected.shape == (200, 2)
    assert abs(np.corrcoef(projected[:, 0], along)[0, 1]) > 0.999
    assert abs(np.corrcoef(projected[:, 1], across)[0, 1]) > 0.99
    np.testing.assert_allclose(projected.mean(axis=0), 0.0, atol=1e-9)
    one_dimensional = plot.pca_2d(along[:, None])
    np.testing.assert_array_equal(one_dimensional[:, 1], 0.0)


def test_bad_plot_inputs_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="must match"):
        plot.plot_embeddings_pca(np.zeros((5, 3)), np.zeros(4), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="lacks column"):
        plot.plot_four_losses({"step": np.arange(3.0)}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="neither"):
        plot.plot_training_curves([{"step": 1, "grad_norm": 1.0}], str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


def test_read_csv_columns_reads_empty_cells_as_nan(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("step,epoch,hscl\n1,,2.5\n2,0.5,2.25\n")
    table = plot.read_csv_columns(str(path))
    np.testing.assert_array_equal(table["step"], [1.0, 2.0])
    assert np.isnan(table["epoch"][0]) and table["epoch"][1] == 0.5
    np.testing.assert_array_equal(table["hscl"], [2.5, 2.25])


def test_cli_regenerates_the_plots_of_a_workdir(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    _write_run(str(workdir))
    result = subprocess.run(
        [sys.executable, "-m", "hscl_jax.plot", f"--workdir={workdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    expected = {
        "training_curves.png",
        "theory_losses.png",
        "theory_assumption.png",
        "beta_sweep.png",
        "embeddings_pca.png",
    }
    assert {os.path.basename(p) for p in result.stdout.split()} == expected
    for name in expected:
        assert _is_png(workdir / name), name
    assert not (workdir / "unrelated_pca.png").exists()
    # Nothing to plot: exit status 1 with the reason.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot.main([f"--workdir={empty}"]) == 1
