"""Tests for the labelled queue (a hscl_jax.losses.Queue in the train state) and the momentum
encoder of hscl_jax.step: config checks, the unchanged step without a queue, 8 devices (mesh and
pmap) == 1 device, warm-up (empty and partly filled queues) and exact resume across a checkpoint.
The queue value's own FIFO behaviour is tested in tests/test_losses_queue.py."""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hscl_jax import checkpoints, data, distributed, losses, metrics, models, optim, theory, trainer
from hscl_jax import config as config_lib
from hscl_jax import step as step_lib

DIGITS_AUGMENTATION = data.augmentation_for(data.default_data_config("digits"))


def test_momentum_update_is_the_ema_of_params_and_batch_stats():
    online = {"params": {"w": jnp.full((2,), 1.0)}, "batch_stats": {"m": jnp.full((2,), 3.0)}}
    momentum = {"params": {"w": jnp.zeros((2,))}, "batch_stats": {"m": jnp.ones((2,))}}
    updated = step_lib.momentum_update(online, momentum, 0.9)
    np.testing.assert_allclose(updated["params"]["w"], 0.1)
    np.testing.assert_allclose(updated["batch_stats"]["m"], 0.9 + 0.3)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("size", -1, "config.queue.size=-1 must be an integer >= 0"),
        ("size", 2.5, "config.queue.size=2.5 must be an integer >= 0"),
        ("momentum", 1.0, r"config.queue.momentum=1.0 must be a number in \[0, 1\)"),
        ("momentum", -0.1, r"config.queue.momentum=-0.1 must be a number in \[0, 1\)"),
        ("as_positives", "yes", "config.queue.as_positives='yes' must be True or False"),
        ("q", "always", "config.queue.q='always' is unknown; allowed: fixed, grows"),
    ],
)
def test_bad_queue_values_are_rejected_with_one_line(field, value, match, tiny_digits_config):
    config = tiny_digits_config()
    config.queue.size = 64
    config_lib.validate_config(config)
    with config.queue.ignore_type():
        config.queue[field] = value
    with pytest.raises(config_lib.ConfigError, match=match) as error:
        config_lib.validate_config(config)
    assert "\n" not in str(error.value)


def test_queue_positives_need_a_supervised_loss(tiny_digits_config):
    config = tiny_digits_config()
    config.queue.size, config.queue.as_positives = 64, True
    config.loss.name = "hucl"
    with pytest.raises(config_lib.ConfigError, match="as_positives=True needs labels.*'hucl'"):
        config_lib.validate_config(config)
    assert config_lib.queue_options(tiny_digits_config()) is None
    config.loss.name = "hscl"
    options = config_lib.queue_options(config)
    assert options["size"] == 64 and options["momentum"] == config.queue.momentum
    assert options["loss_kwargs"] == {"queue_as_positives": True, "queue_q": "fixed"}
    config.loss.name = "supcon"  # SupCon has no Q
    assert config_lib.queue_options(config)["loss_kwargs"] == {"queue_as_positives": True}


def _first_step(config, *, without_queue_options=False):
    """The host state after one step of ``config``'s built step on one device, on random images;
    ``without_queue_options``: of the same model, optimiser and loss assembled with no queue
    setting at all instead."""
    built = step_lib.build_step(config, jax.local_devices()[:1])
    step = built.train_step
    if without_queue_options:
        step = step_lib.make_train_step(
            built.parallel,
            model=built.model,
            tx=built.tx,
            loss_name=config.loss.name,
            loss_kwargs=losses.options_from_config(config.loss),
            augmentation=DIGITS_AUGMENTATION,
        )
    size = config.global_batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(size, *built.input_shape), dtype=np.uint8)
    batch = data.train_batch(images, rng.integers(0, 3, size=size), DIGITS_AUGMENTATION)
    batch = jax.tree.map(lambda x: x[None], batch)
    state, _ = step(built.parallel.replicate(built.init_state()), built.parallel.put_batch(batch))
    return built.parallel.to_host(state)


