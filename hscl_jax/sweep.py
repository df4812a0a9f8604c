"""Sweep runner: methods x beta (x queue size, x hardening) x seeds, one run after another,
resumable.

    python -m hscl_jax.sweep --config=configs/study.py --workdir=DIR
    python -m hscl_jax.sweep --config=configs/default.py --workdir=DIR --config.num_steps=100

The grid is ``config.sweep`` when the config has one (see configs/study.py and
configs/study_queue.py), else DEFAULT_GRID. Optional grid entries: ``queue_sizes`` (every method and
beta once per size; default (0,)), ``hardenings`` (tilted methods also once per hardening function
other than "exp", without a queue; default ("exp",)) and ``hardening_options`` ({hardening:
{config.loss field: value}}, the settings a hardening function runs with).
Each run trains with hscl_jax.trainer in
``DIR/runs/<method>_b<beta>_s<seed>[_q<size>][_<hardening>]/`` and is evaluated with
hscl_jax.evaluate (weighted kNN and linear probe on the frozen encoder). A finished run leaves
``record.json`` there and is skipped when the sweep is started again; an interrupted run resumes
from its last checkpoint. After every run the sweep rewrites

- ``DIR/study.json``: a list with one record per finished run: ``method``, ``beta``, ``seed``,
  ``queue_size``, ``hardening``, ``knn_top1``, ``knn_top5``, ``linear_top1`` (fractions),
  ``wall_s``;
- ``DIR/study.md``: mean +- std per (method, beta, queue size, hardening) cell; paired over seeds,
  with a paired t-test: H-SCL minus SCL (and H-UCL minus UCL) per beta and queue size, each queue
  size minus no queue, each hardening function minus "exp".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from hscl_jax import config as config_lib
from hscl_jax import evaluate, losses, metrics, trainer

TILTED = ("hucl", "hscl")
METRICS = ("knn_top1", "knn_top5", "linear_top1")

# A run's record (record.json, an entry of study.json): its method, beta, seed, queue size,
# hardening, METRICS and wall time, as JSON.
Record = dict[str, Any]
# The cell a run belongs to: (method, beta, queue size, hardening).
Cell = tuple[str, float, int, str]

DEFAULT_GRID = {
    "methods": losses.LOSS_NAMES,
    "betas": (0.5, 1.0, 5.0),
    "seeds": (0, 1, 2, 3, 4),
}


@dataclasses.dataclass(frozen=True)
class Run:
    method: str
    beta: float  # 0 for the untilted methods
    seed: int
    queue_size: int = 0  # config.queue.size; 0: no queue
    hardening: str = "exp"  # config.loss.hardening of the tilted methods

    @property
    def name(self) -> str:
        name = f"{self.method}_b{self.beta:g}_s{self.seed}"
        if self.queue_size:
            name += f"_q{self.queue_size}"
        if self.hardening != "exp":
            name += f"_{self.hardening}"
        return name


def grid_runs(grid: Mapping[str, Any]) -> list[Run]:
    """The runs of a grid: tilted methods once per beta, the others once; for every seed."""
    methods = tuple(grid["methods"])
    unknown = [m for m in methods if m not in losses.LOSS_NAMES]
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown} in the sweep grid; allowed: {losses.LOSS_NAMES}"
        )
    betas = tuple(float(b) for b in grid["betas"])
    if any(b < 0 for b in betas):
        raise ValueError(f"sweep betas must be >= 0, got {betas}")
    seeds = tuple(int(s) for s in grid["seeds"])
    if not seeds:
        raise ValueError("the sweep grid needs at least one seed")
    queue_sizes = tuple(grid.get("queue_sizes", (0,)))
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in queue_sizes):
        raise ValueError(f"sweep queue_sizes must be integers >= 0, got {queue_sizes}")
    hardenings = [h for h in grid.get("hardenings", ("exp",)) if h != "exp"]
    # Seed-major order: a sweep stopped early still holds every cell for its first seeds.
    runs: list[Run] = []
    for seed in seeds:
        for method in methods:
            for beta in betas if method in TILTED else (0.0,):
                runs += [Run(method, beta, seed, size) for size in queue_sizes]
                if method in TILTED:
                    runs += [Run(method, beta, seed, 0, h) for h in hardenings]
    return runs


def run_config(base: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
    """``base`` with the run's loss, beta and seeds (model init and data order)."""
    config = ml_collections.ConfigDict(base.to_dict())
    if "sweep" in config:
        del config["sweep"]
    config.loss.name = run.method
    if run.method in TILTED:
        config.loss.beta = run.beta
    if run.method == "supcon" and "sweep" in base and "supcon_temperature" in base.sweep:
        config.loss.temperature = base.sweep.supcon_temperature
    config.seed = run.seed
    config.data.seed = run.seed
    if run.queue_size or "queue" in config:
        config.queue.size = run.queue_size
    if run.hardening != "exp":
        config.loss.hardening = run.hardening
        options = base.sweep.get("hardening_options", {}) if "sweep" in base else {}
        for field, value in dict(options.get(run.hardening, {})).items():
            config.loss[field] = value
    return config


