"""The paper's theory checked on a training run directory: theory.csv over its checkpoints,
theory_train.csv from the train-time monitor's records, beta_sweep.csv on its latest checkpoint,
its test-set embeddings, and the plots (hscl_jax.plot). The math itself lives in
:mod:`hscl_jax.theory`.

Command line: ``python -m hscl_jax.analysis --workdir=DIR`` recomputes the theory metrics on
training batches for every checkpoint of a run (DIR/theory.csv), turns train-time theory metrics
found in DIR/metrics.jsonl into DIR/theory_train.csv, sweeps beta on the latest checkpoint
(DIR/beta_sweep.csv), saves test-set encoder features (DIR/embeddings.npz) and draws the PNGs
(hscl_jax.plot).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from hscl_jax import checkpoints, data, distributed, features, losses, metrics, models, plot, theory
from hscl_jax import config as config_lib
from hscl_jax.theory import ASSUMPTION_KEYS, FLAG_KEYS, LOSS_KEYS, SWEEP_KEYS, THEORY_KEYS

if TYPE_CHECKING:
    import ml_collections

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


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Writes ``rows`` with ``columns`` (missing or None values left empty); returns ``path``."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return path


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        # 9 significant digits round-trip float32, the precision the metrics are computed in.
        return f"{float(value):.9g}"
    return str(value)


def _steps_per_epoch(config: ml_collections.ConfigDict, batch_size: int) -> int | None:
    try:
        return data.steps_per_epoch(config.data, batch_size)
    except (ValueError, FileNotFoundError):
        return None


def theory_rows_from_metrics(
    records: Iterable[dict[str, Any]],
    *,
    beta: float | None,
    temperature: float | None,
    steps_per_epoch: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of theory_train.csv from metrics.jsonl records holding every THEORY_KEYS metric.

    Train-time values are means over a logging interval, so the 0/1 flags become the fraction of
    steps for which the inequality held. The trainer's per-epoch records (key ``epoch``) repeat
    those steps as epoch means and are skipped.
    """
    rows: list[dict[str, Any]] = []
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


def _make_embed(
    model: models.ContrastiveModel, batch_norm: str
) -> Callable[[Any, ArrayLike, ArrayLike], tuple[jax.Array, jax.Array]]:
    """jitted (variables, view1, view2) -> (z1, z2), both views in one forward pass as in
    training; ``batch_norm="train"`` normalises with the batch's statistics (as the training
    loss saw them; single device = the global BN of the run), "eval" with running averages."""
    train = batch_norm == "train"

    def embed(variables: Any, view1: jax.Array, view2: jax.Array) -> tuple[jax.Array, jax.Array]:
        images = jnp.concatenate([view1, view2])
        if train:
            (_, projection), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        else:
            _, projection = model.apply(variables, images, train=False)
        return projection[: view1.shape[0]], projection[view1.shape[0] :]

    return jax.jit(embed)


def _training_batches(
    config: ml_collections.ConfigDict, *, batch_size: int, num_batches: int
) -> list[dict[str, np.ndarray]]:
    """The run's first ``num_batches`` training batches (same augmentations as its steps 1..n)."""
    stream = data.train_iterator(
        config.data,
        global_batch_size=batch_size,
        seed=config.data.seed,
        start_step=0,
        num_local_devices=1,
    )
    augmentation = data.augmentation_for(config.data)
    batches: list[dict[str, np.ndarray]] = []
    for _ in range(num_batches):
        batch = next(stream)
        view1, view2 = data.augment_views(batch, augmentation)
        views = {"view1": np.asarray(view1[0]), "view2": np.asarray(view2[0])}
        batches.append({**views, "label": batch["label"][0]})
    close = getattr(stream, "close", None)
    if close is not None:
        close()
    return batches


