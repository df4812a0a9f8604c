"""Opt-in handling of raw embeddings: ``normalize=True`` and ``check_inputs=True``."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from hscl_jax import losses


def _batch(seed=0, batch=8, dim=6):
    rng = np.random.default_rng(seed)
    z1, z2 = (rng.normal(size=(batch, dim)) for _ in range(2))
    z1, z2 = (z / np.linalg.norm(z, axis=1, keepdims=True) for z in (z1, z2))
    labels = np.arange(batch) % 3
    return jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), jnp.asarray(labels)


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_normalize_gives_the_loss_of_the_unit_rows_and_its_gradient(name):
    z1, z2, labels = _batch()
    scale = jnp.asarray(np.random.default_rng(1).uniform(0.1, 10.0, size=(8, 1)), jnp.float32)
    options = {"beta": 1.0} if name in ("hscl", "hucl") else {}

    def normalized_inside(a, b):
        return losses.compute(name, a, b, labels, normalize=True, **options)

    def normalized_outside(a, b):
        def unit(x):
            return x / jnp.linalg.norm(x, axis=1, keepdims=True)

        return losses.compute(name, unit(a), unit(b), labels, **options)

    got = jax.value_and_grad(normalized_inside, argnums=(0, 1))(z1 * scale, z2 * scale)
    want = jax.value_and_grad(normalized_outside, argnums=(0, 1))(z1 * scale, z2 * scale)
    np.testing.assert_allclose(got[0], losses.compute(name, z1, z2, labels, **options), rtol=1e-5)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)


def test_normalize_of_a_zero_row_has_finite_gradients():
    z1, z2, labels = _batch()
    z1 = z1.at[0].set(0.0)
    grads = jax.grad(lambda a: losses.hscl(a, z2, labels, beta=1.0, normalize=True, block_size=4))(
        z1
    )
    assert np.all(np.isfinite(grads))


def test_the_default_path_compiles_exactly_as_without_the_options():
    z1, z2, labels = _batch()

    def lowered(**options):
        fn = jax.jit(lambda a, b: losses.hscl(a, b, labels, beta=1.0, **options))
        return fn.lower(z1, z2).as_text()

    default = lowered()
    assert default == lowered(normalize=False, check_inputs=False)
    assert default != lowered(normalize=True)


def test_check_inputs_names_non_unit_rows_and_non_finite_values_in_one_line():
    z1, z2, labels = _batch()
    assert np.isfinite(losses.hscl(z1, z2, labels, beta=1.0, check_inputs=True))
    bad1 = z1.at[2].multiply(10.0).at[5].multiply(0.5)
    bad2 = z2.at[3, 1].set(jnp.nan)
    with pytest.raises(ValueError) as error:
        losses.hscl(bad1, bad2, labels, beta=1.0, check_inputs=True)
    message = str(error.value)
    assert "\n" not in message
    assert "z1 rows 2 (norm 10), 5 (norm 0.5) are not of unit norm" in message
    assert "z2 has non-finite values in rows 3" in message
    assert message.endswith("pass normalize=True")
    # normalize=True takes any norm, never a NaN.
    assert np.isfinite(losses.hscl(bad1, z2, labels, beta=1.0, normalize=True, check_inputs=True))
    with pytest.raises(ValueError, match=r"^check_inputs: z2 has non-finite values in rows 3$"):
        losses.hscl(z1, bad2, labels, beta=1.0, normalize=True, check_inputs=True)
    views = jnp.stack([z1, z2.at[4].set(jnp.inf)], axis=1)
    with pytest.raises(ValueError, match=r"z\[:, 1\] has non-finite values in rows 4"):
        losses.ucl(views, check_inputs=True)


def test_check_inputs_under_jit_are_checkify_checks():
    z1, z2, labels = _batch()

    def loss(a, b):
        return losses.hscl(a, b, labels, beta=1.0, check_inputs=True)

    with pytest.raises(ValueError, match="checkify"):
        jax.jit(loss)(z1, z2)
    checked = jax.jit(checkify.checkify(loss))
    error, value = checked(z1, z2)
    assert error.get() is None and np.isfinite(value)
    error, _ = checked(z1.at[6].multiply(3.0), z2)
    assert "check_inputs: z1 row 6 has norm 3" in error.get()
    error, _ = checked(z1, z2.at[1, 0].set(jnp.nan))
    assert "check_inputs: z2 has non-finite values (first in row 1)" in error.get()