def test_queue_size_0_gives_exactly_the_step_without_a_queue(tiny_digits_config):
    off = tiny_digits_config()
    assert off.queue.size == 0
    # Settings that would change a step with a queue; at size 0 they must change nothing.
    off.queue.as_positives, off.queue.q, off.queue.momentum = True, "grows", 0.5
    state_off = _first_step(off)
    assert state_off.queue is None and state_off.momentum is None
    assert set(state_off.to_dict()) == {"step", "params", "batch_stats", "opt_state"}
    plain = _first_step(tiny_digits_config(), without_queue_options=True)
    chex.assert_trees_all_equal(state_off.to_dict(), plain.to_dict())
    on = tiny_digits_config()
    on.queue.size = 32
    state_on = _first_step(on)
    assert set(state_on.to_dict()) == {*state_off.to_dict(), "queue", "momentum"}
    assert isinstance(state_on.queue, losses.Queue)
    assert int(state_on.queue.valid.sum()) == 16


# ----------------------------------------------------------------------------- with the loss


def _global_batches(num_steps, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        data.train_batch(
            rng.integers(0, 256, size=(batch, 8, 8, 1), dtype=np.uint8),
            rng.integers(0, 3, size=batch),
            DIGITS_AUGMENTATION,
            step=step,
        )
        for step in range(num_steps)
    ]


def _tiny_model_and_sgd():
    model = models.create_model(
        "small_cnn", width=4, head_hidden_dim=16, projection_dim=8, bn_axis_name=step_lib.AXIS_NAME
    )
    optim_config = config_lib.base_config("digits").optim
    optim_config.name, optim_config.learning_rate, optim_config.momentum = "sgd", 0.5, 0.0
    tx, _ = optim.create_optimizer(optim_config, 10)
    return model, tx


@functools.cache
def _step(num_devices, parallelism, with_queue):
    """The mapped step (one per arguments: later calls reuse its compilations)."""
    model, tx = _tiny_model_and_sgd()
    parallel = distributed.Parallelism(parallelism, jax.devices()[:num_devices])
    step = step_lib.make_train_step(
        parallel,
        model=model,
        tx=tx,
        loss_name="hscl",
        loss_kwargs={"beta": 1.0},
        augmentation=DIGITS_AUGMENTATION,
        queue_momentum=0.5 if with_queue else None,
    )
    return parallel, step


def _run_steps(state, batches, num_devices, parallelism="mesh"):
    """The host states after each of ``batches`` (over ``num_devices``) and the metrics."""
    parallel, step = _step(num_devices, parallelism, state.queue is not None)
    replicated = parallel.replicate(state)
    states, all_metrics = [], []
    for batch in batches:
        sharded = jax.tree.map(lambda x: x.reshape(num_devices, -1, *x.shape[1:]), batch)
        replicated, metrics = step(replicated, parallel.put_batch(sharded))
        states.append(parallel.to_host(replicated))
        all_metrics.append(parallel.to_host(metrics))
    if state.queue is not None:
        # The pushed keys are all-gathered, so every device holds the same queue and momentum
        # encoder (the step's out_specs declare them replicated; nothing else checks it).
        for leaf in jax.tree.leaves((replicated.queue, replicated.momentum)):
            copies = [np.asarray(shard.data) for shard in leaf.addressable_shards]
            assert len(copies) == num_devices
            for copy in copies[1:]:
                np.testing.assert_array_equal(copy, copies[0])
    return states, all_metrics


def _initial_state(queue_size):
    model, tx = _tiny_model_and_sgd()
    return step_lib.create_train_state(jax.random.key(0), model, tx, (8, 8, 1), queue_size)


