"""Multi-view input: one (B, V, d) array of V views per image in place of z1, z2.

V = 2 equals the two-view call (dense, blocked, under pmap and shard_map); V = 3 and 4 equal a
float64 reference written from the definitions of docs/losses.md with explicit loops.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from hscl_jax import losses

# (loss, options): every loss, both kinds of positives, debiasing and the clamp.
_LOSSES = (
    ("ucl", {"temperature": 0.4}),
    ("scl", {"temperature": 0.4}),
    ("scl", {"temperature": 0.4, "positives": "partner"}),
    ("hscl", {"beta": 1.5, "temperature": 0.4}),
    ("hscl", {"beta": 1.5, "temperature": 0.4, "positives": "partner"}),
    ("hucl", {"beta": 1.5, "temperature": 0.4}),
    ("hucl", {"beta": 1.5, "temperature": 0.4, "tau_plus": 0.1, "clamp": True}),
    ("supcon", {"temperature": 0.2}),
)
_IDS = [f"{name}-{options}" for name, options in _LOSSES]


def _views(seed, batch, num_views, dim=8, num_classes=3):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(batch, 1, dim))
    z = base + 0.7 * rng.normal(size=(batch, num_views, dim))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    return jnp.asarray(z, jnp.float32), jnp.asarray(labels)


def _call(name, z1, z2=None, labels=None, **options):
    return losses.compute(name, z1, z2, labels, **options)


# ----------------------------------------------------------------------------- V = 2


@jax.jit
def _two_views_both_ways(z, labels):
    """Every loss, dense and blocked: (two-view call, (B, 2, d) call), value and gradients."""
    out = {}
    for name, options in _LOSSES:
        for block_size in (None, 5):
            opts = dict(options, block_size=block_size)

            def pair(a, b, name=name, opts=opts):
                return _call(name, a, b, labels, **opts)

            def stacked(views, name=name, opts=opts):
                return _call(name, views, labels=labels, **opts)

            value, (g1, g2) = jax.value_and_grad(pair, argnums=(0, 1))(z[:, 0], z[:, 1])
            multi_value, g = jax.value_and_grad(stacked)(z)
            out[f"{name} {options} block {block_size}"] = (
                (value, jnp.stack([g1, g2], axis=1)),
                (multi_value, g),
            )
    return out


def test_two_views_as_one_array_equal_the_two_view_call():
    z, labels = _views(0, 12, 2)
    for case, (want, got) in _two_views_both_ways(z, labels).items():
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, err_msg=case)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-7, err_msg=case)


def _split(x, devices=8):
    return x.reshape((devices, -1) + x.shape[1:])


@pytest.mark.parametrize("block_size", [None, 3])
def test_two_views_as_one_array_under_pmap_and_shard_map_equal_the_two_view_call(block_size):
    z, labels = _views(1, 16, 2)
    options = {"beta": 1.5, "block_size": block_size}
    want_value, (g1, g2) = jax.value_and_grad(
        lambda a, b: losses.hscl(a, b, labels, **options), argnums=(0, 1)
    )(z[:, 0], z[:, 1])
    want_grad = jnp.stack([g1, g2], axis=1)

    def per_device(views, y):
        return jax.value_and_grad(lambda v: losses.hscl(v, labels=y, axis_name="i", **options))(
            views
        )

    values, grads = jax.pmap(per_device, axis_name="i")(_split(z), _split(labels))
    np.testing.assert_allclose(values, np.full(8, want_value), rtol=1e-5)
    np.testing.assert_allclose(grads.reshape(z.shape), want_grad, rtol=1e-4, atol=1e-6)

    mesh = jax.make_mesh((8,), ("i",), axis_types=(AxisType.Auto,))
    mapped = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P("i"), P("i")), out_specs=(P(), P("i"))
    )
    value, grad = jax.jit(mapped)(z, labels)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- V = 3 and 4


def _reference(name, z, labels, options):
    """The loss from its definition, float64, explicit loops over anchors and positives."""
    batch, num_views, _ = z.shape
    t = options["temperature"]
    beta = options.get("beta", 0.0)
    tau, clamp = options.get("tau_plus", 0.0), options.get("clamp", False)
    flat = np.asarray(z, np.float64).transpose(1, 0, 2).reshape(num_views * batch, -1)
    image = np.tile(np.arange(batch), num_views)
    label = np.asarray(labels)[image]
    s = flat @ flat.T / t
    n = len(flat)
    q = n - num_views
    terms, supcon_terms = [], []
    for k in range(n):
        others = np.arange(n) != k
        if name in ("ucl", "hucl") or options.get("positives") == "partner":
            positives = np.flatnonzero((image == image[k]) & others)
        else:
            positives = np.flatnonzero((label == label[k]) & others)
        if name == "supcon":
            if len(positives):
                lse = np.log(np.exp(s[k][others]).sum())
                supcon_terms.append(-np.mean(s[k][positives] - lse))
            continue
        negatives = image != image[k] if name in ("ucl", "hucl") else label != label[k]
        if not len(positives) or not negatives.any():
            continue
        w = np.exp(beta * s[k][negatives])
        mu = (w * np.exp(s[k][negatives])).sum() / w.sum()
        for j in positives:
            ng = q * (mu - tau * np.exp(s[k, j])) / (1 - tau)
            ng = max(ng, 0.0)
            if clamp:
                ng = max(ng, q * np.exp(-1 / t))
            terms.append(np.log1p(ng * np.exp(-s[k, j])))
    return np.mean(supcon_terms if name == "supcon" else terms)


@functools.cache
def _multiview_losses(num_views):
    @jax.jit
    def run(z, labels):
        return {
            f"{i} {block_size}": _call(name, z, labels=labels, block_size=block_size, **options)
            for i, (name, options) in enumerate(_LOSSES)
            for block_size in (None, 7)
        }

    return run


@pytest.mark.parametrize("num_views", [3, 4])
def test_more_views_match_the_definition(num_views):
    z, labels = _views(2, 6, num_views)
    got = _multiview_losses(num_views)(z, labels)
    for i, (name, options) in enumerate(_LOSSES):
        want = _reference(name, z, labels, options)
        for block_size in (None, 7):
            np.testing.assert_allclose(
                got[f"{i} {block_size}"], want, rtol=1e-4, err_msg=f"{name} {options} {block_size}"
            )


@pytest.mark.parametrize("name,options", _LOSSES, ids=_IDS)
def test_more_views_dense_gradients_equal_blocked(name, options):
    z, labels = _views(3, 6, 3)

    @jax.jit
    def grads(z):
        return [
            jax.value_and_grad(
                lambda v, bs=bs: _call(name, v, labels=labels, block_size=bs, **options)
            )(z)
            for bs in (None, 4)
        ]

    (dense, dense_grad), (blocked, blocked_grad) = grads(z)
    np.testing.assert_allclose(dense, blocked, rtol=1e-5)
    chex.assert_trees_all_close(dense_grad, blocked_grad, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(dense_grad)).max() > 0


def test_more_views_under_shard_map_equal_one_device():
    z, labels = _views(4, 16, 3)
    want = jax.value_and_grad(lambda v: losses.hucl(v, beta=1.0, tau_plus=0.1))(z)
    mesh = jax.make_mesh((8,), ("i",), axis_types=(AxisType.Auto,))

    def per_device(views):
        return jax.value_and_grad(lambda v: losses.hucl(v, beta=1.0, tau_plus=0.1, axis_name="i"))(
            views
        )

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=P("i"), out_specs=(P(), P("i")))
    got = jax.jit(mapped)(z)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)


def test_aux_counts_every_view_as_an_anchor():
    z, labels = _views(5, 6, 3, num_classes=2)
    _, aux = losses.ucl(z, return_aux=True)
    assert float(aux.num_anchors) == 18 and float(aux.num_pairs) == 36
    np.testing.assert_allclose(aux.effective_negatives, 18 - 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda z, y: losses.hscl(z, y, beta=1.0), r"pass labels by keyword \(labels=\.\.\.\)"),
        (lambda z, y: losses.hscl(z[:, 0], labels=y, beta=1.0), r"or one array of shape"),
        (lambda z, y: losses.ucl(z[:, :1]), r"views >= 2; got z1 of shape \(6, 1, 8\)"),
        (lambda z, y: losses.scl(z), r"labels are required"),
        (lambda z, y: losses.compute("supcon", z), r"needs labels"),
        (lambda z, y: losses.hscl(z, labels=y[:2], beta=1.0), r"labels must have shape \(6,\)"),
    ],
)
def test_bad_multiview_input_raises_one_clear_error(call, match):
    z, labels = _views(6, 6, 3)
    with pytest.raises(ValueError, match=match):
        call(z, labels)
