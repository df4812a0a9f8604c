"""Tests for hscl_jax.theory and hscl_jax.analysis: the four-loss comparison, the Assumption 1
estimate (hand-computed and against a numpy loop), pmap over 8 devices, the bound it implies, the
beta sweep, the CLI over a run directory."""

import csv
import json
import os

import chex
import jax
import numpy as np
import pytest

from hscl_jax import analysis, losses, metrics, theory

TEMPERATURE = 0.5


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_batch(seed, batch=8, dim=3, labels=None):
    rng = np.random.default_rng(seed)
    z1 = _normalize(rng.normal(size=(batch, dim)))
    z2 = _normalize(z1 + 0.5 * rng.normal(size=(batch, dim)))
    if labels is None:
        labels = rng.integers(0, 3, size=batch)
    return z1.astype(np.float32), z2.astype(np.float32), np.asarray(labels, np.int32)


def clustered_batch(seed, batch=8, dim=3):
    """Each class a tight cluster around its own axis: Assumption 1 holds for every anchor."""
    rng = np.random.default_rng(seed)
    labels = np.arange(batch) % dim
    centres = np.eye(dim)[labels]
    z1 = _normalize(centres + 0.1 * rng.normal(size=(batch, dim)))
    z2 = _normalize(centres + 0.1 * rng.normal(size=(batch, dim)))
    return z1.astype(np.float32), z2.astype(np.float32), labels.astype(np.int32)


# ----------------------------------------------------------------------------- four losses


def test_four_losses_and_monitor_equal_direct_loss_calls():
    z1, z2, labels = random_batch(0)
    beta = 1.5
    direct = {
        "hscl": losses.hscl(
            z1, z2, labels, beta=beta, temperature=TEMPERATURE, positives="partner"
        ),
        "hucl": losses.hucl(z1, z2, beta=beta, temperature=TEMPERATURE, tau_plus=0.0, clamp=False),
        "scl": losses.scl(z1, z2, labels, temperature=TEMPERATURE, positives="partner"),
        "ucl": losses.ucl(z1, z2, temperature=TEMPERATURE),
    }
    four = theory.four_losses(z1, z2, labels, beta=beta, temperature=TEMPERATURE)
    metrics = theory.theory_metrics(z1, z2, labels, beta=beta, temperature=TEMPERATURE)
    assert set(metrics) == set(theory.THEORY_KEYS)
    chex.assert_tree_shape_prefix(metrics, ())
    for key, value in direct.items():
        np.testing.assert_allclose(four[key], value, rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)
    # H-SCL with shared positives is not the reference training estimator (all positives).
    assert abs(float(direct["hscl"]) - float(losses.hscl(z1, z2, labels, beta=beta))) > 1e-3
    assert metrics["hscl_le_hucl"] == float(direct["hscl"] <= direct["hucl"])
    assert metrics["scl_le_ucl"] == float(direct["scl"] <= direct["ucl"])
    assert metrics["ucl_lt_hscl"] == float(direct["ucl"] < direct["hscl"])


# ----------------------------------------------------------------------------- Assumption 1


def _tilted_mean(s, beta):
    s = np.asarray(s, np.float64)
    return np.sum(np.exp((beta + 1) * s)) / np.sum(np.exp(beta * s))


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_assumption_fraction_on_a_constructed_batch(beta):
    # Unit vectors at 0, 60, 90 and 180 degrees; classes (0, 0, 1, 1); both views identical, so
    # every image's two views are counted alike and each candidate image appears twice.
    angles = np.deg2rad([0.0, 60.0, 90.0, 180.0])
    z = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = np.array([0, 0, 1, 1], np.int32)
    result = theory.assumption1(z, z, labels, beta=beta, temperature=TEMPERATURE)

    # s = cos / 0.5. Per image: s to its one same-class image, s to the two other-class images.
    same = {"A": 1.0, "B": 1.0, "C": 0.0, "D": 0.0}
    diff = {"A": [0.0, -2.0], "B": [np.sqrt(3), -1.0], "C": [0.0, np.sqrt(3)], "D": [-2.0, -1.0]}
    log_ratio = {k: same[k] - np.log(_tilted_mean(diff[k], beta)) for k in same}
    # A: e^1 vs <= 1 (holds); B: e^1 vs ~e^1.73 (fails); C: 1 vs > 1 (fails); D: 1 vs < 1 (holds).
    assert [log_ratio[k] >= 0 for k in "ABCD"] == [True, False, False, True]
    assert float(result["assumption_fraction"]) == 0.5
    assert float(result["assumption_num_anchors"]) == 8.0
    np.testing.assert_allclose(
        result["assumption_log_ratio"], np.mean(list(log_ratio.values())), rtol=1e-5
    )


