"""Tests of the labelled queue of extra contrast rows the losses take (``queue=``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_batches import assert_same as _assert_same
from loss_batches import batch as _batch
from loss_batches import unit as _unit

from hscl_jax import losses

# ----------------------------------------------------------------------------- queue

# (name, options): the queue options each loss takes.
_QUEUE_LOSSES = (
    ("ucl", {}),
    ("scl", {"queue_as_positives": True}),
    ("scl", {"positives": "partner"}),
    ("hscl", {"beta": 1.5, "queue_as_positives": True}),
    ("hucl", {"beta": 1.5}),
    ("supcon", {"queue_as_positives": True}),
)
_Q_MODE = {"supcon": {}}  # SupCon has no Q


def _copies_as_queue(z1, z2, labels):
    return losses.Queue(
        jnp.concatenate([z1, z2]), jnp.concatenate([labels, labels]), jnp.ones(2 * len(z1), bool)
    )


@jax.jit
def _queue_vs_doubled_batch(z1, z2, labels):
    queue = _copies_as_queue(z1, z2, labels)
    doubled = [jnp.concatenate([x, x]) for x in (z1, z2, labels)]
    out = {}
    for name, options in _QUEUE_LOSSES:
        q_mode = _Q_MODE.get(name, {"queue_q": "grows"})
        batch_options = {k: v for k, v in options.items() if k != "queue_as_positives"}
        for bs in (None, 4):
            with_queue = losses.compute(
                name, z1, z2, labels, queue=queue, block_size=bs, **q_mode, **options
            )
            on_doubled = losses.compute(name, *doubled, block_size=bs, **batch_options)
            out[f"{name} {options} block {bs}"] = (with_queue, on_doubled)
    return out


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.sampled_from([2, 6]),
    classes=st.sampled_from([1, 3]),
)
def test_queue_of_detached_copies_equals_the_doubled_batch(seed, batch, classes):
    """Anchors are the batch's views only; on the doubled batch every copy is an anchor too, with
    the same loss as its original, so the means agree (Q grows with the queue: 4B - 2)."""
    z1, z2, labels = _batch(seed, batch, 4, classes)
    for case, (got, want) in _queue_vs_doubled_batch(z1, z2, labels).items():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=case)


def _numpy_hscl_with_queue(z1, z2, labels, queue, t, beta, as_positives, grows):
    z = np.concatenate([z1, z2]).astype(np.float64)
    y = np.concatenate([labels, labels])
    qz, qy = np.asarray(queue.z, np.float64)[queue.valid], np.asarray(queue.labels)[queue.valid]
    n = len(z)
    q = n - 2 + (len(qz) if grows else 0)
    terms = []
    for i in range(n):
        s_batch, s_queue = z @ z[i] / t, qz @ z[i] / t
        neg = np.concatenate([s_batch[y != y[i]], s_queue[qy != y[i]]])
        w = np.exp(beta * (neg - neg.max()))
        mu = (w * np.exp(neg)).sum() / w.sum()
        pos = s_batch[(y == y[i]) & (np.arange(n) != i)]
        if as_positives:
            pos = np.concatenate([pos, s_queue[qy == y[i]]])
        terms += list(np.log1p(q * mu * np.exp(-pos)))
    return np.mean(terms)


@pytest.mark.parametrize("as_positives", [False, True])
@pytest.mark.parametrize("queue_q", ["fixed", "grows"])
def test_queue_matches_a_direct_numpy_implementation_and_masks_unfilled_rows(as_positives, queue_q):
    z1, z2, labels = _batch(8, 6, 5, 3)
    qz, _, qy = _batch(9, 10, 5, 3)
    valid = jnp.arange(10) < 7
    # Unfilled rows hold zeros, as a fresh queue does, or stale garbage: neither may count.
    qz = qz.at[7].set(0.0).at[8].set(z1[0])
    qy = qy.at[8].set(labels[0] + 1)
    queue = losses.Queue(qz, qy, valid)
    options = {"beta": 2.0, "temperature": 0.4, "queue_as_positives": as_positives}
    want = _numpy_hscl_with_queue(z1, z2, labels, queue, 0.4, 2.0, as_positives, queue_q == "grows")
    trimmed = losses.Queue(qz[:7], qy[:7], valid[:7])
    for block_size in (None, 4):
        got = losses.hscl(
            z1, z2, labels, queue=queue, queue_q=queue_q, block_size=block_size, **options
        )
        np.testing.assert_allclose(got, want, rtol=1e-5)
        without_unfilled = losses.hscl(
            z1, z2, labels, queue=trimmed, queue_q=queue_q, block_size=block_size, **options
        )
        np.testing.assert_allclose(without_unfilled, got, rtol=1e-6)


@pytest.mark.parametrize("name,options", _QUEUE_LOSSES, ids=[f"{n}-{o}" for n, o in _QUEUE_LOSSES])
def test_empty_queue_is_no_queue_and_gradients_reach_only_the_queries(name, options):
    z1, z2, labels = _batch(10, 6, 5, 3)
    qz, _, qy = _batch(11, 8, 5, 3)
    empty = losses.Queue(qz, qy, jnp.zeros(8, bool))
    full = losses.Queue(qz, qy, jnp.ones(8, bool))
    batch_options = {k: v for k, v in options.items() if k != "queue_as_positives"}

    def loss(a, b, qz_, queue_valid, block_size):
        queue = losses.Queue(qz_, qy, queue_valid)
        return losses.compute(
            name,
            a,
            b,
            labels,
            queue=queue,
            block_size=block_size,
            **_Q_MODE.get(name, {}),
            **options,
        )

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=4)
    for block_size in (None, 4):
        value, (g1, g2, g_queue) = grad(z1, z2, qz, empty.valid, block_size)
        alone = jax.value_and_grad(
            lambda a, b, bs=block_size: losses.compute(
                name, a, b, labels, block_size=bs, **batch_options
            ),
            argnums=(0, 1),
        )(z1, z2)
        _assert_same((value, (g1, g2)), alone)
        value, (g1, g2, g_queue) = grad(z1, z2, qz, full.valid, block_size)
        np.testing.assert_array_equal(g_queue, 0.0)
        assert value != pytest.approx(alone[0])
        if block_size is None:
            dense = (value, (g1, g2))
        else:  # the dense hand-written backward equals autodiff (the blocked path)
            _assert_same((value, (g1, g2)), dense)


@pytest.mark.parametrize("block_size", [None, 4])
def test_queue_under_pmap_equals_one_device(block_size):
    z1, z2, labels = _batch(12, 16, 5, 3)
    qz, _, qy = _batch(13, 12, 5, 3)
    queue = losses.Queue(qz, qy, jnp.arange(12) < 9)
    options = {"beta": 1.0, "queue_as_positives": True, "queue_q": "grows"}

    def one(a, b, y):
        return losses.hscl(a, b, y, queue=queue, block_size=block_size, **options)

    value, (g1, g2) = jax.value_and_grad(one, argnums=(0, 1))(z1, z2, labels)

    def per_device(a, b, y):
        def fn(a_, b_):
            return losses.hscl(
                a_, b_, y, queue=queue, axis_name="i", block_size=block_size, **options
            )

        return jax.value_and_grad(fn, argnums=(0, 1))(a, b)

    shard = lambda x: x.reshape((8, 2) + x.shape[1:])  # noqa: E731
    values, (p1, p2) = jax.pmap(per_device, axis_name="i")(shard(z1), shard(z2), shard(labels))
    np.testing.assert_allclose(values, np.full(8, value), rtol=1e-5)
    np.testing.assert_allclose(p1.reshape(z1.shape), g1, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(p2.reshape(z2.shape), g2, atol=1e-6, rtol=1e-4)


def test_topk_sees_the_queue():
    """The k hardest negatives are chosen among the batch's and the queue's together."""
    z1, z2, labels = _batch(14, 4, 5, 2)
    queue = _copies_as_queue(z1, z2, labels)
    doubled = [jnp.concatenate([x, x]) for x in (z1, z2, labels)]
    for block_size in (None, 3):
        got = losses.hscl(
            z1,
            z2,
            labels,
            hardening="topk",
            top_k=3,
            queue=queue,
            queue_q="grows",
            queue_as_positives=True,
            block_size=block_size,
        )
        want = losses.hscl(*doubled, hardening="topk", top_k=3, block_size=block_size)
        np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(
    "queue,options,match",
    [
        (lambda z, y: (z, y), {}, r"queue must be a losses.Queue"),
        (lambda z, y: losses.Queue(z[:, :2], y, y > 0), {}, r"queue.z must have shape \(K, 3\)"),
        (lambda z, y: losses.Queue(z, y[:2], y > 0), {}, r"queue.labels must be integers of sh"),
        (lambda z, y: losses.Queue(z, y, y), {}, r"queue.valid must be booleans"),
        (lambda z, y: None, {"queue_q": "some"}, r"queue_q must be one of \('fixed', 'grows'\)"),
        (lambda z, y: None, {"queue_as_positives": 1}, r"queue_as_positives must be True or F"),
    ],
)
def test_bad_queue_raises_one_clear_error(queue, options, match):
    z = jnp.asarray(_unit(np.eye(4, 3) + 0.1), jnp.float32)
    y = jnp.arange(4, dtype=jnp.int32)
    with pytest.raises(ValueError, match=match):
        losses.hscl(z, z, y, beta=1.0, queue=queue(z, y), **options)


# ----------------------------------------------------------------------------- the queue as a value


def _labelled_keys(step, batch=2, dim=2):
    """Batch ``step`` of keys: row r holds step + r / 10, labelled 10 * step + r."""
    keys = jnp.full((batch, dim), float(step)) + jnp.arange(float(batch))[:, None] / 10
    return keys, 10 * step + jnp.arange(batch, dtype=jnp.int32)


def test_push_is_first_in_first_out_newest_first():
    queue = losses.Queue.empty(5, 2)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        queue,
        losses.Queue(
            jnp.zeros((5, 2), jnp.float32), jnp.zeros((5,), jnp.int32), jnp.zeros((5,), bool)
        ),
    )
    assert not queue.valid.any()
    for step in range(3):
        queue = queue.push(*_labelled_keys(step))
        np.testing.assert_array_equal(queue.valid, np.arange(5) < min(2 * (step + 1), 5))
    # Newest batch first, in batch order; the oldest row (batch 0, row 1) has been dropped.
    np.testing.assert_array_equal(queue.labels, [20, 21, 10, 11, 0])
    np.testing.assert_allclose(queue.z[:, 0], [2.0, 2.1, 1.0, 1.1, 0.0])
    assert queue.valid.all()


def test_push_of_a_batch_larger_than_the_queue_keeps_its_first_rows():
    queue = losses.Queue.empty(5, 2).push(*_labelled_keys(0))
    big = queue.push(jnp.ones((7, 2)), jnp.arange(7, dtype=jnp.int32))
    np.testing.assert_array_equal(big.labels, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(big.z, np.ones((5, 2)))
    assert big.valid.all()


def test_queue_is_a_pytree_that_jit_and_tree_maps_keep():
    queue = losses.Queue.empty(4, 3, jnp.bfloat16).push(jnp.ones((2, 3)), jnp.array([1, 2]))
    leaves, treedef = jax.tree.flatten(queue)
    assert len(leaves) == 3
    assert jax.tree.unflatten(treedef, leaves) == queue
    assert isinstance(jax.tree.map(jnp.copy, queue), losses.Queue)
    pushed = jax.jit(lambda q, k, y: q.push(k, y))(queue, jnp.full((2, 3), 2.0), jnp.array([3, 4]))
    assert isinstance(pushed, losses.Queue) and pushed.z.dtype == jnp.bfloat16
    np.testing.assert_array_equal(pushed.labels, [3, 4, 1, 2])
    np.testing.assert_array_equal(pushed.valid, [True] * 4)


def test_pushed_keys_are_constants():
    def loss(keys):
        queue = losses.Queue.empty(4, 2).push(keys, jnp.array([0, 1]))
        return jnp.sum(queue.z**2)

    np.testing.assert_array_equal(jax.grad(loss)(jnp.ones((2, 2))), 0.0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: losses.Queue.empty(0, 2), r"size must be a positive integer, got 0"),
        (lambda: losses.Queue.empty(4, 2.5), r"dim must be a positive integer, got 2.5"),
        (
            lambda: losses.Queue.empty(4, 2).push(jnp.ones((2, 3)), jnp.array([0, 1])),
            r"keys must have shape \(B, 2\) to match the queue, got \(2, 3\)",
        ),
        (
            lambda: losses.Queue.empty(4, 2).push(jnp.ones((2, 2)), jnp.array([0.0, 1.0])),
            r"labels must be integers of shape \(2,\) to match keys, got float32",
        ),
    ],
)
def test_bad_queue_arguments_raise_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