@pytest.mark.parametrize("parallelism", ["mesh", "pmap"])
def test_queue_over_8_devices_equals_one_device(parallelism):
    batches = _global_batches(3)
    # 40 rows: the third batch of 16 wraps around and drops the oldest rows.
    one_states, one_metrics = _run_steps(_initial_state(40), batches, 1)
    eight_states, eight_metrics = _run_steps(_initial_state(40), batches, 8, parallelism)
    one, eight = one_states[-1], eight_states[-1]
    assert one.queue.valid.all() and eight.queue.valid.all()
    # The queue holds the last global batches' labels, newest first.
    expected_labels = np.concatenate([b["label"] for b in batches[::-1]])[:40]
    np.testing.assert_array_equal(one.queue.labels, expected_labels)
    np.testing.assert_array_equal(eight.queue.labels, expected_labels)
    # float32 results of differently partitioned programs agree to rounding, after 3 steps.
    tolerance = {"rtol": 1e-4, "atol": 1e-5}
    chex.assert_trees_all_close(eight.params, one.params, **tolerance)
    chex.assert_trees_all_close(eight.momentum, one.momentum, **tolerance)
    chex.assert_trees_all_close(eight.queue.z, one.queue.z, **tolerance)
    for one_m, eight_m in zip(one_metrics, eight_metrics, strict=True):
        np.testing.assert_allclose(eight_m["loss"], one_m["loss"], rtol=1e-4)


def test_warm_up_empty_queue_gives_the_batch_loss_and_unfilled_rows_are_masked():
    batches = _global_batches(2)
    _, plain_metrics = _run_steps(_initial_state(0), batches, 1)
    states, queue_metrics = _run_steps(_initial_state(64), batches[:1], 1)
    # Step 0: nothing is queued yet, so the loss is the batch-only loss.
    np.testing.assert_allclose(queue_metrics[0]["loss"], plain_metrics[0]["loss"], rtol=1e-4)
    # After one step 16 of 64 rows are filled. The step-1 loss must equal that of the same state
    # with a queue of exactly those 16 rows: the 48 unfilled (zero) rows are never contrasted.
    after_one = states[0]
    np.testing.assert_array_equal(after_one.queue.valid, np.arange(64) < 16)
    trimmed = after_one.replace(queue=jax.tree.map(lambda x: x[:16], after_one.queue))
    assert trimmed.queue.valid.all()
    _, partly_filled = _run_steps(after_one, batches[1:], 1)
    _, exactly_full = _run_steps(trimmed, batches[1:], 1)
    np.testing.assert_allclose(partly_filled[0]["loss"], exactly_full[0]["loss"], rtol=1e-4)
    # ... and the queued keys do change the loss.
    change = float(partly_filled[0]["loss"]) - float(plain_metrics[1]["loss"])
    assert abs(change) > 1e-2, change


@pytest.mark.slow
def test_resume_with_a_partly_filled_queue_equals_the_uninterrupted_run(
    tmp_path, tiny_digits_config
):
    def config(num_steps):
        c = tiny_digits_config(num_steps=num_steps, checkpoint_every_steps=2)
        c.queue.size, c.queue.momentum = 48, 0.9  # batch 16: 32 of 48 rows filled at step 2
        return c

    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    trainer.train_and_evaluate(config(4), whole)
    trainer.train_and_evaluate(config(2), split)
    manager = checkpoints.checkpoint_manager(split)
    template = jax.device_get(step_lib.build_step(config(2), jax.devices()[:1]).init_state())
    at_two, _ = checkpoints.restore_checkpoint(manager, 2, template.to_dict())
    manager.close()
    assert isinstance(at_two["queue"], losses.Queue)
    assert int(at_two["queue"].valid.sum()) == 32
    trainer.train_and_evaluate(config(4), split)  # resumes from step 2

    def final_state(workdir):
        manager = checkpoints.checkpoint_manager(workdir)
        state, _ = checkpoints.restore_checkpoint(manager, 4, template.to_dict())
        manager.close()
        return state

    assert os.path.isdir(os.path.join(split, "checkpoints", "4"))
    expected, resumed = final_state(whole), final_state(split)
    assert resumed["queue"].valid.all()
    chex.assert_trees_all_close(resumed, expected, atol=0, rtol=0)


# ----------------------------------------------------------------------------- N -> infinity view