def numpy_assumption1(z1, z2, labels, beta, temperature):
    z = np.concatenate([z1, z2]).astype(np.float64)
    y = np.concatenate([labels, labels])
    n, big_b = len(z), len(z1)
    s = z @ z.T / temperature
    holds, ratios = [], []
    for i in range(n):
        same = [j for j in range(n) if j not in (i, (i + big_b) % n) and y[j] == y[i]]
        diff = [j for j in range(n) if y[j] != y[i]]
        if not same or not diff:
            continue
        ratio = np.log(_tilted_mean(s[i, same], beta)) - np.log(_tilted_mean(s[i, diff], beta))
        holds.append(ratio >= 0)
        ratios.append(ratio)
    return np.mean(holds), np.mean(ratios), len(ratios)


def test_assumption1_equals_a_numpy_loop_and_skips_anchors_without_both_sets():
    # Classes 2 and 3 have one image each: their anchors have no same-class candidate.
    z1, z2, labels = random_batch(1, labels=[0, 0, 1, 1, 1, 2, 0, 3])
    beta = 0.7
    metrics = theory.theory_metrics(z1, z2, labels, beta=beta, temperature=TEMPERATURE)
    fraction, log_ratio, count = numpy_assumption1(z1, z2, labels, beta, TEMPERATURE)
    assert count == 12
    assert 0 < fraction < 1
    assert float(metrics["assumption_num_anchors"]) == count
    np.testing.assert_allclose(metrics["assumption_fraction"], fraction, rtol=1e-6)
    np.testing.assert_allclose(metrics["assumption_log_ratio"], log_ratio, rtol=1e-5, atol=1e-6)


def test_pmap_over_8_devices_equals_one_device():
    assert jax.local_device_count() == 8
    z1, z2, labels = random_batch(2, batch=16, labels=np.arange(16) % 3)
    beta = 1.2
    single = jax.device_get(
        theory.theory_metrics(z1, z2, labels, beta=beta, temperature=TEMPERATURE)
    )
    per_device = jax.pmap(
        lambda a, b, y: theory.theory_metrics(
            a, b, y, beta=beta, temperature=TEMPERATURE, axis_name="devices"
        ),
        axis_name="devices",
    )(z1.reshape(8, 2, -1), z2.reshape(8, 2, -1), labels.reshape(8, 2))
    per_device = jax.device_get(per_device)
    for key in theory.THEORY_KEYS:
        np.testing.assert_allclose(
            per_device[key], np.full(8, single[key]), rtol=1e-5, atol=1e-6, err_msg=key
        )
    assert float(single["assumption_num_anchors"]) == 32.0


