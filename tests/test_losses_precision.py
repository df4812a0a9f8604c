"""float32 gradients of the tilted losses against float64, at large beta.

Relative error, norm-wise: ``||g32 - g64||_2 / ||g64||_2``, with g the gradients with respect to
z1 and z2 flattened into one vector, g32 computed from float32 inputs and g64 from the same
inputs cast to float64 (so the inputs' own rounding is not counted).
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hscl_jax import losses

TOLERANCE = 1e-3


def _random_unit_batch(seed: int):
    """A 16 x 32 random unit batch, labels arange(16) % 4."""
    rng = np.random.default_rng(seed)
    z1, z2 = (rng.normal(size=(16, 32)) for _ in range(2))
    z1, z2 = (z / np.linalg.norm(z, axis=1, keepdims=True) for z in (z1, z2))
    return z1.astype(np.float32), z2.astype(np.float32), (np.arange(16) % 4).astype(np.int32)


@functools.cache
def _gradient_fn(name: str, block_size):
    @jax.jit
    def flat_grads(z1, z2, labels, beta, temperature):
        def fn(a, b):
            return losses.compute(
                name, a, b, labels, beta=beta, temperature=temperature, block_size=block_size
            )

        return jnp.concatenate([g.ravel() for g in jax.grad(fn, argnums=(0, 1))(z1, z2)])

    return flat_grads


def _relative_error(name, z1, z2, labels, beta, temperature, block_size) -> float:
    grad = _gradient_fn(name, block_size)
    g32 = grad(z1, z2, labels, np.float32(beta), np.float32(temperature))
    assert g32.dtype == jnp.float32
    with jax.enable_x64(True):
        wide = (jnp.asarray(z, jnp.float64) for z in (z1, z2))
        g64 = grad(*wide, labels, np.float64(beta), np.float64(temperature))
        assert g64.dtype == jnp.float64
        g64 = np.asarray(g64)
    g32 = np.asarray(g32, np.float64)
    return float(np.linalg.norm(g32 - g64) / np.linalg.norm(g64))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    beta=st.floats(0.0, 200.0),
    temperature=st.floats(0.05, 1.0),
    name=st.sampled_from(["hscl", "hucl"]),
)
@example(seed=0, beta=200.0, temperature=0.05, name="hscl")  # 1.2e-2 dense before the fix
@example(seed=1, beta=50.0, temperature=0.05, name="hscl")  # 1.1e-3 blocked before the fix
def test_float32_gradients_match_float64_up_to_beta_200(seed, beta, temperature, name):
    z1, z2, labels = _random_unit_batch(seed)
    for block_size in (None, 8):
        error = _relative_error(name, z1, z2, labels, beta, temperature, block_size)
        assert error <= TOLERANCE, (block_size, error)


def _bench_losses():
    """bench/losses.py, where the worst-case batch of the float32 limit is built."""
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "losses.py"
    spec = importlib.util.spec_from_file_location("bench_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_float32_beta_limit_bounds_the_worst_case(temperature):
    """At float32_beta_limit the collapsed worst case is within the tolerance; at 10x the limit
    it is not (float32 really breaks down there, so the limit is not arbitrary)."""
    bench = _bench_losses()
    limit = losses.float32_beta_limit(temperature)
    assert limit == min(3000 * temperature, 600)
    for factor, within in ((1.0, True), (10.0, False)):
        beta = factor * limit
        batch = bench.collapsed_batch(0, 32, 32, 4, temperature, beta, spread=0.3)
        for block_size in (None, 8):
            error = bench.float32_relative_error(*batch, beta, temperature, block_size)
            assert (error <= TOLERANCE) == within, (factor, block_size, error)


def test_float32_beta_limit_rejects_a_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be .*> 0.*0.0"):
        losses.float32_beta_limit(0.0)