def run_one(config: ml_collections.ConfigDict, run: Run, run_dir: str) -> Record:
    """Trains and evaluates one run (resuming if it was interrupted); returns its record."""
    record_path = os.path.join(run_dir, "record.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    trainer.train_and_evaluate(config, run_dir)
    results = evaluate.evaluate_workdir(run_dir, config=config)
    record = {
        "method": run.method,
        "beta": run.beta,
        "seed": run.seed,
        "queue_size": run.queue_size,
        "hardening": run.hardening,
        **{k: float(results[k]) for k in METRICS},
        "wall_s": round(time.time() - start, 1),
    }
    metrics.write_json_atomic(record_path, record)
    return record


def _mean_std(values: Sequence[float]) -> str:
    array = np.asarray(values, float)
    std = array.std(ddof=1) if len(array) > 1 else float("nan")
    return f"{100 * array.mean():.2f} +- {100 * std:.2f}"


def _cell(record: Record) -> Cell:
    """(method, beta, queue size, hardening) of a record (records written before queues and
    hardening functions existed had neither: no queue, "exp")."""
    return (
        record["method"],
        float(record["beta"]),
        int(record.get("queue_size", 0)),
        record.get("hardening", "exp"),
    )


def _cell_of(method: str, beta: float = 0.0, queue_size: int = 0, hardening: str = "exp") -> Cell:
    return (method, float(beta) if method in TILTED else 0.0, queue_size, hardening)


def paired_difference(
    records: Iterable[Record], cell: Cell, baseline: Cell, metric: str
) -> dict[str, float] | None:
    """Cell minus baseline cell (each ``(method, beta, queue_size, hardening)``) over the seeds
    both finished: mean, std, t and p (two-sided); None with fewer than 2 pairs."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in records:
        got = _cell(r)
        for key, wanted in (("a", cell), ("b", baseline)):
            # Betas compare as floats; method, queue size and hardening exactly.
            if got[0] == wanted[0] and math.isclose(got[1], wanted[1]) and got[2:] == wanted[2:]:
                by_seed.setdefault(r["seed"], {})[key] = r[metric]
    diffs = np.array([v["a"] - v["b"] for v in by_seed.values() if len(v) == 2])
    if len(diffs) < 2:
        return None
    from scipy import stats

    std = diffs.std(ddof=1)
    if std == 0:
        t, p = (0.0, 1.0) if diffs.mean() == 0 else (math.inf, 0.0)
    else:
        t, p = stats.ttest_1samp(diffs, 0.0)
    return {
        "n": len(diffs),
        "mean": float(diffs.mean()),
        "std": float(std),
        "t": float(t),
        "p": float(p),
    }


def _comparisons(cells: Sequence[Cell]) -> list[tuple[str, Cell, Cell]]:
    """(label, cell, baseline) of every paired comparison the cells allow."""
    comparisons: list[tuple[str, Cell, Cell]] = []
    for method, beta, size, hardening in cells:
        if hardening == "exp":
            for tilted, untilted in (("hscl", "scl"), ("hucl", "ucl")):
                if method == tilted and _cell_of(untilted, 0.0, size) in cells:
                    label = f"{tilted} - {untilted} (b{beta:g}, q{size})"
                    comparisons.append(
                        (label, (method, beta, size, hardening), (untilted, 0.0, size, "exp"))
                    )
    for method, beta, size, hardening in cells:
        if size and hardening == "exp" and (method, beta, 0, "exp") in cells:
            label = (
                f"{method} b{beta:g}: q{size} - q0"
                if method in TILTED
                else f"{method}: q{size} - q0"
            )
            comparisons.append((label, (method, beta, size, hardening), (method, beta, 0, "exp")))
    for method, beta, size, hardening in cells:
        if hardening != "exp" and (method, beta, size, "exp") in cells:
            label = f"{method} b{beta:g}: {hardening} - exp"
            comparisons.append(
                (label, (method, beta, size, hardening), (method, beta, size, "exp"))
            )
    return comparisons


def study_markdown(records: list[Record]) -> str:
    """The per-cell table and the paired comparisons, as Markdown."""
    cells: dict[Cell, list[Record]] = {}
    for r in records:
        cells.setdefault(_cell(r), []).append(r)
    lines = [
        "| method | beta | queue | hardening | seeds | kNN top-1 (%) | kNN top-5 (%) "
        "| linear top-1 (%) | wall s/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {m: i for i, m in enumerate(losses.LOSS_NAMES)}
    ordered = sorted(cells, key=lambda c: (order[c[0]], c[1], c[3] != "exp", c[3], c[2]))
    for cell in ordered:
        method, beta, size, hardening = cell
        rs = cells[cell]
        beta_text = f"{beta:g}" if method in TILTED else "-"
        lines.append(
            f"| {method} | {beta_text} | {size} | {hardening if method in TILTED else '-'} | "
            f"{len(rs)} | "
            + " | ".join(_mean_std([r[k] for r in rs]) for k in METRICS)
            + f" | {np.mean([r['wall_s'] for r in rs]):.0f} |"
        )
    lines += [
        "",
        "Paired differences over seeds (percentage points; two-sided paired t-test):",
        "",
        "| comparison | metric | n | mean diff | std | t | p |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, cell, baseline in _comparisons(ordered):
        for metric in METRICS:
            d = paired_difference(records, cell, baseline, metric)
            if d is None:
                continue
            lines.append(
                f"| {label} | {metric} | {d['n']} | {100 * d['mean']:+.2f} | "
                f"{100 * d['std']:.2f} | {d['t']:.2f} | {d['p']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> list[Record]:
    """Runs every run of the grid not finished yet; rewrites study.json/study.md after each."""
    grid = config.sweep.to_dict() if "sweep" in config else DEFAULT_GRID
    runs = grid_runs(grid)
    os.makedirs(workdir, exist_ok=True)
    records: list[Record] = []
    for i, run in enumerate(runs):
        print(f"[sweep] run {i + 1}/{len(runs)}: {run.name}", flush=True)
        records.append(
            run_one(run_config(config, run), run, os.path.join(workdir, "runs", run.name))
        )
        metrics.write_json_atomic(os.path.join(workdir, "study.json"), records)
        with open(os.path.join(workdir, "study.md"), "w") as f:
            f.write(study_markdown(records))
    return records


def main(argv: Sequence[str]) -> None:
    del argv
    workdir = _WORKDIR.value
    assert workdir is not None  # a required flag
    run_sweep(_CONFIG.value, workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, config_lib.CONFIG_FLAG_HELP, lock_config=False
    )
    _WORKDIR = flags.DEFINE_string(
        "workdir", None, "Directory of the sweep: runs/<run>/, study.json and study.md go there."
    )
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=config_lib.parse_flags)
