"""The paper's theory, checkable on any run: the four-loss comparison and Assumption 1.

SPEC.md, "The theory the project lets users check". For a batch of projections ``z1, z2``:

* :func:`four_losses`: H-SCL, H-UCL, SCL and UCL with shared positives (the partner view) and the
  same Q = 2B - 2, computed by :mod:`hscl_jax.losses` (the paper's loss study).
* :func:`assumption1`: the batch estimate of Assumption 1. For anchor i the candidate set is H-UCL's
  negatives (every view but i and its partner), split by label into same-class and other-class
  views; over each part the beta-tilted mean of exp(s)::

      log m(i) = LSE_j((beta + 1) s_ij) - LSE_j(beta s_ij)

  The H-UCL mean is exactly the weighted mixture of m_same and m_diff, and m_diff is the H-SCL
  mean, so m_same >= m_diff for every anchor makes H-SCL <= H-UCL on the batch.
* :func:`theory_metrics`: both, plus whether H-SCL <= H-UCL, SCL <= UCL and UCL < H-SCL held (as
  0/1 floats); the train-time monitor. :func:`beta_sweep`: the same across betas on fixed
  embeddings, showing where the lower-bound scenario UCL < H-SCL appears.

All three batch functions take ``axis_name``: inside ``jax.pmap`` each device's anchors meet the
all-gathered global batch (view ordering as in hscl_jax.losses) and every device returns the
global figures.

Command line: ``python -m hscl_jax.analysis --workdir=DIR`` recomputes the theory metrics on
training batches for every checkpoint of a run (DIR/theory.csv), turns train-time theory metrics
found in DIR/metrics.jsonl into DIR/theory_train.csv, sweeps beta on the latest checkpoint
(DIR/beta_sweep.csv), saves test-set encoder features (DIR/embeddings.npz) and draws the PNGs
(hscl_jax.plot).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import numbers
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hscl_jax import losses

LOSS_KEYS = ("hscl", "hucl", "scl", "ucl")
ASSUMPTION_KEYS = ("assumption_fraction", "assumption_log_ratio", "assumption_num_anchors")
FLAG_KEYS = ("hscl_le_hucl", "scl_le_ucl", "ucl_lt_hscl")
# Keys of theory_metrics; a trainer logging them under these names in metrics.jsonl lets the CLI
# build theory_train.csv without recomputing anything.
THEORY_KEYS = LOSS_KEYS + ASSUMPTION_KEYS + FLAG_KEYS
THEORY_COLUMNS = (
    "step",
    "epoch",
    *LOSS_KEYS,
    *ASSUMPTION_KEYS,
    *FLAG_KEYS,
    "beta",
    "temperature",
    "num_batches",
)
SWEEP_KEYS = ("beta", "hscl", "hucl", "scl", "ucl", "ucl_lt_hscl", "assumption_fraction")
DEFAULT_BETAS = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0)

THEORY_CSV = "theory.csv"
THEORY_TRAIN_CSV = "theory_train.csv"
BETA_SWEEP_CSV = "beta_sweep.csv"
EMBEDDINGS_NPZ = "embeddings.npz"


# ----------------------------------------------------------------------------- validation


def _check_hyper(name: str, value: Any, *, positive: bool):
    """A concrete beta (>= 0) or temperature (> 0) as a float; a traced value passes unchecked."""
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, jax.Array | np.ndarray) and value.shape == ():
        value = value.item()
    allowed = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number {allowed}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    return value


def _check_batch(z1, z2, labels) -> None:
    z1_shape, z2_shape = jnp.shape(z1), jnp.shape(z2)
    if len(z1_shape) != 2 or z1_shape != z2_shape or z1_shape[0] < 1:
        raise ValueError(
            f"z1 and z2 must both have shape (batch >= 1, dim), got {z1_shape} and {z2_shape}"
        )
    if jnp.shape(labels) != (z1_shape[0],):
        raise ValueError(
            f"labels must have shape ({z1_shape[0]},) to match z1, got {jnp.shape(labels)}"
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}")


# ----------------------------------------------------------------------------- four losses


def four_losses(z1, z2, labels, *, beta, temperature=0.5, axis_name=None) -> dict[str, jax.Array]:
    """The paper's loss study on one batch: {"hscl", "hucl", "scl", "ucl"} (scalars).

    All four use the partner view as the only positive and Q = 2B - 2: H-SCL and SCL with
    ``positives="partner"``, H-UCL with ``tau_plus=0`` and no clamp (the comparison setting), UCL.
    ``beta`` tilts H-SCL and H-UCL. With ``axis_name`` (inside pmap) the values are global.
    """
    common = {"temperature": temperature, "axis_name": axis_name}
    return {
        "hscl": losses.hscl(z1, z2, labels, beta=beta, positives="partner", **common),
        "hucl": losses.hucl(z1, z2, beta=beta, tau_plus=0.0, clamp=False, **common),
        "scl": losses.scl(z1, z2, labels, positives="partner", **common),
        "ucl": losses.ucl(z1, z2, **common),
    }


# ----------------------------------------------------------------------------- Assumption 1


def _tilted_log_mean(s_row, mask, beta):
    """log of sum_j exp((beta+1) s_j) / sum_j exp(beta s_j) over the masked j of one anchor."""
    lse = losses.masked_logsumexp
    return lse((beta + 1.0) * s_row, mask) - lse(beta * s_row, mask)


def _assumption1_sums(z1, z2, labels, beta, temperature, axis_name):
    """Anchors counted, anchors for which m_same >= m_diff, and the sum of their log-ratios."""
    dtype = jnp.promote_types(jnp.result_type(z1, z2), jnp.float32)
    rows, row_partner, cols = losses.contrast_views(z1, z2, labels, axis_name)
    row_index, row_label = rows.index, rows.label
    col_index, col_label = cols.index, cols.label
    rows, cols = rows.z.astype(dtype), cols.z.astype(dtype)
    s = rows @ cols.T / temperature
    candidate = (col_index[None, :] != row_index[:, None]) & (
        col_index[None, :] != row_partner[:, None]
    )
    same_label = col_label[None, :] == row_label[:, None]
    same, diff = candidate & same_label, candidate & ~same_label

    per_anchor = jax.vmap(_tilted_log_mean, in_axes=(0, 0, None))
    log_m_same = per_anchor(s, same, beta)
    log_m_diff = per_anchor(s, diff, beta)
    counted = jnp.any(same, axis=1) & jnp.any(diff, axis=1)
    log_ratio = jnp.where(counted, log_m_same - log_m_diff, 0.0)
    sums = (
        jnp.sum(counted, dtype=dtype),
        jnp.sum(counted & (log_ratio >= 0), dtype=dtype),
        jnp.sum(log_ratio),
    )
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    return sums


def _assumption1(z1, z2, labels, beta, temperature, axis_name):
    beta = jnp.asarray(beta, jnp.float32)
    z1, z2 = lax.stop_gradient(z1), lax.stop_gradient(z2)
    num_counted, num_holding, log_ratio_sum = _assumption1_sums(
        z1, z2, labels, beta, temperature, axis_name
    )
    denominator = jnp.maximum(num_counted, 1.0)
    return {
        "assumption_fraction": (num_holding / denominator).astype(jnp.float32),
        "assumption_log_ratio": (log_ratio_sum / denominator).astype(jnp.float32),
        "assumption_num_anchors": num_counted.astype(jnp.float32),
    }


_assumption1_jit = jax.jit(_assumption1, static_argnums=(5,))


def assumption1(z1, z2, labels, *, beta, temperature=0.5, axis_name=None) -> dict[str, jax.Array]:
    """Batch estimate of Assumption 1 (m_same >= m_diff per anchor), global under pmap.

    For anchor i, ``m_same`` / ``m_diff`` are the beta-tilted means of exp(s_ij) over the
    same-class / other-class views among H-UCL's negatives of i (every view but i and its
    partner). Anchors with both sets non-empty are counted.

    Returns float32 scalars: ``assumption_fraction`` (fraction of counted anchors with
    m_same >= m_diff; 0 when none is counted), ``assumption_log_ratio`` (mean over counted anchors
    of log(m_same / m_diff)) and ``assumption_num_anchors`` (anchors counted).
    """
    _check_batch(z1, z2, labels)
    beta = _check_hyper("beta", beta, positive=False)
    temperature = _check_hyper("temperature", temperature, positive=True)
    if axis_name is None:
        return _assumption1_jit(z1, z2, labels, beta, temperature, None)
    return _assumption1(z1, z2, labels, beta, temperature, axis_name)


# ----------------------------------------------------------------------------- combined


def _theory_metrics(z1, z2, labels, beta, temperature, axis_name):
    z1, z2 = lax.stop_gradient(z1), lax.stop_gradient(z2)
    metrics = four_losses(z1, z2, labels, beta=beta, temperature=temperature, axis_name=axis_name)
    metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    metrics.update(_assumption1(z1, z2, labels, beta, temperature, axis_name))
    metrics["hscl_le_hucl"] = (metrics["hscl"] <= metrics["hucl"]).astype(jnp.float32)
    metrics["scl_le_ucl"] = (metrics["scl"] <= metrics["ucl"]).astype(jnp.float32)
    metrics["ucl_lt_hscl"] = (metrics["ucl"] < metrics["hscl"]).astype(jnp.float32)
    return metrics


_theory_metrics_jit = jax.jit(_theory_metrics, static_argnums=(5,))


def theory_metrics(
    z1, z2, labels, *, beta, temperature=0.5, axis_name=None
) -> dict[str, jax.Array]:
    """The train-time theory monitor: :func:`four_losses`, :func:`assumption1` and the flags.

    Returns float32 scalars keyed by THEORY_KEYS: the four losses, the three Assumption 1
    figures, and ``hscl_le_hucl``, ``scl_le_ucl``, ``ucl_lt_hscl`` (1.0 where the inequality held
    on this batch, else 0.0). No gradient flows through it. ``beta`` and ``temperature`` are traced,
    so changing them does not recompile. With ``axis_name`` (inside pmap) all figures are global.
    """
    _check_batch(z1, z2, labels)
    beta = _check_hyper("beta", beta, positive=False)
    temperature = _check_hyper("temperature", temperature, positive=True)
    if axis_name is None:
        return _theory_metrics_jit(z1, z2, labels, beta, temperature, None)
    return _theory_metrics(z1, z2, labels, beta, temperature, axis_name)


@jax.jit
def _sweep(z1, z2, labels, betas, temperature):
    return jax.vmap(lambda beta: _theory_metrics(z1, z2, labels, beta, temperature, None))(betas)


def beta_sweep(z1, z2, labels, betas: Iterable[float], *, temperature=0.5) -> dict[str, np.ndarray]:
    """H-SCL vs UCL (and H-UCL, SCL, Assumption 1) across ``betas`` on fixed embeddings.

    Returns numpy arrays of len(betas) keyed by SWEEP_KEYS: ``beta``, the four losses (SCL and
    UCL do not depend on beta), ``ucl_lt_hscl`` (1.0 where the lower-bound scenario UCL < H-SCL
    holds) and ``assumption_fraction`` at that beta. One compilation serves any betas of the
    same length.
    """
    _check_batch(z1, z2, labels)
    temperature = _check_hyper("temperature", temperature, positive=True)
    betas = [_check_hyper("beta", beta, positive=False) for beta in betas]
    if not betas:
        raise ValueError("betas must hold at least one value >= 0, got none")
    swept = _sweep(z1, z2, labels, jnp.asarray(betas, jnp.float32), temperature)
    result = {"beta": np.asarray(betas, np.float64)}
    result.update({k: np.asarray(swept[k]) for k in SWEEP_KEYS if k != "beta"})
    return result


# ----------------------------------------------------------------------------- runs on disk
# A run directory is read with the trainer's own functions (hscl_jax.trainer.load_config,
# checkpoint_steps, restore_variables), imported inside the functions that need them: the trainer
# imports this module for its train-time monitor.


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl`` (empty if there is no such file)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Writes ``rows`` with ``columns`` (missing or None values left empty); returns ``path``."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return path


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        # 9 significant digits round-trip float32, the precision the metrics are computed in.
        return f"{float(value):.9g}"
    return str(value)


def _steps_per_epoch(config, batch_size: int) -> int | None:
    from hscl_jax import data

    try:
        return data.steps_per_epoch(config.data, batch_size)
    except (ValueError, FileNotFoundError):
        return None


def theory_rows_from_metrics(
    records: Iterable[dict[str, Any]], *, beta, temperature, steps_per_epoch=None
) -> list[dict[str, Any]]:
    """Rows of theory_train.csv from metrics.jsonl records holding every THEORY_KEYS metric.

    Train-time values are means over a logging interval, so the 0/1 flags become the fraction of
    steps for which the inequality held. The trainer's per-epoch records (key ``epoch``) repeat
    those steps as epoch means and are skipped.
    """
    rows = []
    for record in records:
        if "epoch" in record or not all(k in record for k in THEORY_KEYS):
            continue
        step = int(record["step"])
        rows.append(
            {
                "step": step,
                "epoch": None if not steps_per_epoch else step / steps_per_epoch,
                **{k: float(record[k]) for k in THEORY_KEYS},
                "beta": beta,
                "temperature": temperature,
                "num_batches": None,
            }
        )
    return rows


def _aggregate(per_batch: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Theory metrics of several batches: mean losses, anchor-weighted Assumption 1 figures,
    and the fraction of batches for which each inequality held."""
    row = {k: float(np.mean([m[k] for m in per_batch])) for k in LOSS_KEYS + FLAG_KEYS}
    counts = np.array([float(m["assumption_num_anchors"]) for m in per_batch])
    total = counts.sum()
    for key in ("assumption_fraction", "assumption_log_ratio"):
        values = np.array([float(m[key]) for m in per_batch])
        row[key] = float((values * counts).sum() / total) if total > 0 else 0.0
    row["assumption_num_anchors"] = float(total)
    return row