def test_assumption_holding_everywhere_bounds_scl_by_ucl():
    z1, z2, labels = clustered_batch(3)
    at_zero = theory.theory_metrics(z1, z2, labels, beta=0.0, temperature=TEMPERATURE)
    assert float(at_zero["assumption_fraction"]) == 1.0
    assert float(at_zero["assumption_num_anchors"]) == 16.0
    assert float(at_zero["scl"]) <= float(at_zero["ucl"])
    assert float(at_zero["scl_le_ucl"]) == 1.0
    np.testing.assert_allclose(at_zero["hscl"], at_zero["scl"], rtol=1e-5)
    # The same bound for the tilted pair wherever the assumption holds at that beta.
    at_three = theory.theory_metrics(z1, z2, labels, beta=3.0, temperature=TEMPERATURE)
    assert float(at_three["assumption_fraction"]) == 1.0
    assert float(at_three["hscl"]) <= float(at_three["hucl"])
    assert float(at_three["hscl_le_hucl"]) == 1.0


def test_beta_sweep_matches_the_monitor_and_shows_the_lower_bound_scenario():
    z1, z2, labels = random_batch(0)
    betas = [0.0, 1.5, 20.0]
    sweep = theory.beta_sweep(z1, z2, labels, betas, temperature=TEMPERATURE)
    assert set(sweep) == set(theory.SWEEP_KEYS)
    chex.assert_shape([sweep[k] for k in theory.SWEEP_KEYS], (3,))
    for i, beta in enumerate(betas):
        metrics = theory.theory_metrics(z1, z2, labels, beta=beta, temperature=TEMPERATURE)
        for key in theory.SWEEP_KEYS[1:]:
            np.testing.assert_allclose(sweep[key][i], metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(sweep["hscl"][0], sweep["scl"][0], rtol=1e-5)
    np.testing.assert_array_equal(sweep["ucl_lt_hscl"], (sweep["ucl"] < sweep["hscl"]) * 1.0)
    # H-SCL grows with the hardness; at beta = 20 it sits above UCL on this batch.
    assert np.all(np.diff(sweep["hscl"]) > 0)
    assert sweep["ucl_lt_hscl"][-1] == 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda z, y: theory.theory_metrics(z, z, y, beta=-1.0), "beta"),
        (lambda z, y: theory.assumption1(z, z, y, beta=1.0, temperature=0.0), "temperature"),
        (lambda z, y: theory.assumption1(z, z[:3], y, beta=1.0), "shape"),
        (lambda z, y: theory.assumption1(z, z, y.astype(np.float32), beta=1.0), "integers"),
        (lambda z, y: theory.beta_sweep(z, z, y, []), "betas"),
        (lambda z, y: theory.beta_sweep(z, z, y, [1.0, float("nan")]), "beta"),
    ],
)
def test_bad_inputs_raise_value_errors(call, match):
    z1, _, labels = random_batch(0, batch=4)
    with pytest.raises(ValueError, match=match):
        call(z1, labels)


# ----------------------------------------------------------------------------- command line


