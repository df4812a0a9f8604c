"""PNG plots of a run, written next to the data they show.

- ``training_curves.png`` from ``metrics.jsonl``: training loss and kNN top-1 over steps;
- ``<name>_losses.png`` and ``<name>_assumption.png`` from ``theory.csv`` / ``theory_train.csv``
  (hscl_jax.analysis): the four loss curves and the Assumption 1 fraction over training;
- ``beta_sweep.png`` from ``beta_sweep.csv``: H-SCL vs UCL across beta, shading where UCL < H-SCL;
- ``<name>_pca.png`` from any ``<name>.npz`` holding ``features`` and ``labels``: a 2-D PCA of the
  embeddings coloured by class.

``python -m hscl_jax.plot --workdir=DIR`` regenerates every plot whose data exist. Figures are
drawn on matplotlib's Agg canvas directly, without pyplot, so importing this module changes no
global matplotlib state.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hscl_jax import metrics

THEORY_LOSS_STYLES = (
    ("hscl", "H-SCL", "tab:red"),
    ("hucl", "H-UCL", "tab:orange"),
    ("scl", "SCL", "tab:blue"),
    ("ucl", "UCL", "tab:green"),
)
THEORY_CSV_NAMES = (metrics.THEORY_CSV, metrics.THEORY_TRAIN_CSV)


# ----------------------------------------------------------------------------- readers


def read_csv_columns(path: str) -> dict[str, np.ndarray]:
    """A CSV file as {column: float array}; empty or non-numeric cells become NaN."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        names = reader.fieldnames or []

    def number(text: str | None) -> float:
        # A row shorter than the header holds None in its missing cells.
        if text is None:
            return float("nan")
        try:
            return float(text)
        except (TypeError, ValueError):
            return float("nan")

    return {name: np.array([number(row.get(name)) for row in rows], np.float64) for name in names}


def _save(figure: Figure, path: str) -> str:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path


def _require_columns(table: dict[str, np.ndarray], columns: Sequence[str], what: str) -> int:
    missing = [c for c in columns if c not in table]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; has {sorted(table)}")
    length = len(table[columns[0]])
    if length == 0:
        raise ValueError(f"{what} has no rows")
    return length


# ----------------------------------------------------------------------------- plots


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str) -> str:
    """Training loss and kNN top-1 against step (metrics.jsonl records) in one PNG."""
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    knn = [(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r and "step" in r]
    if not loss and not knn:
        raise ValueError("the metrics hold neither 'loss' nor 'knn_top1' records with a 'step'")
    figure = Figure(figsize=(10, 4))
    loss_axes, knn_axes = figure.subplots(1, 2)
    for axes, points, name in ((loss_axes, loss, "training loss"), (knn_axes, knn, "kNN top-1")):
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="." if len(points) < 50 else None)
        else:
            axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes)
        axes.set_xlabel("step")
        axes.set_title(name)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_four_losses(table: dict[str, np.ndarray], path: str) -> str:
    """The four loss curves (H-SCL, H-UCL, SCL, UCL) over training from a theory table."""
    _require_columns(table, ["step"] + [k for k, _, _ in THEORY_LOSS_STYLES], "the theory table")
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for key, label, colour in THEORY_LOSS_STYLES:
        axes.plot(table["step"], table[key], marker=".", label=label, color=colour)
    beta = table.get("beta", np.array([np.nan]))
    title = "Four losses, shared positives and Q"
    if np.isfinite(beta).any():
        title += f" (beta = {np.nanmean(beta):g})"
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel("batch loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return _save(figure, path)


def plot_assumption(table: dict[str, np.ndarray], path: str) -> str:
    """Assumption 1 over training: fraction of anchors with m_same >= m_diff, and mean log-ratio."""
    _require_columns(table, ["step", "assumption_fraction"], "the theory table")
    figure = Figure(figsize=(10, 4))
    fraction_axes, ratio_axes = figure.subplots(1, 2)
    fraction_axes.plot(table["step"], table["assumption_fraction"], marker=".", color="tab:purple")
    fraction_axes.set_ylim(-0.02, 1.02)
    fraction_axes.set_title("Assumption 1 holds (fraction of anchors)")
    if "assumption_log_ratio" in table:
        ratio_axes.plot(table["step"], table["assumption_log_ratio"], marker=".", color="tab:gray")
        ratio_axes.axhline(0.0, color="black", lw=0.8)
    ratio_axes.set_title("mean log(m_same / m_diff)")
    for axes in (fraction_axes, ratio_axes):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_beta_sweep(table: dict[str, np.ndarray], path: str) -> str:
    """H-SCL, H-UCL and UCL against beta; the band where UCL < H-SCL (lower bound) is shaded."""
    _require_columns(table, ["beta", "hscl", "ucl"], "the beta sweep table")
    order = np.argsort(table["beta"])
    beta, hscl, ucl = (table[k][order] for k in ("beta", "hscl", "ucl"))
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    axes.plot(beta, hscl, marker="o", color="tab:red", label="H-SCL")
    if "hucl" in table:
        axes.plot(beta, table["hucl"][order], marker="s", color="tab:orange", label="H-UCL")
    axes.plot(beta, ucl, marker="^", color="tab:green", label="UCL")
    lower = ucl < hscl
    if lower.any():
        axes.fill_between(
            beta,
            ucl,
            hscl,
            where=lower,
            interpolate=True,
            color="tab:red",
            alpha=0.15,
            label="UCL < H-SCL (lower-bound scenario)",
        )
        first = beta[np.argmax(lower)]
        axes.axvline(first, color="tab:red", ls=":", lw=1)
    axes.set_xlabel("beta (hardness)")
    axes.set_ylabel("batch loss")
    axes.set_title("H-SCL vs UCL across beta")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return _save(figure, path)


def pca_2d(features: npt.ArrayLike) -> np.ndarray:
    """Projection of ``features`` (n, d) on its first two principal components, (n, 2).

    Fewer than two dimensions (or rank) leave zero columns.
    """
    array = np.asarray(features, np.float64)
    if array.ndim != 2 or array.shape[0] < 1:
        raise ValueError(f"features must have shape (n >= 1, d), got {array.shape}")
    centred = array - array.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:2].T
    if projected.shape[1] < 2:
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    return projected


