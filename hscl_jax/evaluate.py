"""Evaluation of learned representations: weighted kNN, linear probe, ridge probe (on feature
arrays only), the trainer's kNN monitor, and a finished run's evaluation.

    python -m hscl_jax.evaluate --workdir=DIR     # writes DIR/eval.json

Weighted kNN monitor (the reference's per-epoch evaluation): every test example's class scores are
the sum, over its k nearest training examples by cosine similarity of L2-normalised encoder
features, of exp(similarity / temperature) credited to the neighbour's class.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from hscl_jax import checkpoints, data, distributed, features, metrics, models
from hscl_jax import config as config_lib

if TYPE_CHECKING:
    import ml_collections


def _check_knn_inputs(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    num_classes: int,
    k: int,
    temperature: float,
) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (n, d); got train {train_features.shape}, "
            f"test {test_features.shape}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test feature dims differ: {train_features.shape[1]} vs "
            f"{test_features.shape[1]}"
        )
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(
            f"train_labels shape {train_labels.shape} does not match {train_features.shape[0]} "
            "training features"
        )
    if train_features.shape[0] == 0:
        raise ValueError("the kNN feature bank is empty")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def _knn_scores_chunk(
    bank: jax.Array,
    bank_labels: jax.Array,
    queries: jax.Array,
    *,
    num_classes: int,
    k: int,
    temperature: float,
) -> jax.Array:
    similarity = queries @ bank.T
    top_similarity, top_index = jax.lax.top_k(similarity, k)
    weights = jnp.exp(top_similarity / temperature)
    neighbour_labels = bank_labels[top_index]
    rows = jnp.broadcast_to(jnp.arange(queries.shape[0])[:, None], neighbour_labels.shape)
    scores = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
    return scores.at[rows, neighbour_labels].add(weights)


def knn_predict(
    train_features: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    test_features: npt.ArrayLike,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.5,
    test_chunk_size: int = 1024,
) -> np.ndarray:
    """Weighted-kNN class scores, shape (num_test, num_classes), float32 numpy.

    Features are L2-normalised here (a no-op for already normalised ones), so similarities are
    cosines. ``k`` larger than the bank uses the whole bank. The test side is processed in chunks
    of ``test_chunk_size`` rows (the last chunk padded, so one compilation serves all chunks),
    bounding memory at chunk x bank similarities.
    """
    train_features = np.asarray(train_features)
    test_features = np.asarray(test_features)
    train_labels = np.asarray(train_labels)
    _check_knn_inputs(train_features, train_labels, test_features, num_classes, k, temperature)
    if not isinstance(test_chunk_size, int) or test_chunk_size < 1:
        raise ValueError(f"test_chunk_size={test_chunk_size!r} must be a positive integer")
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}); got range "
            f"[{train_labels.min()}, {train_labels.max()}]"
        )
    num_test = test_features.shape[0]
    k = min(k, train_features.shape[0])
    chunk = min(test_chunk_size, max(num_test, 1))
    bank = models.l2_normalize(train_features)
    bank_labels = jnp.asarray(train_labels, jnp.int32)
    scores: list[np.ndarray] = []
    for start in range(0, num_test, chunk):
        queries = test_features[start : start + chunk]
        valid = queries.shape[0]
        if valid < chunk:
            queries = np.pad(queries, ((0, chunk - valid), (0, 0)))
        chunk_scores = _knn_scores_chunk(
            bank,
            bank_labels,
            models.l2_normalize(queries),
            num_classes=num_classes,
            k=k,
            temperature=float(temperature),
        )
        scores.append(np.asarray(chunk_scores)[:valid])
    if not scores:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(scores, axis=0)


def knn_accuracy(
    train_features: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    test_features: npt.ArrayLike,
    test_labels: npt.ArrayLike,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.5,
    test_chunk_size: int = 1024,
) -> dict[str, float]:
    """{"knn_top1", "knn_top5"}: fractions in [0, 1] of test examples whose label is the best
    (among the five best; all classes when there are fewer than five) weighted-kNN prediction."""
    test_labels = np.asarray(test_labels)
    if test_labels.shape != (np.asarray(test_features).shape[0],):
        raise ValueError(
            f"test_labels shape {test_labels.shape} does not match "
            f"{np.asarray(test_features).shape[0]} test features"
        )
    if test_labels.shape[0] == 0:
        raise ValueError("no test examples to evaluate")
    scores = knn_predict(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        test_chunk_size=test_chunk_size,
    )
    # Stable sort on the negated scores: ties go to the lower class index, as argmax does.
    ranking = np.argsort(-scores, axis=1, kind="stable")
    top1 = ranking[:, 0] == test_labels
    top5 = np.any(ranking[:, : min(5, num_classes)] == test_labels[:, None], axis=1)
    return {"knn_top1": float(np.mean(top1)), "knn_top5": float(np.mean(top5))}


# ----------------------------------------------------------------------------- linear probes


def _check_probe_inputs(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    num_classes: int,
) -> None:
    for name, x in (("train_features", train_features), ("test_features", test_features)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n, d), got shape {x.shape}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train and test feature dims differ: {train_features.shape[1]} vs "
            f"{test_features.shape[1]}"
        )
    for name, y, x in (
        ("train_labels", train_labels, train_features),
        ("test_labels", test_labels, test_features),
    ):
        if y.shape != (x.shape[0],):
            raise ValueError(f"{name} shape {y.shape} does not match {x.shape[0]} features")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("linear probe needs at least one train and one test example")
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}); got range "
            f"[{train_labels.min()}, {train_labels.max()}]"
        )


def linear_probe(
    train_features: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    test_features: npt.ArrayLike,
    test_labels: npt.ArrayLike,
    *,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 512,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Softmax regression on frozen features with optax Adam (the reference: 1e-3, 100 epochs,
    batch 512), minibatches reshuffled every epoch. Features are L2-normalised first, as the
    encoder's outputs are. Returns {"linear_top1"} on the test set.

    The encoder cannot change: the probe only ever sees feature arrays.
    """
    import optax

    train_features = np.asarray(train_features, np.float32)
    test_features = np.asarray(test_features, np.float32)
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    _check_probe_inputs(train_features, train_labels, test_features, test_labels, num_classes)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate!r} must be > 0")

    n, dim = train_features.shape
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size  # drop the last partial batch, as the reference loader
    x = models.l2_normalize(train_features)
    y = jnp.asarray(train_labels, jnp.int32)
    tx = optax.adam(learning_rate)
    params = {"w": jnp.zeros((dim, num_classes), jnp.float32), "b": jnp.zeros((num_classes,))}

    Params = dict[str, jax.Array]

    def loss_fn(p: Params, xb: jax.Array, yb: jax.Array) -> jax.Array:
        logits = xb @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def train(params: Params, key: jax.Array) -> Params:
        # carry: the parameters and optax's state of the optimiser.
        def epoch(
            carry: tuple[Params, Any], epoch_key: jax.Array
        ) -> tuple[tuple[Params, Any], None]:
            params, opt_state = carry
            order = jax.random.permutation(epoch_key, n)[: steps_per_epoch * batch_size]
            batches = order.reshape(steps_per_epoch, batch_size)

            def step(carry: tuple[Params, Any], idx: jax.Array) -> tuple[tuple[Params, Any], None]:
                params, opt_state = carry
                grads = jax.grad(loss_fn)(params, x[idx], y[idx])
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            return jax.lax.scan(step, (params, opt_state), batches)[0], None

        keys = jax.random.split(key, epochs)
        return jax.lax.scan(epoch, (params, tx.init(params)), keys)[0][0]

    params = train(params, jax.random.key(seed))
    logits = models.l2_normalize(test_features) @ params["w"] + params["b"]
    top1 = np.asarray(jnp.argmax(logits, axis=1)) == test_labels
    return {"linear_top1": float(np.mean(top1))}