def _make_embed(model, batch_norm: str):
    """jitted (variables, view1, view2) -> (z1, z2), both views in one forward pass as in
    training; ``batch_norm="train"`` normalises with the batch's statistics (as the training
    loss saw them; single device = the global BN of the run), "eval" with running averages."""
    train = batch_norm == "train"

    def embed(variables, view1, view2):
        images = jnp.concatenate([view1, view2])
        if train:
            (_, projection), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        else:
            _, projection = model.apply(variables, images, train=False)
        return projection[: view1.shape[0]], projection[view1.shape[0] :]

    return jax.jit(embed)


def _training_batches(config, *, batch_size: int, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The run's first ``num_batches`` training batches (same augmentations as its steps 1..n)."""
    from hscl_jax import data

    stream = data.train_iterator(
        config.data,
        global_batch_size=batch_size,
        seed=config.data.seed,
        start_step=0,
        num_local_devices=1,
    )
    batches = []
    for _ in range(num_batches):
        batch = next(stream)
        batches.append({k: np.asarray(v)[0] for k, v in batch.items()})
    close = getattr(stream, "close", None)
    if close is not None:
        close()
    return batches


def _test_embeddings(config, model, variables, *, max_examples: int, batch_size: int):
    """Encoder features and labels of the first ``max_examples`` test examples."""
    from hscl_jax import data

    info = data.dataset_info(config.data.name)
    features_of = jax.jit(lambda v, images: model.apply(v, images, train=False)[0])
    stream = data.eval_iterator(
        config.data, split=info.test_split, batch_size=batch_size, num_local_devices=1
    )
    features, labels, collected = [], [], 0
    for batch in stream:
        mask = np.asarray(batch["mask"])[0]
        features.append(np.asarray(features_of(variables, batch["image"][0]))[mask])
        labels.append(np.asarray(batch["label"])[0][mask])
        collected += int(mask.sum())
        if collected >= max_examples:
            break
    close = getattr(stream, "close", None)
    if close is not None:
        close()
    return np.concatenate(features)[:max_examples], np.concatenate(labels)[:max_examples]


def analyze_checkpoints(
    workdir: str,
    *,
    beta: float | None = None,
    temperature: float | None = None,
    num_batches: int = 4,
    batch_size: int | None = None,
    steps: Sequence[int] | None = None,
    betas: Sequence[float] = DEFAULT_BETAS,
    batch_norm: str = "train",
    max_embeddings: int = 2048,
) -> dict[str, str]:
    """Recomputes the theory metrics for the checkpoints of the run in ``workdir``.

    Every checkpoint sees the same ``num_batches`` training batches (the run's first ones, at
    ``batch_size``, default the run's global batch size, so Q matches training). Writes
    theory.csv, and for the latest analysed checkpoint beta_sweep.csv (``betas``; empty to skip)
    and embeddings.npz (encoder features of up to ``max_embeddings`` test examples; 0 to skip).
    ``beta``/``temperature`` default to the run's train-time monitor settings
    (hscl_jax.trainer.theory_settings: config.theory, else following config.loss).
    Returns {name: path}.
    """
    if batch_norm not in ("train", "eval"):
        raise ValueError(f"batch_norm must be 'train' or 'eval', got {batch_norm!r}")
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    from hscl_jax import models, trainer

    config = trainer.load_config(workdir)
    settings = trainer.theory_settings(config)
    beta = _check_hyper("beta", settings["beta"] if beta is None else beta, positive=False)
    temperature = _check_hyper(
        "temperature",
        settings["temperature"] if temperature is None else temperature,
        positive=True,
    )
    batch_size = config.global_batch_size if batch_size is None else batch_size
    available = trainer.checkpoint_steps(workdir)
    if not available:
        raise ValueError(f"no checkpoints in {workdir}/checkpoints")
    if steps is None:
        steps = available
    missing = sorted(set(steps) - set(available))
    if missing:
        raise ValueError(
            f"checkpoint steps {missing} not in {workdir}/checkpoints; have {available}"
        )
    steps = sorted(steps)

    model = models.model_from_config(config.model)
    embed = _make_embed(model, batch_norm)
    batches = _training_batches(config, batch_size=batch_size, num_batches=num_batches)
    per_epoch = _steps_per_epoch(config, batch_size)

    rows, written = [], {}
    for step in steps:
        variables = trainer.restore_variables(workdir, step)
        embedded = [
            (*embed(variables, batch["view1"], batch["view2"]), batch["label"]) for batch in batches
        ]
        per_batch = [
            jax.device_get(theory_metrics(z1, z2, y, beta=beta, temperature=temperature))
            for z1, z2, y in embedded
        ]
        rows.append(
            {
                "step": step,
                "epoch": None if not per_epoch else step / per_epoch,
                **_aggregate(per_batch),
                "beta": beta,
                "temperature": temperature,
                "num_batches": num_batches,
            }
        )
    written["theory"] = write_csv(os.path.join(workdir, THEORY_CSV), rows, THEORY_COLUMNS)

    if list(betas):
        sweeps = [beta_sweep(z1, z2, y, betas, temperature=temperature) for z1, z2, y in embedded]
        sweep_rows = []
        for i, swept_beta in enumerate(sweeps[0]["beta"]):
            row = {"beta": float(swept_beta)}
            row.update({k: float(np.mean([s[k][i] for s in sweeps])) for k in SWEEP_KEYS[1:]})
            row.update(step=steps[-1], temperature=temperature, num_batches=num_batches)
            sweep_rows.append(row)
        columns = (*SWEEP_KEYS, "step", "temperature", "num_batches")
        written["beta_sweep"] = write_csv(
            os.path.join(workdir, BETA_SWEEP_CSV), sweep_rows, columns
        )

    if max_embeddings > 0:
        eval_batch = min(int(config.knn.get("eval_batch_size", 512)), max_embeddings)
        features, labels = _test_embeddings(
            config, model, variables, max_examples=max_embeddings, batch_size=eval_batch
        )
        path = os.path.join(workdir, EMBEDDINGS_NPZ)
        np.savez(path, features=features, labels=labels, step=steps[-1])
        written["embeddings"] = path
    return written


def analyze_metrics(workdir: str, *, beta=None, temperature=None) -> dict[str, str]:
    """theory_train.csv from train-time theory metrics in metrics.jsonl ({} when there are none)."""
    from hscl_jax import trainer

    config = None
    if os.path.exists(os.path.join(workdir, "config.json")):
        config = trainer.load_config(workdir)
    if config is not None:
        settings = trainer.theory_settings(config)
        beta = settings["beta"] if beta is None else beta
        temperature = settings["temperature"] if temperature is None else temperature
    per_epoch = None if config is None else _steps_per_epoch(config, config.global_batch_size)
    rows = theory_rows_from_metrics(
        read_metrics(workdir), beta=beta, temperature=temperature, steps_per_epoch=per_epoch
    )
    if not rows:
        return {}
    path = write_csv(os.path.join(workdir, THEORY_TRAIN_CSV), rows, THEORY_COLUMNS)
    return {"theory_train": path}


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hscl_jax.analysis",
        description="Four-loss comparison and Assumption 1 check over a run's checkpoints.",
    )
    parser.add_argument("--workdir", required=True, help="the run directory (train.py --workdir)")
    parser.add_argument(
        "--source",
        choices=("auto", "checkpoints", "metrics"),
        default="auto",
        help="checkpoints: recompute (theory.csv); metrics: train-time metrics.jsonl "
        "(theory_train.csv); auto: whichever exist",
    )
    parser.add_argument("--num_batches", type=int, default=4, help="training batches per point")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the run's")
    parser.add_argument("--beta", type=float, default=None, help="default: config.loss.beta")
    parser.add_argument("--temperature", type=float, default=None, help="default: the run's")
    parser.add_argument("--steps", type=_int_list, default=None, help="checkpoint steps (all)")
    parser.add_argument(
        "--betas",
        type=_float_list,
        default=list(DEFAULT_BETAS),
        help="beta sweep on the latest checkpoint, comma-separated ('' to skip)",
    )
    parser.add_argument("--batch_norm", choices=("train", "eval"), default="train")
    parser.add_argument(
        "--max_embeddings", type=int, default=2048, help="test features to save (0: none)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    workdir = args.workdir
    from hscl_jax import plot, trainer

    try:
        written = {}
        has_checkpoints = bool(trainer.checkpoint_steps(workdir))
        if args.source == "checkpoints" or (args.source == "auto" and has_checkpoints):
            written.update(
                analyze_checkpoints(
                    workdir,
                    beta=args.beta,
                    temperature=args.temperature,
                    num_batches=args.num_batches,
                    batch_size=args.batch_size,
                    steps=args.steps,
                    betas=args.betas,
                    batch_norm=args.batch_norm,
                    max_embeddings=args.max_embeddings,
                )
            )
        if args.source in ("metrics", "auto"):
            written.update(analyze_metrics(workdir, beta=args.beta, temperature=args.temperature))
        if not written:
            raise ValueError(
                f"nothing to analyse in {workdir}: no checkpoints and no theory metrics "
                "in metrics.jsonl"
            )
        pictures = plot.plot_workdir(workdir)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in [*written.values(), *pictures]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