def _class_colours(count: int) -> list[tuple[float, float, float, float]]:
    if count <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(count)]
    return [matplotlib.colormaps["turbo"](i / (count - 1)) for i in range(count)]


def plot_embeddings_pca(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    path: str,
    *,
    max_points: int = 5000,
    title: str | None = None,
) -> str:
    """2-D PCA scatter of ``features`` (n, d) coloured by integer class ``labels`` (n,).

    At most ``max_points`` points are drawn (the first ones; the PCA uses them all).
    """
    label_array = np.asarray(labels)
    feature_array = np.asarray(features)
    if label_array.shape != (feature_array.shape[0],) or feature_array.ndim != 2:
        raise ValueError(
            f"features (n, d) and labels (n,) must match, got {feature_array.shape} and "
            f"{label_array.shape}"
        )
    points = pca_2d(feature_array)[:max_points]
    shown_labels = label_array[:max_points].astype(int)
    classes = np.unique(shown_labels)
    figure = Figure(figsize=(6.5, 6))
    axes = figure.subplots()
    colours = _class_colours(len(classes))
    for colour, cls in zip(colours, classes, strict=True):
        chosen = shown_labels == cls
        axes.scatter(
            points[chosen, 0], points[chosen, 1], s=6, color=colour, label=str(cls), alpha=0.7
        )
    if len(classes) <= 20:
        axes.legend(markerscale=3, fontsize="small", title="class")
    axes.set_title(title or f"PCA of {feature_array.shape[1]}-d embeddings ({len(points)} points)")
    axes.set_xlabel("PC 1")
    axes.set_ylabel("PC 2")
    figure.tight_layout()
    return _save(figure, path)


# ----------------------------------------------------------------------------- a whole run


def plot_workdir(workdir: str) -> list[str]:
    """Draws every plot whose data exist in ``workdir``; returns the PNG paths written."""
    if not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir!r} is not a directory")
    written = []
    records = metrics.read_metrics(workdir)
    if any("loss" in r or "knn_top1" in r for r in records):
        written.append(plot_training_curves(records, os.path.join(workdir, "training_curves.png")))
    for name in THEORY_CSV_NAMES:
        path = os.path.join(workdir, name)
        if not os.path.exists(path):
            continue
        table = read_csv_columns(path)
        stem = os.path.splitext(path)[0]
        if table.get("step") is not None and len(table["step"]):
            written.append(plot_four_losses(table, f"{stem}_losses.png"))
            written.append(plot_assumption(table, f"{stem}_assumption.png"))
    sweep_path = os.path.join(workdir, metrics.BETA_SWEEP_CSV)
    if os.path.exists(sweep_path):
        written.append(
            plot_beta_sweep(read_csv_columns(sweep_path), os.path.join(workdir, "beta_sweep.png"))
        )
    for npz_path in sorted(glob.glob(os.path.join(workdir, "*.npz"))):
        with np.load(npz_path) as arrays:
            if "features" not in arrays or "labels" not in arrays:
                continue
            features, labels = arrays["features"], arrays["labels"]
        written.append(
            plot_embeddings_pca(features, labels, os.path.splitext(npz_path)[0] + "_pca.png")
        )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m hscl_jax.plot", description="Regenerates the PNG plots of a run."
    )
    parser.add_argument("--workdir", required=True, help="the run directory")
    args = parser.parse_args(argv)
    try:
        written = plot_workdir(args.workdir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not written:
        print(f"error: nothing to plot in {args.workdir}", file=sys.stderr)
        return 1
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
