"""Tests for hscl_jax.step and the mapping of hscl_jax.distributed.Parallelism: one step on 8
devices, on a mesh and under pmap, gives the update of 1 device (the step augments its uint8
batch itself, every op on); build_step builds the trainer's step from a config; replicated trees
come back to the host without a device axis."""

import chex
import jax
import numpy as np
import pytest

from hscl_jax import config as config_lib
from hscl_jax import data, distributed, losses, models, optim, theory
from hscl_jax import step as step_lib

# float32 results of differently partitioned programs agree to rounding, not bit for bit.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def _optim(**overrides):
    config = config_lib.base_config("digits").optim
    for key, value in overrides.items():
        config[key] = value
    return config


def _per_device(tree, num_local_devices):
    """A global batch as a process's data.train_iterator yields it: (devices, b, ...)."""
    return jax.tree.map(lambda x: x.reshape(num_local_devices, -1, *x.shape[1:]), tree)


@pytest.fixture(scope="module")
def first_steps():
    """One SGD step on the same uint8 global batch, which the step augments itself with every
    op on, with the theory monitor's metrics: on a mesh of 1 and of 8 devices, pmap over 8."""
    model = models.create_model(
        "small_cnn", width=4, head_hidden_dim=16, projection_dim=8, bn_axis_name=step_lib.AXIS_NAME
    )
    # Plain SGD: the update is -lr * gradient, so a gradient off by the device count shows
    # (Adam's first step is scale-invariant and would hide psum versus pmean).
    tx, _ = optim.create_optimizer(_optim(name="sgd", learning_rate=0.5, momentum=0.0), 10)
    state = step_lib.create_train_state(jax.random.key(0), model, tx, (8, 8, 1))
    rng = np.random.default_rng(0)
    data_config = data.default_data_config("digits")
    data_config.augmentation.update({"flip": True, "blur": True, "color_jitter": True})
    data_config.augmentation.update({"saturation": 0.0, "hue": 0.0})
    aug = data.augmentation_for(data_config)
    images = rng.integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)
    global_batch = data.train_batch(images, rng.integers(0, 3, size=16), aug)

    def first_step(kind, num_devices):
        parallel = distributed.Parallelism(kind, jax.devices()[:num_devices])
        step = step_lib.make_train_step(
            parallel,
            model=model,
            tx=tx,
            loss_name="hscl",
            loss_kwargs={"beta": 1.0},
            augmentation=aug,
            theory_kwargs={"beta": 1.0, "temperature": 0.5},
        )
        batch = parallel.put_batch(_per_device(global_batch, num_devices))
        new_state, metrics = step(parallel.replicate(state), batch)
        return parallel.to_host((new_state, metrics))

    return {
        "initial": jax.device_get(state),
        "one": first_step("mesh", 1),
        "mesh": first_step("mesh", 8),
        "pmap": first_step("pmap", 8),
    }


@pytest.mark.parametrize("kind", ["mesh", "pmap"])
def test_8_devices_give_the_update_of_one_device(first_steps, kind):
    one_state, one_metrics = first_steps["one"]
    state, metrics = first_steps[kind]
    update = jax.tree.map(
        lambda new, old: new - old, one_state.params, first_steps["initial"].params
    )
    assert max(float(np.abs(u).max()) for u in jax.tree.leaves(update)) > 1e-2
    chex.assert_trees_all_close(state.params, one_state.params, **TOLERANCE)
    chex.assert_trees_all_close(state.batch_stats, one_state.batch_stats, **TOLERANCE)
    assert set(metrics) == set(one_metrics) and set(theory.THEORY_KEYS) <= set(metrics)
    for name, value in one_metrics.items():  # the loss, its aux and the theory monitor
        np.testing.assert_allclose(metrics[name], value, **TOLERANCE, err_msg=name)
    assert metrics["num_anchors"] == 32.0  # 16 images x 2 views, from all 8 devices
    assert int(state.step) == 1 and metrics["finite"] == 1.0


def test_the_mesh_state_is_replicated_by_sharding_without_a_device_axis():
    parallel = distributed.Parallelism("mesh", jax.devices())
    tree = parallel.replicate({"w": np.arange(6.0).reshape(2, 3)})
    assert tree["w"].shape == (2, 3)
    assert tree["w"].sharding.is_fully_replicated and len(tree["w"].sharding.device_set) == 8
    batch = parallel.put_batch({"x": np.arange(16.0).reshape(8, 2)})
    assert batch["x"].shape == (16,) and len(batch["x"].addressable_shards) == 8
    np.testing.assert_array_equal(parallel.local_rows(batch["x"]), np.arange(16.0))
    with pytest.raises(ValueError, match=r"parallelism='gspmd' is unknown; allowed: mesh, pmap"):
        distributed.Parallelism("gspmd", jax.devices())


@pytest.mark.parametrize("kind", ["mesh", "pmap"])
def test_stack_to_host_stacks_steps_in_order(kind):
    parallel = distributed.Parallelism(kind, jax.devices()[:2])
    trees = [
        parallel.replicate({"loss": np.float32(i), "aux": {"n": np.float32(10 * i)}})
        for i in range(3)
    ]
    stacked = parallel.stack_to_host(trees)
    assert isinstance(stacked["loss"], np.ndarray)
    np.testing.assert_array_equal(stacked["loss"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(stacked["aux"]["n"], [0.0, 10.0, 20.0])
    assert parallel.to_host(trees[2])["aux"]["n"] == 20.0


def test_build_step_makes_the_trainers_step_from_a_config(tiny_digits_config):
    pytest.importorskip("tensorflow_datasets", reason="the digits batch needs the [data] extra")

    config = tiny_digits_config(num_steps=3)
    config.theory.enabled = True
    devices = jax.local_devices()[:1]
    built = step_lib.build_step(config, devices)
    assert built.total_steps == 3 and built.input_shape == (8, 8, 1)
    assert built.loss_options == losses.options_from_config(config.loss)
    assert built.theory_options == {"beta": 1.0, "temperature": 0.5}
    assert built.parallel == distributed.Parallelism("mesh", devices)
    state = built.parallel.replicate(built.init_state())
    batch = next(
        data.train_iterator(config.data, global_batch_size=16, seed=0, num_local_devices=1)
    )
    state, metrics = built.train_step(state, built.parallel.put_batch(batch))
    host = built.parallel.to_host(metrics)
    assert int(built.parallel.to_host(state.step)) == 1
    assert host["finite"] == 1.0 and np.isfinite(host["loss"]) and "hscl_le_hucl" in host