def _test_embeddings(
    config: ml_collections.ConfigDict,
    model: models.ContrastiveModel,
    variables: dict[str, Any],
    *,
    max_examples: int,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Encoder features and labels of the first ``max_examples`` test examples."""
    devices = jax.local_devices()[:1]
    return features.split_features(
        features.make_feature_fn(model, devices),
        distributed.replicate(variables, devices),
        config.data,
        data.dataset_info(config.data.name, config.data.data_dir).test_split,
        batch_size=batch_size,
        num_local_devices=1,
        max_examples=max_examples,
    )


def _steps_to_analyse(workdir: str, steps: Sequence[int] | None) -> list[int]:
    """``steps`` (default: every checkpoint's), sorted; ValueError naming those not on disk."""
    available = checkpoints.checkpoint_steps(workdir)
    if not available:
        raise ValueError(f"no checkpoints in {workdir}/checkpoints")
    missing = sorted(set(steps or ()) - set(available))
    if missing:
        raise ValueError(
            f"checkpoint steps {missing} not in {workdir}/checkpoints; have {available}"
        )
    return sorted(available if steps is None else steps)


def analyze_checkpoints(
    workdir: str,
    *,
    beta: float | None = None,
    temperature: float | None = None,
    num_batches: int = 4,
    batch_size: int | None = None,
    steps: Sequence[int] | None = None,
    betas: Sequence[float] = theory.DEFAULT_BETAS,
    batch_norm: str = "train",
    max_embeddings: int = 2048,
) -> dict[str, str]:
    """Recomputes the theory metrics for the checkpoints of the run in ``workdir``.

    Every checkpoint sees the same ``num_batches`` training batches (the run's first ones, at
    ``batch_size``, default the run's global batch size, so Q matches training). Writes
    theory.csv, and for the latest analysed checkpoint beta_sweep.csv (``betas``; empty to skip)
    and embeddings.npz (encoder features of up to ``max_embeddings`` test examples; 0 to skip).
    ``beta``/``temperature`` default to the run's train-time monitor settings
    (config.theory_hyperparameters: config.theory, else following config.loss).
    Returns {name: path}.
    """
    if batch_norm not in ("train", "eval"):
        raise ValueError(f"batch_norm must be 'train' or 'eval', got {batch_norm!r}")
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    config = config_lib.load_config(workdir)
    settings = config_lib.theory_hyperparameters(config)
    beta = losses.check_beta(settings["beta"] if beta is None else beta)
    temperature = losses.check_temperature(
        settings["temperature"] if temperature is None else temperature
    )
    batch_size = config.global_batch_size if batch_size is None else batch_size
    steps = _steps_to_analyse(workdir, steps)
    model = models.model_from_config(config.model)
    embed = _make_embed(model, batch_norm)
    batches = _training_batches(config, batch_size=batch_size, num_batches=num_batches)
    per_epoch = _steps_per_epoch(config, batch_size)

    rows: list[dict[str, Any]] = []
    written: dict[str, str] = {}
    for step in steps:
        try:
            variables = checkpoints.restore_variables(workdir, step)
        except (checkpoints.DamagedCheckpointError, checkpoints.MissingCheckpointError) as error:
            # Damaged, or deleted since it was listed (by a training run still going).
            print(f"warning: {error}: skipping it", file=sys.stderr)
            continue
        embedded = [
            (*embed(variables, batch["view1"], batch["view2"]), batch["label"]) for batch in batches
        ]
        per_batch = [
            jax.device_get(theory.theory_metrics(z1, z2, y, beta=beta, temperature=temperature))
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
    written["theory"] = write_csv(os.path.join(workdir, metrics.THEORY_CSV), rows, THEORY_COLUMNS)

    if not rows:
        raise ValueError(
            f"no checkpoint of steps {steps} in {workdir}/checkpoints can be restored (see the "
            "warnings above)"
        )
    last_step = rows[-1]["step"]  # the newest checkpoint that restored: the sweep's and embeddings'
    if list(betas):
        sweep_rows = _beta_sweep_rows(embedded, betas, temperature)
        for row in sweep_rows:
            row.update(step=last_step, temperature=temperature, num_batches=num_batches)
        columns = (*SWEEP_KEYS, "step", "temperature", "num_batches")
        written["beta_sweep"] = write_csv(
            os.path.join(workdir, metrics.BETA_SWEEP_CSV), sweep_rows, columns
        )

    if max_embeddings > 0:
        eval_batch = min(config.knn.eval_batch_size, max_embeddings)
        test_features, test_labels = _test_embeddings(
            config, model, variables, max_examples=max_embeddings, batch_size=eval_batch
        )
        path = os.path.join(workdir, metrics.EMBEDDINGS_NPZ)
        np.savez(path, features=test_features, labels=test_labels, step=last_step)
        written["embeddings"] = path
    return written


def _beta_sweep_rows(
    embedded: Sequence[tuple[jax.Array, jax.Array, np.ndarray]],
    betas: Sequence[float],
    temperature: float,
) -> list[dict[str, Any]]:
    """One row per beta: the SWEEP_KEYS figures of theory.beta_sweep, means over the batches
    ``embedded`` ((z1, z2, labels) each)."""
    sweeps = [
        theory.beta_sweep(z1, z2, y, betas, temperature=temperature) for z1, z2, y in embedded
    ]
    return [
        {"beta": float(swept_beta)}
        | {k: float(np.mean([s[k][i] for s in sweeps])) for k in SWEEP_KEYS[1:]}
        for i, swept_beta in enumerate(sweeps[0]["beta"])
    ]


def analyze_metrics(
    workdir: str, *, beta: float | None = None, temperature: float | None = None
) -> dict[str, str]:
    """theory_train.csv from train-time theory metrics in metrics.jsonl ({} when there are none)."""
    config = None
    if os.path.exists(os.path.join(workdir, metrics.CONFIG_JSON)):
        config = config_lib.load_config(workdir)
    if config is not None:
        settings = config_lib.theory_hyperparameters(config)
        beta = settings["beta"] if beta is None else beta
        temperature = settings["temperature"] if temperature is None else temperature
    per_epoch = None if config is None else _steps_per_epoch(config, config.global_batch_size)
    rows = theory_rows_from_metrics(
        metrics.read_metrics(workdir), beta=beta, temperature=temperature, steps_per_epoch=per_epoch
    )
    if not rows:
        return {}
    path = write_csv(os.path.join(workdir, metrics.THEORY_TRAIN_CSV), rows, THEORY_COLUMNS)
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
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="images per batch (default: the run's global batch)",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help="beta of the theory metrics (default: the run's monitor beta)",
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="temperature (default: the run's)"
    )
    parser.add_argument("--steps", type=_int_list, default=None, help="checkpoint steps (all)")
    parser.add_argument(
        "--betas",
        type=_float_list,
        default=list(theory.DEFAULT_BETAS),
        help="beta sweep on the latest checkpoint, comma-separated ('' to skip)",
    )
    parser.add_argument(
        "--batch_norm",
        choices=("train", "eval"),
        default="train",
        help="BatchNorm of the embedding pass: train (the batch's statistics, as the loss saw "
        "them) or eval (running averages)",
    )
    parser.add_argument(
        "--max_embeddings", type=int, default=2048, help="test features to save (0: none)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    workdir = args.workdir
    try:
        written = {}
        has_checkpoints = bool(checkpoints.checkpoint_steps(workdir))
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
