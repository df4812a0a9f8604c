"""Tests for hscl_jax.optim: the reference Adam's coupled weight decay, the decay mask, SGD, LARS
and the learning-rate schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hscl_jax import config as config_lib
from hscl_jax import optim


def _optim(**overrides):
    config = config_lib.base_config("digits").optim
    for key, value in overrides.items():
        config[key] = value
    return config


def test_reference_adam_adds_weight_decay_to_the_gradient():
    # g = -0.5, decay term wd * p = +1: coupled L2 gives g' = +0.5, so Adam's first step is -lr;
    # decoupled AdamW would step by -lr * (sign(g) + wd * p) = 0.
    params = {"w": jnp.array([2.0])}
    grads = {"w": jnp.array([-0.5])}
    for name, expected in (("adam", -0.1), ("adamw", 0.0)):
        tx, _ = optim.create_optimizer(_optim(name=name, learning_rate=0.1, weight_decay=0.5), 10)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], [expected], rtol=1e-4, atol=1e-5)


def test_weight_decay_mask_and_sgd():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    optim_config = _optim(name="sgd", learning_rate=1.0, weight_decay=0.1, momentum=0.0)
    for on_bn_and_bias, bias_update in ((True, -0.1), (False, 0.0)):
        optim_config.weight_decay_on_bn_and_bias = on_bn_and_bias
        tx, _ = optim.create_optimizer(optim_config, 10)
        updates, _ = tx.update(zero_grads, tx.init(params), params)
        np.testing.assert_allclose(updates["kernel"], -0.1, rtol=1e-4)
        np.testing.assert_allclose(updates["bias"], bias_update, rtol=1e-4, atol=1e-5)


def test_schedules():
    _, constant = optim.create_optimizer(_optim(), 100)
    assert float(constant(0)) == pytest.approx(1e-3, rel=1e-4)
    assert float(constant(99)) == pytest.approx(1e-3, rel=1e-4)
    optim_config = _optim(
        name="lars",
        learning_rate=2.0,
        schedule="warmup_cosine",
        warmup_steps=10,
        final_lr_fraction=0.1,
    )
    tx, schedule = optim.create_optimizer(optim_config, 110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(1.0, rel=1e-4)
    assert float(schedule(10)) == pytest.approx(2.0, rel=1e-4)
    assert float(schedule(60)) == pytest.approx(0.2 + 1.8 * 0.5, rel=1e-4)
    assert float(schedule(110)) == pytest.approx(0.2, rel=1e-4)
    params = {"kernel": jnp.ones((3, 3))}
    updates, _ = tx.update(params, tx.init(params), params)  # LARS runs
    assert np.all(np.isfinite(updates["kernel"]))


def test_unknown_optimizer_is_one_line():
    with pytest.raises(ValueError, match="optimizer 'rmsprop' is unknown; allowed: adam, adamw"):
        optim.create_optimizer(_optim(name="rmsprop"), 10)
