"""Tests for hscl_jax.theory: the four-loss comparison, the Assumption 1 estimate (hand-computed
and against a numpy loop), pmap over 8 devices, the bound it implies, the beta sweep, bad inputs."""

import chex
import jax
import numpy as np
import pytest

from hscl_jax import losses, theory

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
        np.testing.assert_allclose(four[key], value, rtol=1e-4, err_msg=key)
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, err_msg=key)
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
        result["assumption_log_ratio"], np.mean(list(log_ratio.values())), rtol=1e-4
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
    np.testing.assert_allclose(metrics["assumption_fraction"], fraction, rtol=1e-4)
    np.testing.assert_allclose(metrics["assumption_log_ratio"], log_ratio, rtol=1e-4, atol=1e-6)


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
            per_device[key], np.full(8, single[key]), rtol=1e-4, atol=1e-6, err_msg=key
        )
    assert float(single["assumption_num_anchors"]) == 32.0


def test_assumption_holding_everywhere_bounds_scl_by_ucl():
    z1, z2, labels = clustered_batch(3)
    at_zero = theory.theory_metrics(z1, z2, labels, beta=0.0, temperature=TEMPERATURE)
    assert float(at_zero["assumption_fraction"]) == 1.0
    assert float(at_zero["assumption_num_anchors"]) == 16.0
    assert float(at_zero["scl"]) <= float(at_zero["ucl"])
    assert float(at_zero["scl_le_ucl"]) == 1.0
    np.testing.assert_allclose(at_zero["hscl"], at_zero["scl"], rtol=1e-4)
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
            np.testing.assert_allclose(sweep[key][i], metrics[key], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(sweep["hscl"][0], sweep["scl"][0], rtol=1e-4)
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