def _theory_record(step, **overrides):
    record = {
        "step": step,
        "hscl": 3.0,
        "hucl": 3.1,
        "scl": 2.5,
        "ucl": 2.6,
        "assumption_fraction": 0.75,
        "assumption_log_ratio": 0.2,
        "assumption_num_anchors": 16.0,
        "hscl_le_hucl": 1.0,
        "scl_le_ucl": 1.0,
        "ucl_lt_hscl": 0.0,
    }
    record.update(overrides)
    return record


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_cli_turns_train_time_metrics_into_csv_and_plots(tmp_path, capsys):
    records = [
        {"step": 1, "loss": 3.6, "grad_norm": 1.0},
        _theory_record(2),
        {"step": 2, "knn_top1": 0.2, "knn_top5": 0.6},
        _theory_record(4, hscl=2.8, assumption_fraction=0.5),
        # The trainer's epoch-mean record repeats the steps above: not a row of its own.
        _theory_record(4, epoch=1.0, hscl=2.9),
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    assert analysis.main([f"--workdir={tmp_path}", "--beta=1.0", "--temperature=0.5"]) == 0
    rows = _read_csv(tmp_path / metrics.THEORY_TRAIN_CSV)
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert list(rows[0]) == list(analysis.THEORY_COLUMNS)
    assert float(rows[1]["hscl"]) == 2.8 and float(rows[1]["assumption_fraction"]) == 0.5
    assert float(rows[0]["beta"]) == 1.0 and rows[0]["epoch"] == ""
    for name in ("training_curves", "theory_train_losses", "theory_train_assumption"):
        assert _is_png(tmp_path / f"{name}.png"), name
    assert not (tmp_path / metrics.THEORY_CSV).exists()
    # A directory with nothing to analyse: exit status 1 and one line saying why.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert analysis.main([f"--workdir={empty}"]) == 1
    assert "nothing to analyse" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_over_checkpoints_of_a_tiny_run(tmp_path):
    import optax

    from hscl_jax import checkpoints, data, models
    from hscl_jax import config as config_lib
    from hscl_jax import step as step_lib

    config = config_lib.base_config("synthetic")
    config.model.name = "small_cnn"
    config.model.width = 2
    config.model.head_hidden_dim = 8
    config.model.projection_dim = 4
    config.global_batch_size = 8
    config.loss.beta = 2.0
    config.knn.eval_batch_size = 32
    workdir = str(tmp_path)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(json.loads(json.dumps(config.to_dict(), default=str)), f)
    model = models.model_from_config(config.model)
    state = step_lib.create_train_state(jax.random.key(0), model, optax.sgd(0.1), (32, 32, 3))
    # Checkpoints written by the trainer's own writer, so the layout read is the one it writes.
    manager = checkpoints.checkpoint_manager(workdir, 3)
    for step, scale in ((2, 1.0), (4, 1.5)):
        host = jax.device_get(state.to_dict())
        host["params"] = jax.tree.map(lambda p, s=scale: p * s, host["params"])
        host["step"] = np.int32(step)
        checkpoints.save_checkpoint(manager, step, host, {"step": step, "config": {}})
    manager.wait_until_finished()
    manager.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 4, "loss": 3.0}) + "\n")

    argv = [f"--workdir={workdir}", "--num_batches=1", "--betas=0,1,10", "--max_embeddings=40"]
    assert analysis.main(argv) == 0

    rows = _read_csv(os.path.join(workdir, metrics.THEORY_CSV))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert list(rows[0]) == list(analysis.THEORY_COLUMNS)
    assert float(rows[0]["beta"]) == 2.0 and int(rows[0]["num_batches"]) == 1
    assert float(rows[0]["epoch"]) == 2 / data.steps_per_epoch(config.data, 8)
    assert rows[0]["hscl"] != rows[1]["hscl"]
    # The step-2 row is the monitor on the run's first training batch, embedded as in training.
    batch = next(data.train_iterator(config.data, global_batch_size=8, seed=0, num_local_devices=1))
    variables = checkpoints.restore_variables(workdir, 2)
    images = np.concatenate([batch["view1"][0], batch["view2"][0]])
    (_, z), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    expected = theory.theory_metrics(z[:8], z[8:], batch["label"][0], beta=2.0)
    for key in theory.THEORY_KEYS:
        np.testing.assert_allclose(float(rows[0][key]), expected[key], rtol=1e-5, err_msg=key)

    sweep = _read_csv(os.path.join(workdir, metrics.BETA_SWEEP_CSV))
    assert [float(r["beta"]) for r in sweep] == [0.0, 1.0, 10.0]
    assert {int(r["step"]) for r in sweep} == {4}
    with np.load(os.path.join(workdir, metrics.EMBEDDINGS_NPZ)) as arrays:
        chex.assert_shape(arrays["features"], (40, 8))
        chex.assert_shape(arrays["labels"], (40,))
    for name in ("training_curves", "theory_losses", "theory_assumption", "beta_sweep"):
        assert _is_png(os.path.join(workdir, f"{name}.png")), name
    assert _is_png(os.path.join(workdir, "embeddings_pca.png"))
    assert not os.path.exists(os.path.join(workdir, metrics.THEORY_TRAIN_CSV))
