"""Tests for the weighted-kNN monitor in hscl_jax.evaluate."""

import numpy as np
import pytest

from hscl_jax import evaluate


def _unit(angle_degrees):
    angle = np.deg2rad(angle_degrees)
    return np.array([np.cos(angle), np.sin(angle)], np.float32)


def _toy_bank():
    # Class c sits around angle 120 * c degrees; neighbours are known by construction.
    angles = [0, 10, -10, 120, 130, 110, 240, 250]
    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    return np.stack([_unit(a) for a in angles]), np.array(labels, np.int32)


def test_knn_scores_match_hand_computation():
    bank, labels = _toy_bank()
    query = _unit(60)[None]  # equidistant from 0..10 (class 0) and 110..120 (class 1)
    scores = evaluate.knn_predict(bank, labels, query, num_classes=3, k=2, temperature=0.5)
    # Two nearest: angle 10 (class 0) and angle 110 (class 1), both at cos(50 deg).
    expected = np.exp(np.cos(np.deg2rad(50)) / 0.5)
    np.testing.assert_allclose(scores, [[expected, expected, 0.0]], rtol=1e-5)

    scores = evaluate.knn_predict(bank, labels, _unit(5)[None] * 3.0, num_classes=3, k=3)
    # Unnormalised query is normalised: nearest three are 0, 10 (class 0) and -10 (class 0).
    cosines = np.cos(np.deg2rad([5, 5, 15]))
    np.testing.assert_allclose(scores[0, 0], np.exp(cosines / 0.5).sum(), rtol=1e-5)
    np.testing.assert_allclose(scores[0, 1:], 0.0)


def test_knn_accuracy_known_answer_and_chunking():
    bank, labels = _toy_bank()
    queries = np.stack([_unit(3), _unit(118), _unit(245), _unit(125)])
    test_labels = np.array([0, 1, 2, 0], np.int32)  # the last one is wrong on purpose
    for chunk in (1, 3, 64):
        result = evaluate.knn_accuracy(
            bank, labels, queries, test_labels, num_classes=3, k=3, test_chunk_size=chunk
        )
        assert result == {"knn_top1": 0.75, "knn_top5": 1.0}


def test_knn_weights_prefer_closer_neighbours():
    # One very close class-1 neighbour outweighs two far class-0 neighbours at low temperature.
    bank = np.stack([_unit(0), _unit(80), _unit(-80)])
    labels = np.array([1, 0, 0], np.int32)
    query = _unit(0)[None]
    low_t = evaluate.knn_predict(bank, labels, query, num_classes=2, k=3, temperature=0.1)
    high_t = evaluate.knn_predict(bank, labels, query, num_classes=2, k=3, temperature=100.0)
    assert np.argmax(low_t[0]) == 1
    assert np.argmax(high_t[0]) == 0


def test_k_larger_than_bank_uses_whole_bank():
    bank, labels = _toy_bank()
    scores = evaluate.knn_predict(bank, labels, _unit(0)[None], num_classes=3, k=200)
    assert np.all(scores > 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k=0"),
        ({"temperature": 0.0}, "temperature"),
        ({"num_classes": 2}, "train_labels must lie"),
        ({"test_chunk_size": 0}, "test_chunk_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    bank, labels = _toy_bank()
    call = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        evaluate.knn_predict(bank, labels, bank, **call)
