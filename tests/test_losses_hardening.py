"""Tests of the hardenings of hscl and hucl: "exp", "topk", "poly" and a callable log-weight."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loss_batches import assert_same as _assert_same
from loss_batches import batch as _batch

from hscl_jax import losses

# ----------------------------------------------------------------------------- hardening

_EXP_AS_CALLABLE_BETA = 2.5


def _exp_as_callable(s):
    return _EXP_AS_CALLABLE_BETA * s


@jax.jit
def _hardening_cases(z1, z2, labels, temperature, beta):
    """(loss, expected equal loss) pairs of value_and_grad, for every hardening invariant.

    One program for all of them (one compile); "exp" at beta 0 == SCL through the traced code
    path is in test_losses.py's property test.
    """
    many = 10**6  # top_k beyond any number of negatives
    all_but_one = 2 * z1.shape[0] - 1  # still more than the 2B - 2 negatives an anchor can have

    def vg(name, block_size=None, **options):
        def fn(a, b):
            return losses.compute(
                name, a, b, labels, temperature=temperature, block_size=block_size, **options
            )

        return jax.value_and_grad(fn, argnums=(0, 1))(z1, z2)

    blocked = {"block_size": 3}
    exp_beta = {"beta": _EXP_AS_CALLABLE_BETA}
    return {
        "poly at beta 0 == scl": (vg("hscl", hardening="poly", beta=0.0 * beta), vg("scl")),
        "topk all == scl": (vg("hscl", hardening="topk", top_k=many), vg("scl")),
        "topk all == scl, blocked": (
            vg("hscl", hardening="topk", top_k=many, **blocked),
            vg("scl", **blocked),
        ),
        # One less than the columns: the threshold pass runs (top_k >= columns skips it).
        "topk 2B-1 == scl": (vg("hscl", hardening="topk", top_k=all_but_one), vg("scl")),
        "topk 2B-1 == scl, blocked": (
            vg("hscl", hardening="topk", top_k=all_but_one, **blocked),
            vg("scl", **blocked),
        ),
        "hucl topk all == ucl": (vg("hucl", hardening="topk", top_k=many), vg("ucl")),
        "callable == exp": (vg("hscl", hardening=_exp_as_callable), vg("hscl", **exp_beta)),
        "callable == exp, blocked": (
            vg("hscl", hardening=_exp_as_callable, **blocked),
            vg("hscl", **exp_beta, **blocked),
        ),
        "callable == exp, detached": (
            vg("hscl", hardening=_exp_as_callable, detach_weights=True),
            vg("hscl", **exp_beta, detach_weights=True),
        ),
        "hucl callable == exp, blocked": (
            vg("hucl", hardening=_exp_as_callable, tau_plus=0.1, **blocked),
            vg("hucl", **exp_beta, tau_plus=0.1, **blocked),
        ),
        "topk blocked == dense": (
            vg("hscl", hardening="topk", top_k=2, **blocked),
            vg("hscl", hardening="topk", top_k=2),
        ),
        "poly blocked == dense": (
            vg("hscl", hardening="poly", beta=beta, **blocked),
            vg("hscl", hardening="poly", beta=beta),
        ),
    }


@settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**31 - 1),
    classes=st.sampled_from([1, 3, 100]),
    temperature=st.floats(0.1, 1.0),
    beta=st.floats(0.0, 10.0),
)
def test_hardening_invariants(seed, classes, temperature, beta):
    z1, z2, labels = _batch(seed, 6, 4, classes)  # one shape: one compile
    for case, (got, want) in _hardening_cases(z1, z2, labels, temperature, beta).items():
        try:
            _assert_same(got, want)
        except AssertionError as error:
            raise AssertionError(case) from error


def _numpy_tilted_hscl(z1, z2, labels, t, log_weight, select=None):
    """H-SCL (positives "all") from docs/losses.md with explicit loops, any log-weight function."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    y = np.concatenate([labels, labels])
    s = z @ z.T / t
    n = len(z)
    terms, kept = [], []
    for i in range(n):
        neg = np.flatnonzero(y != y[i])
        if select is not None:
            neg = select(s[i], neg)
        kept.append(len(neg))
        log_w = log_weight(s[i][neg])
        w = np.exp(log_w - log_w.max())
        mu = (w * np.exp(s[i][neg])).sum() / w.sum()
        pos = np.flatnonzero((y == y[i]) & (np.arange(n) != i))
        terms += [np.log1p((n - 2) * mu * np.exp(-s[i, j])) for j in pos]
    return np.mean(terms), np.mean(kept)


def test_topk_keeps_the_k_hardest_negatives_and_every_tie():
    z1, z2, labels = (np.array(x) for x in _batch(5, 10, 6, 3))
    # Images 1 and 2 become copies of image 0: their views tie with image 0's for every anchor.
    for copy in (1, 2):
        z1[copy], z2[copy], labels[copy] = z1[0], z2[0], labels[0]
    t, k = 0.4, 2

    def top_k_with_ties(s_row, neg):
        threshold = np.sort(s_row[neg])[::-1][min(k, len(neg)) - 1]
        return neg[s_row[neg] >= threshold]

    want, kept = _numpy_tilted_hscl(z1, z2, labels, t, np.zeros_like, top_k_with_ties)
    assert kept > k, "the batch must hold a tie at the threshold"
    for block_size in (None, 4):
        got, aux = losses.hscl(
            z1,
            z2,
            labels,
            hardening="topk",
            top_k=k,
            temperature=t,
            block_size=block_size,
            return_aux=True,
        )
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_allclose(aux.effective_negatives, kept, rtol=1e-6)


def test_poly_is_the_polynomial_tilt_of_its_docstring():
    z1, z2, labels = (np.asarray(x) for x in _batch(6, 10, 6, 3))
    t, beta = 0.3, 4.0
    want, _ = _numpy_tilted_hscl(z1, z2, labels, t, lambda s: beta * np.log1p(t * s))
    for block_size in (None, 4):
        got = losses.hscl(
            z1, z2, labels, hardening="poly", beta=beta, temperature=t, block_size=block_size
        )
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_callable_hardening_works_under_jit_and_vmap_over_its_parameter():
    z1, z2, labels = _batch(7, 8, 4, 3)

    def loss(beta):
        return losses.hscl(z1, z2, labels, hardening=lambda s: beta * s)

    betas = jnp.asarray([0.0, 1.0, 3.0])
    swept = jax.jit(jax.vmap(loss))(betas)
    want = [losses.hscl(z1, z2, labels, beta=float(b)) for b in betas]
    np.testing.assert_allclose(swept, want, rtol=1e-5)