def ridge_probe(
    train_features: npt.ArrayLike,
    train_labels: npt.ArrayLike,
    test_features: npt.ArrayLike,
    test_labels: npt.ArrayLike,
    *,
    num_classes: int,
    l2: float = 1e-3,
) -> dict[str, float]:
    """Closed-form ridge regression onto one-hot labels (with a bias), argmax on the test set.

    A fast, deterministic stand-in for the linear probe. Returns {"ridge_top1"}.
    """
    train_features = np.asarray(train_features, np.float64)
    test_features = np.asarray(test_features, np.float64)
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    _check_probe_inputs(train_features, train_labels, test_features, test_labels, num_classes)
    if not l2 > 0:
        raise ValueError(f"l2={l2!r} must be > 0")

    def design(f: np.ndarray) -> np.ndarray:
        f = np.asarray(models.l2_normalize(f), np.float64)
        return np.concatenate([f, np.ones((f.shape[0], 1))], axis=1)

    a = design(train_features)
    targets = np.eye(num_classes)[train_labels]
    gram = a.T @ a + l2 * a.shape[0] * np.eye(a.shape[1])
    weights = np.linalg.solve(gram, a.T @ targets)
    predictions = np.argmax(design(test_features) @ weights, axis=1)
    return {"ridge_top1": float(np.mean(predictions == test_labels))}


# ----------------------------------------------------------------------------- a finished run


