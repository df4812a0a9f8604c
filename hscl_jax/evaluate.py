"""Evaluation of learned representations.

Weighted kNN monitor (the reference's per-epoch evaluation): every test example's class scores are
the sum, over its k nearest training examples by cosine similarity of L2-normalised encoder
features, of exp(similarity / temperature) credited to the neighbour's class.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _check_knn_inputs(train_features, train_labels, test_features, num_classes, k, temperature):
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
def _knn_scores_chunk(bank, bank_labels, queries, *, num_classes, k, temperature):
    similarity = queries @ bank.T
    top_similarity, top_index = jax.lax.top_k(similarity, k)
    weights = jnp.exp(top_similarity / temperature)
    neighbour_labels = bank_labels[top_index]
    rows = jnp.broadcast_to(jnp.arange(queries.shape[0])[:, None], neighbour_labels.shape)
    scores = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
    return scores.at[rows, neighbour_labels].add(weights)


def _normalize(x):
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(
    train_features,
    train_labels,
    test_features,
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
    bank = _normalize(train_features)
    bank_labels = jnp.asarray(train_labels, jnp.int32)
    scores = []
    for start in range(0, num_test, chunk):
        queries = test_features[start : start + chunk]
        valid = queries.shape[0]
        if valid < chunk:
            queries = np.pad(queries, ((0, chunk - valid), (0, 0)))
        chunk_scores = _knn_scores_chunk(
            bank,
            bank_labels,
            _normalize(queries),
            num_classes=num_classes,
            k=k,
            temperature=float(temperature),
        )
        scores.append(np.asarray(chunk_scores)[:valid])
    if not scores:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(scores, axis=0)


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
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
