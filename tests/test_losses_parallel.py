"""Every loss under every way of splitting the batch over 8 devices equals one device on the
concatenated batch: loss, gradients of z1 and z2, and of the traced beta and temperature.

Patterns (docs/parallelism.md): ``jax.shard_map`` with check_vma (gradient inside, and gradient of
a ``shard_map(..., out_specs=P())`` loss from outside), ``jax.jit`` over a mesh of Auto axes and
of Explicit axes, ``jax.pmap``, and ``jax.shard_map`` with ``check_vma=False`` (gradient inside).
Each pattern is one test that compiles every variant (every loss and hardening, dense and
blocked, with and without a queue) into one program: the file compiles eight programs in all.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from hscl_jax import losses

# One worker runs the module, so the one-device reference is computed once.
pytestmark = pytest.mark.xdist_group("losses_parallel")

B, DIM, DEVICES, AXIS = 32, 16, 8, "data"
QUEUE_SIZE, BLOCK = 12, 24


def _callable_hardening(s):
    return 1.5 * s


# name: (loss, fixed options, traced hyper-parameters).
_LOSSES = {
    "ucl": ("ucl", {}, {"temperature": 0.4}),
    "scl": ("scl", {}, {"temperature": 0.4}),
    "hscl": ("hscl", {}, {"beta": 1.5, "temperature": 0.4}),
    "hscl-partner-detached-callable": (
        "hscl",
        {"positives": "partner", "detach_weights": True, "hardening": _callable_hardening},
        {"temperature": 0.4},
    ),
    "hucl": ("hucl", {"tau_plus": 0.1, "clamp": True}, {"beta": 1.5, "temperature": 0.4}),
    "supcon": ("supcon", {}, {"temperature": 0.2}),
    "hscl-topk": ("hscl", {"hardening": "topk", "top_k": 7}, {"temperature": 0.4}),
    "hucl-poly": ("hucl", {"hardening": "poly"}, {"beta": 2.0, "temperature": 0.4}),
}
_QUEUE_OPTIONS = {"ucl": {"queue_q": "grows"}, "supcon": {"queue_as_positives": True}}
# Every loss and hardening runs dense and blocked, once with a queue and once without: the
# queue's side alternates, so that each path meets each queue setting (a full cross product
# would double the compile time of every test for no code path more).
VARIANTS = {
    f"{name}-{path}-{'queue' if with_queue else 'no queue'}": (name, block, with_queue)
    for i, name in enumerate(_LOSSES)
    for path, block, with_queue in (("dense", None, i % 2 == 1), ("blocked", BLOCK, i % 2 == 0))
}


def _loss(variant, z1, z2, labels, queue, hyper, axis_name=None):
    name, block_size, with_queue = VARIANTS[variant]
    loss_name, options, _ = _LOSSES[name]
    extra = {}
    if with_queue:
        extra = {"queue": queue, **_QUEUE_OPTIONS.get(loss_name, {})}
    return losses.compute(
        loss_name,
        z1,
        z2,
        labels,
        axis_name=axis_name,
        block_size=block_size,
        **options,
        **extra,
        **hyper,
    )


def _hyper(variant):
    return {k: jnp.float32(v) for k, v in _LOSSES[VARIANTS[variant][0]][2].items()}


def _value_and_grads(variant, z1, z2, labels, queue, hyper, axis_name=None):
    """(loss, (dz1, dz2, dhyper)) of one variant."""

    def fn(a, b, h):
        return _loss(variant, a, b, labels, queue, h, axis_name)

    return jax.value_and_grad(fn, argnums=(0, 1, 2))(z1, z2, hyper)


def _every_variant(fn, *args):
    return {variant: fn(variant, *args, _hyper(variant)) for variant in VARIANTS}


def _batch():
    rng = np.random.default_rng(0)

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    z1 = unit(rng.normal(size=(B, DIM)))
    z2 = unit(z1 + 0.5 * rng.normal(size=(B, DIM)))
    labels = rng.integers(0, 4, size=B).astype(np.int32)
    queue = losses.Queue(
        jnp.asarray(unit(rng.normal(size=(QUEUE_SIZE, DIM)))),
        jnp.asarray(rng.integers(0, 4, size=QUEUE_SIZE).astype(np.int32)),
        jnp.arange(QUEUE_SIZE) < QUEUE_SIZE - 3,
    )
    return jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(labels), queue


@pytest.fixture(scope="module")
def batch():
    assert len(jax.devices()) == DEVICES, "conftest.py must give 8 fake CPU devices"
    return _batch()


@pytest.fixture(scope="module")
def one_device(batch):
    """Every variant on one device on the whole batch: the reference."""
    z1, z2, labels, queue = batch

    @jax.jit
    def run(z1, z2, labels, queue):
        return _every_variant(_value_and_grads, z1, z2, labels, queue)

    return jax.device_get(run(z1, z2, labels, queue))


def _assert_equal_to_one_device(got, want):
    """Loss and gradients equal, float32 tolerances that hold on any x86_64 CPU; the gradients
    relative to the largest entry of each (entries near zero make a per-entry test
    meaningless)."""
    assert set(got) == set(want)
    for variant in got:
        (value, grads), (want_value, want_grads) = got[variant], want[variant]
        np.testing.assert_allclose(value, want_value, rtol=1e-4, atol=1e-6, err_msg=variant)
        chex.assert_trees_all_equal_structs(grads, want_grads)
        for got_leaf, want_leaf in zip(
            jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True
        ):
            got_leaf, want_leaf = np.asarray(got_leaf), np.asarray(want_leaf)
            scale = max(np.abs(want_leaf).max(), 1e-6)
            np.testing.assert_allclose(
                got_leaf, want_leaf, rtol=1e-4, atol=2e-5 * scale, err_msg=variant
            )


def _mesh(axis_type):
    return jax.make_mesh((DEVICES,), (AXIS,), axis_types=(axis_type,))


def _per_device_grads_summed(variant, z1, z2, labels, queue, hyper):
    """The gradient taken inside: the loss is global, z1 and z2 get their slice of the global
    gradient; an untyped map (pmap, check_vma=False) leaves each device its own part of the
    gradient of a replicated input, which is summed here."""
    value, (g1, g2, g_hyper) = _value_and_grads(variant, z1, z2, labels, queue, hyper, AXIS)
    return value, (g1, g2, jax.lax.psum(g_hyper, AXIS))


# ----------------------------------------------------------------------------- shard_map


def test_shard_map_with_check_vma_gradient_inside(batch, one_device):
    z1, z2, labels, queue = batch

    def per_device(z1, z2, labels, queue):
        # check_vma types beta and the temperature as replicated: their gradients come out
        # summed over devices, with no psum by the caller.
        return _every_variant(
            lambda v, *a: _value_and_grads(v, *a, axis_name=AXIS), z1, z2, labels, queue
        )

    grads_spec = (P(AXIS), P(AXIS), P())
    mapped = jax.shard_map(
        per_device,
        mesh=_mesh(AxisType.Auto),
        in_specs=(P(AXIS), P(AXIS), P(AXIS), P()),
        out_specs={variant: (P(), grads_spec) for variant in VARIANTS},
    )
    _assert_equal_to_one_device(jax.device_get(jax.jit(mapped)(z1, z2, labels, queue)), one_device)


def test_gradient_of_a_shard_map_loss_with_replicated_out_specs(batch, one_device):
    """The loss comes out of shard_map typed replicated, so out_specs=P() is legal and the
    gradient taken outside is the global one."""
    z1, z2, labels, queue = batch
    mesh = _mesh(AxisType.Auto)

    def outside(variant, z1, z2, labels, queue, hyper):
        def global_loss(a, b, h):
            mapped = jax.shard_map(
                functools.partial(_loss, variant, axis_name=AXIS),
                mesh=mesh,
                in_specs=(P(AXIS), P(AXIS), P(AXIS), P(), P()),
                out_specs=P(),
            )
            return mapped(a, b, labels, queue, h)

        return jax.value_and_grad(global_loss, argnums=(0, 1, 2))(z1, z2, hyper)

    run = jax.jit(functools.partial(_every_variant, outside))
    _assert_equal_to_one_device(jax.device_get(run(z1, z2, labels, queue)), one_device)


def test_shard_map_without_check_vma_gradient_inside(batch, one_device):
    """check_vma=False: JAX cannot type the loss as replicated; the gradient taken inside, as
    under pmap, is correct (replicated inputs' gradients summed over devices)."""
    z1, z2, labels, queue = batch
    grads_spec = (P(AXIS), P(AXIS), P())
    mapped = jax.shard_map(
        functools.partial(_every_variant, _per_device_grads_summed),
        mesh=_mesh(AxisType.Auto),
        in_specs=(P(AXIS), P(AXIS), P(AXIS), P()),
        out_specs={variant: (P(), grads_spec) for variant in VARIANTS},
        check_vma=False,
    )
    _assert_equal_to_one_device(jax.device_get(jax.jit(mapped)(z1, z2, labels, queue)), one_device)


def test_naive_gradient_outside_an_unchecked_shard_map_is_one_nth(batch):
    """What docs/parallelism.md warns about: with check_vma=False, shard_map cannot know the
    loss is replicated; its transpose hands each device 1/n of the output's cotangent, and the
    loss routes each device's gradient through its own share only."""
    z1, z2, labels, _ = batch
    hyper = {"beta": 1.5, "temperature": 0.4}

    def loss(a, b, y):
        return losses.hscl(a, b, y, axis_name=AXIS, **hyper)

    naive = jax.shard_map(
        loss,
        mesh=_mesh(AxisType.Auto),
        in_specs=(P(AXIS), P(AXIS), P(AXIS)),
        out_specs=P(),
        check_vma=False,
    )
    got = jax.jit(jax.grad(naive))(z1, z2, labels)
    want = jax.grad(lambda a: losses.hscl(a, z2, labels, **hyper))(z1)
    np.testing.assert_allclose(got * DEVICES, want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- jit over a mesh


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_jit_over_a_mesh(batch, one_device, axis_type):
    """Inputs sharded over the mesh's batch axis, no axis_name and no resharding by the user:
    Auto axes are partitioned by XLA, Explicit ones run the loss inside its own shard_map."""
    z1, z2, labels, queue = batch
    mesh = _mesh(axis_type)
    z1, z2, labels = (jax.device_put(x, NamedSharding(mesh, P(AXIS))) for x in (z1, z2, labels))
    queue = jax.device_put(queue, NamedSharding(mesh, P()))
    run = jax.jit(functools.partial(_every_variant, _value_and_grads))
    got = jax.device_get(run(z1, z2, labels, queue))
    _assert_equal_to_one_device(got, one_device)


# ----------------------------------------------------------------------------- pmap


def test_pmap(batch, one_device):
    z1, z2, labels, queue = batch

    def shard(x):
        return x.reshape((DEVICES, B // DEVICES) + x.shape[1:])

    mapped = jax.pmap(
        functools.partial(_every_variant, _per_device_grads_summed),
        axis_name=AXIS,
        in_axes=(0, 0, 0, None),
    )
    got = jax.device_get(mapped(shard(z1), shard(z2), shard(labels), queue))
    for variant, (values, (g1, g2, g_hyper)) in got.items():
        np.testing.assert_allclose(values, values[0], rtol=1e-6, err_msg=variant)
        got[variant] = (
            values[0],
            (g1.reshape(B, DIM), g2.reshape(B, DIM), jax.tree.map(lambda x: x[0], g_hyper)),
        )
    _assert_equal_to_one_device(got, one_device)


@pytest.mark.parametrize(
    "spec", [P((AXIS, "model")), P(AXIS, "model")], ids=["batch over both", "features split"]
)
def test_jit_over_a_two_axis_explicit_mesh(batch, one_device, spec):
    """The batch split over a tuple of Explicit axes (the kernel gets them as its axis_name), or
    over one axis with the features split over the other (gathered inside the loss)."""
    z1, z2, labels, queue = batch
    mesh = jax.make_mesh((4, 2), (AXIS, "model"), axis_types=(AxisType.Explicit,) * 2)
    z1, z2 = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (z1, z2))
    labels = jax.device_put(labels, NamedSharding(mesh, P(spec[0])))
    variants = ("hscl-dense-no queue", "hscl-blocked-queue")

    @jax.jit
    def run(z1, z2, labels, queue):
        return {v: _value_and_grads(v, z1, z2, labels, queue, _hyper(v)) for v in variants}

    got = jax.device_get(run(z1, z2, labels, queue))
    for variant in variants:
        _assert_equal_to_one_device({variant: got[variant]}, {variant: one_device[variant]})


def test_shard_map_aux_is_global_and_typed_replicated(batch):
    z1, z2, labels, _ = batch
    want = losses.hscl(z1, z2, labels, beta=1.5, return_aux=True)
    mapped = jax.shard_map(
        functools.partial(losses.hscl, beta=1.5, axis_name=AXIS, return_aux=True),
        mesh=_mesh(AxisType.Auto),
        in_specs=(P(AXIS), P(AXIS), P(AXIS)),
        out_specs=P(),
    )
    got = jax.jit(mapped)(z1, z2, labels)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)


def test_a_batch_replicated_over_the_axis_is_refused(batch):
    z1, z2, labels, _ = batch
    mapped = jax.shard_map(
        functools.partial(losses.hscl, beta=1.5, axis_name=AXIS),
        mesh=_mesh(AxisType.Auto),
        in_specs=(P(), P(), P()),
        out_specs=P(),
    )
    match = r"replicated over axis_name='data' .*in_specs=P\('data'\)"
    with pytest.raises(ValueError, match=match):
        jax.jit(mapped)(z1, z2, labels)