def _unit(rng, n, dim=8):
    z = rng.normal(size=(n, dim))
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("beta", [0.0, 1.0, 3.0])
def test_hscl_against_the_batch_views_is_the_partner_hscl_loss(beta):
    rng = np.random.default_rng(int(beta))
    z1, z2 = _unit(rng, 12), _unit(rng, 12)
    labels = rng.integers(0, 3, size=12).astype(np.int32)
    views, view_labels = np.concatenate([z1, z2]), np.concatenate([labels, labels])
    value = theory.hscl_against_negatives(z1, z2, labels, views, view_labels, beta=beta)
    expected = losses.hscl(z1, z2, labels, beta=beta, positives="partner")
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    # Rows marked invalid are not negatives: invalid extra rows change nothing.
    extra = _unit(rng, 5)
    padded = theory.hscl_against_negatives(
        z1,
        z2,
        labels,
        np.concatenate([views, extra]),
        np.concatenate([view_labels, np.full(5, 9, np.int32)]),
        np.concatenate([np.ones(24, bool), np.zeros(5, bool)]),
        beta=beta,
    )
    np.testing.assert_allclose(padded, expected, rtol=1e-5)


def test_negative_set_estimates_approach_the_reference_as_the_queue_grows():
    rng = np.random.default_rng(0)
    num_classes, dim = 4, 8
    centres = _unit(rng, num_classes, dim)

    def sample(n):
        labels = rng.integers(0, num_classes, size=n).astype(np.int32)
        z = centres[labels] + 0.8 * rng.normal(size=(n, dim))
        return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32), labels

    (z1, labels), (reference, reference_labels) = sample(6), sample(8192)
    z2 = z1 + 0.1 * rng.normal(size=z1.shape).astype(np.float32)
    z2 /= np.linalg.norm(z2, axis=1, keepdims=True)
    queue_keys, queue_labels = sample(4096)
    estimates = theory.negative_set_estimates(
        z1,
        z2,
        labels,
        reference,
        reference_labels,
        beta=2.0,
        queue_keys=queue_keys,
        queue_labels=queue_labels,
        queue_count=4096,
    )
    assert theory.queue_prefix_sizes(4096) == (0, 512, 1024, 2048, 4096)
    gaps = [abs(estimates["gap_batch"])] + [
        abs(estimates[f"gap_queue_{k}"]) for k in (512, 1024, 2048, 4096)
    ]
    assert gaps[-1] < 0.2 * gaps[0], gaps
    assert estimates["gap_queue_4096"] == pytest.approx(
        estimates["hscl_queue_4096"] - estimates["hscl_reference"]
    )
    # A queue of copies of the batch's views leaves every tilted mean, hence the loss, unchanged;
    # an unfilled queue is no queue.
    views, view_labels = np.concatenate([z1, z2]), np.concatenate([labels, labels])
    copies = theory.negative_set_estimates(
        z1,
        z2,
        labels,
        reference,
        reference_labels,
        beta=2.0,
        queue_keys=np.concatenate([views, views]),
        queue_labels=np.concatenate([view_labels, view_labels]),
        queue_count=24,
    )
    assert copies["hscl_queue_24"] == pytest.approx(copies["hscl_batch"], rel=1e-5)
    empty = theory.negative_set_estimates(
        z1,
        z2,
        labels,
        reference,
        reference_labels,
        beta=2.0,
        queue_keys=queue_keys,
        queue_labels=queue_labels,
        queue_count=0,
    )
    assert empty["hscl_queue_4096"] == pytest.approx(empty["hscl_batch"], rel=1e-6)


@pytest.mark.slow
def test_trainer_logs_the_reference_view_with_the_queue(tmp_path, tiny_digits_config):
    config = tiny_digits_config(num_steps=4, log_every_steps=2)
    config.theory.enabled, config.theory.reference_size = True, 100
    config.queue.size, config.queue.momentum = 32, 0.9
    trainer.train_and_evaluate(config, str(tmp_path))
    records = [
        r for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if "hscl_reference" in r
    ]
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        # Queue prefixes 4, 8, 16, 32 of the 32 filled rows (2 steps x 16 keys by step 2).
        for name in ("batch", "queue_4", "queue_8", "queue_16", "queue_32"):
            assert np.isfinite(record[f"hscl_{name}"])
            assert record[f"gap_{name}"] == pytest.approx(
                record[f"hscl_{name}"] - record["hscl_reference"]
            )