def _train_and_test_features(
    config: ml_collections.ConfigDict,
    feature_fn: features.FeatureFn,
    replicated_variables: Any,
    num_local_devices: int,
) -> tuple[np.ndarray, ...]:
    """(train features, train labels, test features, test labels) of config.data's dataset."""
    info = data.dataset_info(config.data.name, config.data.data_dir)
    return tuple(
        array
        for split in (info.train_split, info.test_split)
        for array in features.split_features(
            feature_fn,
            replicated_variables,
            config.data,
            split,
            batch_size=config.knn.eval_batch_size,
            num_local_devices=num_local_devices,
        )
    )


def _knn_with_config(
    config: ml_collections.ConfigDict,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
) -> dict[str, float]:
    return knn_accuracy(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes=data.dataset_info(config.data.name, config.data.data_dir).num_classes,
        k=config.knn.k,
        temperature=float(config.knn.temperature),
        test_chunk_size=config.knn.test_chunk_size,
    )


def knn_monitor(
    config: ml_collections.ConfigDict,
    feature_fn: features.FeatureFn,
    replicated_variables: Any,
    devices: Sequence[jax.Device],
) -> dict[str, float]:
    """Weighted-kNN top-1/top-5 of the current encoder: train split as bank, test split queried
    (``config.knn`` settings).

    ``feature_fn`` comes from features.make_feature_fn over ``devices``; ``replicated_variables``
    are the model variables replicated over them. Features of all processes are gathered.
    """
    arrays = _train_and_test_features(config, feature_fn, replicated_variables, len(devices))
    return _knn_with_config(config, *arrays)


def evaluate_workdir(
    workdir: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    step: int | None = None,
    linear_epochs: int = 100,
    linear_batch_size: int = 512,
    linear_learning_rate: float = 1e-3,
    ridge_l2: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Restores a run's checkpoint (the latest when ``step`` is None) and evaluates its encoder.

    Encoder features (the layer before the projection head, L2-normalised, BatchNorm in inference
    mode) of the train and test splits feed weighted kNN (the run's ``config.knn`` settings), the
    optax linear probe and the ridge probe. Writes ``workdir/eval.json`` and returns the same:
    ``knn_top1``, ``knn_top5``, ``linear_top1``, ``ridge_top1``, ``step`` and ``settings``.
    """
    config = config_lib.load_config(workdir) if config is None else config
    step, variables = checkpoints.restore_variables_and_step(workdir, step)
    model = models.model_from_config(config.model)
    devices = jax.local_devices()[:1]
    feature_fn = features.make_feature_fn(model, devices)
    replicated = distributed.replicate(variables, devices)
    info = data.dataset_info(config.data.name, config.data.data_dir)
    train_x, train_y, test_x, test_y = _train_and_test_features(config, feature_fn, replicated, 1)
    common = dict(num_classes=info.num_classes)
    results: dict[str, Any] = {
        **_knn_with_config(config, train_x, train_y, test_x, test_y),
        **linear_probe(
            train_x,
            train_y,
            test_x,
            test_y,
            epochs=linear_epochs,
            batch_size=linear_batch_size,
            learning_rate=linear_learning_rate,
            seed=seed,
            **common,
        ),
        **ridge_probe(train_x, train_y, test_x, test_y, l2=ridge_l2, **common),
    }
    results["step"] = int(step)
    results["settings"] = {
        "dataset": config.data.name,
        "num_train": int(train_x.shape[0]),
        "num_test": int(test_x.shape[0]),
        "feature_dim": int(train_x.shape[1]),
        "knn_k": int(config.knn.k),
        "knn_temperature": float(config.knn.temperature),
        "linear_epochs": linear_epochs,
        "linear_batch_size": linear_batch_size,
        "linear_learning_rate": linear_learning_rate,
        "linear_optimizer": "adam",
        "ridge_l2": ridge_l2,
    }
    metrics.write_json_atomic(os.path.join(workdir, metrics.EVAL_JSON), results)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hscl_jax.evaluate",
        description="Evaluate a training run's encoder: weighted kNN, linear and ridge probes.",
    )
    parser.add_argument("--workdir", required=True, help="the run directory (train.py --workdir)")
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step to evaluate (default: the latest)"
    )
    parser.add_argument(
        "--linear_epochs", type=int, default=100, help="epochs of the linear probe (Adam)"
    )
    parser.add_argument(
        "--linear_batch_size", type=int, default=512, help="minibatch size of the linear probe"
    )
    parser.add_argument(
        "--linear_learning_rate", type=float, default=1e-3, help="Adam's learning rate"
    )
    parser.add_argument(
        "--ridge_l2", type=float, default=1e-3, help="L2 penalty of the closed-form ridge probe"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        results = evaluate_workdir(
            args.workdir,
            step=args.step,
            linear_epochs=args.linear_epochs,
            linear_batch_size=args.linear_batch_size,
            linear_learning_rate=args.linear_learning_rate,
            ridge_l2=args.ridge_l2,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in results.items() if k != "settings"}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
