"""Small embedding batches and comparisons shared by the loss tests."""

import chex
import jax.numpy as jnp
import numpy as np


def unit(x):
    """Rows of ``x`` divided by their L2 norm."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def batch(seed, size, dim, num_classes):
    """(z1, z2, labels): unit rows, z2 a noisy copy of z1, float32; int32 labels."""
    rng = np.random.default_rng(seed)
    z1 = unit(rng.normal(size=(size, dim)))
    z2 = unit(z1 + 0.5 * rng.normal(size=(size, dim)))
    labels = rng.integers(0, num_classes, size=size).astype(np.int32)
    return jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), jnp.asarray(labels)


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    """Equal values and gradients: a and b are (value, (grad_z1, grad_z2))."""
    np.testing.assert_allclose(a[0], b[0], rtol=rtol, atol=atol)
    chex.assert_trees_all_close(a[1], b[1], rtol=1e-4, atol=atol)
