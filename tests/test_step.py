"""Tests for hscl_jax.step: one step pmapped over 1 and 8 devices and under shard_map gives the
same update; build_step builds the trainer's step from a config; metrics come back to the host
stacked."""

import chex
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from hscl_jax import config as config_lib
from hscl_jax import data, losses, models, optim
from hscl_jax import step as step_lib


def _optim(**overrides):
    config = config_lib.base_config("digits").optim
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def first_steps():
    """One SGD step on the same global batch: pmap over 1 device, over 8 devices, shard_map."""
    model = models.create_model(
        "small_cnn", width=4, head_hidden_dim=16, projection_dim=8, bn_axis_name=step_lib.AXIS_NAME
    )
    # Plain SGD: the update is -lr * gradient, so a gradient off by the device count shows
    # (Adam's first step is scale-invariant and would hide psum versus pmean).
    tx, _ = optim.create_optimizer(_optim(name="sgd", learning_rate=0.5, momentum=0.0), 10)
    state = step_lib.create_train_state(jax.random.key(0), model, tx, (8, 8, 1))
    rng = np.random.default_rng(0)
    aug = data.augmentation_for(data.default_data_config("digits"))
    images = rng.integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)
    global_batch = data.train_batch(images, rng.integers(0, 3, size=16), aug)
    loss_kwargs = {"beta": 1.0}

    def pmapped(num_devices):
        devices = jax.devices()[:num_devices]
        step = step_lib.make_pmap_train_step(
            model, tx, "hscl", loss_kwargs, devices, augmentation=aug
        )
        batch = jax.tree.map(lambda x: x.reshape(num_devices, -1, *x.shape[1:]), global_batch)
        new_state, metrics = step(step_lib.replicate(state, devices), batch)
        return jax.device_get((new_state, metrics))

    mesh = Mesh(np.array(jax.devices()), (step_lib.AXIS_NAME,))
    sharded_step = step_lib.make_shard_map_train_step(
        model, tx, "hscl", loss_kwargs, mesh, augmentation=aug
    )
    sharded = jax.device_get(sharded_step(state, global_batch))
    return {
        "initial": jax.device_get(state),
        "one": pmapped(1),
        "eight": pmapped(8),
        "shard_map": sharded,
    }


def test_pmap_over_8_devices_equals_one_device_update(first_steps):
    initial = first_steps["initial"]
    one_state, one_metrics = first_steps["one"]
    eight_state, eight_metrics = first_steps["eight"]
    one = jax.tree.map(lambda x: x[0], one_state)
    update = jax.tree.map(lambda new, old: new - old, one.params, initial.params)
    assert max(float(np.abs(u).max()) for u in jax.tree.leaves(update)) > 1e-2
    for device in range(8):
        eight = jax.tree.map(lambda x, d=device: x[d], eight_state)
        chex.assert_trees_all_close(eight.params, one.params, atol=2e-6, rtol=1e-5)
        chex.assert_trees_all_close(eight.batch_stats, one.batch_stats, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(eight_metrics["loss"], one_metrics["loss"][0], rtol=1e-5)
    np.testing.assert_allclose(eight_metrics["num_anchors"], 32.0)
    assert int(one.step) == 1 and float(one_metrics["finite"][0]) == 1.0


def test_shard_map_gives_the_pmap_update(first_steps):
    sharded_state, sharded_metrics = first_steps["shard_map"]
    eight_state, eight_metrics = first_steps["eight"]
    eight = jax.tree.map(lambda x: x[0], eight_state)
    chex.assert_trees_all_close(sharded_state.params, eight.params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(sharded_state.batch_stats, eight.batch_stats, atol=1e-6)
    np.testing.assert_allclose(sharded_metrics["loss"], eight_metrics["loss"][0], rtol=1e-6)


def test_build_step_makes_the_trainers_step_from_a_config(tiny_digits_config):
    pytest.importorskip("tensorflow_datasets", reason="the digits batch needs the [data] extra")
    config = tiny_digits_config(num_steps=3)
    config.theory.enabled = True
    devices = jax.local_devices()[:1]
    built = step_lib.build_step(config, devices)
    assert built.total_steps == 3 and built.input_shape == (8, 8, 1)
    assert built.loss_options == losses.options_from_config(config.loss)
    assert built.theory_options == {"beta": 1.0, "temperature": 0.5}
    assert built.devices == tuple(devices)
    state = step_lib.replicate(built.init_state(), devices)
    batch = next(
        data.train_iterator(config.data, global_batch_size=16, seed=0, num_local_devices=1)
    )
    state, metrics = built.train_step(state, batch)
    host = step_lib.first_replica_to_host(metrics)
    assert int(step_lib.first_replica_to_host(state.step)) == 1
    assert host["finite"] == 1.0 and np.isfinite(host["loss"]) and "hscl_le_hucl" in host


def test_stack_first_replicas_to_host_stacks_steps_in_order():
    devices = jax.devices()[:2]
    trees = [
        step_lib.replicate({"loss": np.float32(i), "aux": {"n": np.float32(10 * i)}}, devices)
        for i in range(3)
    ]
    stacked = step_lib.stack_first_replicas_to_host(trees)
    assert isinstance(stacked["loss"], np.ndarray)
    np.testing.assert_array_equal(stacked["loss"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(stacked["aux"]["n"], [0.0, 10.0, 20.0])


def test_augmenting_step_on_8_devices_equals_one_device(tiny_digits_config):
    """The step augments the shipped uint8 batch itself; spread over 8 devices it makes the
    update of 1 device."""
    pytest.importorskip("tensorflow_datasets", reason="the digits batch needs the [data] extra")

    def first_step(num_devices):
        config = tiny_digits_config(num_steps=3)
        config.data.augmentation.update({"flip": True, "blur": True, "color_jitter": True})
        config.data.augmentation.update({"saturation": 0.0, "hue": 0.0})
        devices = jax.local_devices()[:num_devices]
        built = step_lib.build_step(config, devices)
        batch = next(
            data.train_iterator(
                config.data, global_batch_size=16, seed=0, num_local_devices=num_devices
            )
        )
        state = step_lib.replicate(built.init_state(), devices)
        initial = step_lib.first_replica_to_host(state)
        state, metrics = built.train_step(state, batch)
        return initial, jax.device_get(state), jax.device_get(metrics)

    initial, one_state, one_metrics = first_step(1)
    _, eight_state, eight_metrics = first_step(8)
    one = jax.tree.map(lambda x: x[0], one_state)
    update = jax.tree.map(lambda new, old: new - old, one.params, initial.params)
    assert max(float(np.abs(u).max()) for u in jax.tree.leaves(update)) > 1e-4
    for device in range(8):
        eight = jax.tree.map(lambda x, d=device: x[d], eight_state)
        chex.assert_trees_all_close(eight.params, one.params, atol=2e-6, rtol=1e-5)
        chex.assert_trees_all_close(eight.batch_stats, one.batch_stats, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(eight_metrics["loss"], one_metrics["loss"][0], rtol=1e-5)
