"""Tests for hscl_jax.evaluate: weighted kNN, linear and ridge probes, evaluating a run."""

import json

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
    np.testing.assert_allclose(scores, [[expected, expected, 0.0]], rtol=1e-4)

    scores = evaluate.knn_predict(bank, labels, _unit(5)[None] * 3.0, num_classes=3, k=3)
    # Unnormalised query is normalised: nearest three are 0, 10 (class 0) and -10 (class 0).
    cosines = np.cos(np.deg2rad([5, 5, 15]))
    np.testing.assert_allclose(scores[0, 0], np.exp(cosines / 0.5).sum(), rtol=1e-4)
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


# ----------------------------------------------------------------------------- linear probes


def _separable(seed, n_per_class=40, num_classes=4, dim=6):
    """Classes around orthogonal directions: linearly separable by construction."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:num_classes] * 3.0
    labels = np.repeat(np.arange(num_classes), n_per_class).astype(np.int32)
    features = centres[labels] + 0.3 * rng.normal(size=(labels.size, dim)).astype(np.float32)
    return features, labels


@pytest.mark.parametrize("probe", ["linear", "ridge"])
def test_probes_separate_separable_features(probe):
    train_x, train_y = _separable(0)
    test_x, test_y = _separable(1)
    if probe == "linear":
        result = evaluate.linear_probe(
            train_x,
            train_y,
            test_x,
            test_y,
            num_classes=4,
            epochs=100,
            batch_size=32,
            learning_rate=1e-2,
        )
        assert result == {"linear_top1": 1.0}
    else:
        assert evaluate.ridge_probe(train_x, train_y, test_x, test_y, num_classes=4) == {
            "ridge_top1": 1.0
        }


def test_linear_probe_is_chance_on_shuffled_labels():
    """The probe's accuracy comes from the features: with labels shuffled it is near chance."""
    train_x, train_y = _separable(0)
    test_x, test_y = _separable(1)
    shuffled = np.random.default_rng(2).permutation(train_y)
    result = evaluate.linear_probe(
        train_x, shuffled, test_x, test_y, num_classes=4, epochs=50, batch_size=32
    )
    assert result["linear_top1"] < 0.6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": -1}, "batch_size=-1"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"num_classes": 2}, "train_labels must lie"),
    ],
)
def test_linear_probe_bad_arguments(kwargs, match):
    x, y = _separable(0)
    with pytest.raises(ValueError, match=match):
        evaluate.linear_probe(x, y, x, y, **{"num_classes": 4, **kwargs})
    with pytest.raises(ValueError, match="dims differ"):
        evaluate.ridge_probe(x, y, x[:, :3], y, num_classes=4)


# ----------------------------------------------------------------------------- a finished run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_digits_config):
    pytest.importorskip("tensorflow_datasets", reason="the digits run needs the [data] extra")
    from hscl_jax import trainer

    workdir = str(tmp_path_factory.mktemp("run"))
    trainer.train_and_evaluate(tiny_digits_config(num_steps=2), workdir)
    return workdir


def test_evaluate_workdir_writes_eval_json_and_keeps_the_encoder_frozen(finished_run):
    import jax

    from hscl_jax import checkpoints

    before = checkpoints.restore_variables(finished_run)
    results = evaluate.evaluate_workdir(finished_run, linear_epochs=3)
    after = checkpoints.restore_variables(finished_run)
    # Parameters and BatchNorm statistics are those of the checkpoint, before and after.
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert checkpoints.checkpoint_steps(finished_run) == [2]

    with open(f"{finished_run}/eval.json") as f:
        written = json.load(f)
    assert written == results
    for key in ("knn_top1", "knn_top5", "linear_top1", "ridge_top1"):
        assert 0.0 <= results[key] <= 1.0
    assert results["step"] == 2
    assert results["settings"]["num_test"] == 359 and results["settings"]["linear_epochs"] == 3
    # The kNN figure is the trainer's final monitor on the same checkpoint.
    final = [json.loads(line) for line in open(f"{finished_run}/metrics.jsonl")]
    knn = [r for r in final if "knn_top1" in r][-1]
    assert knn["knn_top1"] == pytest.approx(results["knn_top1"])


def test_evaluate_cli(finished_run, capsys):
    assert evaluate.main(["--workdir", finished_run, "--linear_epochs", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"knn_top1", "knn_top5", "linear_top1", "ridge_top1", "step"}
    assert evaluate.main(["--workdir", f"{finished_run}/nothing"]) == 1
    assert "error:" in capsys.readouterr().err
