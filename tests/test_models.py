"""Tests for hscl_jax.models: architectures, outputs, dtypes and cross-replica BatchNorm."""

import chex
import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hscl_jax import models


def _init(model, shape, key=0):
    # Non-partitionable threefry: XLA:CPU compiles the init ~6x faster (as the trainer does).
    with jax.threefry_partitionable(False):
        return jax.jit(lambda k: model.init(k, jnp.zeros(shape), train=False))(jax.random.key(key))


def _apply(model, train, **kwargs):
    """Jitted apply (eager Flax applies dispatch op by op and are slow on CPU)."""
    mutable = ["batch_stats"] if train else kwargs.pop("mutable", False)
    return jax.jit(lambda v, x: model.apply(v, x, train=train, mutable=mutable, **kwargs))


def _num_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "name, feature_dim, num_params",
    # Parameter counts: torchvision ResNet-18/50 with a 3x3 stem and no fc (11,168,832 and
    # 23,500,352) plus the head (feat*512 + 2*512 BN + 512*128 + 128).
    [
        ("resnet18", 512, 11_168_832 + 512 * 512 + 1024 + 65_664),
        ("resnet50", 2048, 23_500_352 + 2048 * 512 + 1024 + 65_664),
    ],
)
def test_reference_resnets_shapes_and_sizes(name, feature_dim, num_params):
    model = models.create_model(name)
    assert models.feature_dim(model) == feature_dim
    variables = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((2, 32, 32, 3)), train=False), jax.random.key(0)
    )
    assert _num_params(variables["params"]) == num_params
    features, projection = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=False), variables
    )
    assert features.shape == (2, feature_dim) and projection.shape == (2, 128)
    head = variables["params"]["head"]
    assert "bias" not in head["fc1"] and head["fc1"]["kernel"].shape == (feature_dim, 512)
    assert head["fc2"]["kernel"].shape == (512, 128) and head["fc2"]["bias"].shape == (128,)


def test_cifar_stem_keeps_resolution_and_stages_halve_it():
    model = models.create_model("resnet18", width=2)
    assert models.feature_dim(models.create_model("resnet50", width=2, stage_sizes=(1, 1))) == 16
    variables = _init(model, (1, 32, 32, 3))
    assert variables["params"]["encoder"]["stem_conv"]["kernel"].shape == (3, 3, 3, 2)
    _, state = _apply(model, False, capture_intermediates=True, mutable=["intermediates"])(
        variables, jnp.ones((2, 32, 32, 3))
    )
    encoder = state["intermediates"]["encoder"]
    assert encoder["stem_conv"]["__call__"][0].shape == (2, 32, 32, 2)  # stride 1, no max-pool
    assert encoder["stage1_block2"]["__call__"][0].shape == (2, 32, 32, 2)
    assert encoder["stage4_block2"]["__call__"][0].shape == (2, 4, 4, 16)


def test_imagenet_stem_quarters_resolution_with_the_same_parameter_names():
    cifar = models.create_model("resnet18", width=2)
    imagenet = models.create_model("resnet18", width=2, stem="imagenet")
    variables = _init(imagenet, (1, 64, 64, 3))
    assert variables["params"]["encoder"]["stem_conv"]["kernel"].shape == (7, 7, 3, 2)
    cifar_tree = jax.tree_util.tree_structure(_init(cifar, (1, 64, 64, 3)))
    assert jax.tree_util.tree_structure(variables) == cifar_tree
    _, state = _apply(imagenet, False, capture_intermediates=True, mutable=["intermediates"])(
        variables, jnp.ones((2, 64, 64, 3))
    )
    encoder = state["intermediates"]["encoder"]
    assert encoder["stem_conv"]["__call__"][0].shape == (2, 32, 32, 2)  # 7x7 stride 2
    assert encoder["stage1_block1"]["__call__"][0].shape == (2, 16, 16, 2)  # after the max-pool
    assert encoder["stage4_block2"]["__call__"][0].shape == (2, 2, 2, 16)


@pytest.fixture(scope="module")
def small():
    """A tiny small-CNN, its variables and a batch whose statistics are far from N(0, 1)."""
    model = models.create_model("small_cnn", width=4, head_hidden_dim=8, projection_dim=4)
    variables = _init(model, (1, 8, 8, 1))
    images = jax.random.normal(jax.random.key(2), (6, 8, 8, 1)) * 3 + 1
    return model, variables, images


def test_outputs_are_unit_norm_float32(small):
    model, variables, images = small
    (train_features, train_projection), _ = _apply(model, True)(variables, images)
    features, projection = _apply(model, False)(variables, images)
    for f, p in ((train_features, train_projection), (features, projection)):
        chex.assert_shape([f, p], [(6, 16), (6, 4)])
        chex.assert_type([f, p], jnp.float32)
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, rtol=1e-5)


def test_bfloat16_computes_in_bf16_keeps_float32_params_and_outputs():
    model = models.create_model("small_cnn", width=4, dtype="bfloat16")
    variables = _init(model, (1, 8, 8, 1))
    chex.assert_type(jax.tree.leaves(variables), jnp.float32)
    (features, projection), state = _apply(
        model, False, capture_intermediates=True, mutable=["intermediates"]
    )(variables, jnp.ones((2, 8, 8, 1)))
    chex.assert_type(state["intermediates"]["encoder"]["conv1"]["__call__"][0], jnp.bfloat16)
    chex.assert_type([features, projection], jnp.float32)
    # Same parameters in float32 give close (not identical) outputs.
    f32 = models.create_model("small_cnn", width=4)
    features32, _ = _apply(f32, False)(variables, jnp.ones((2, 8, 8, 1)))
    np.testing.assert_allclose(features, features32, atol=3e-2)
    assert not np.array_equal(features, features32)


def test_train_mode_updates_batch_stats_and_eval_mode_is_per_example(small):
    model, variables, images = small
    _, updates = _apply(model, True)(variables, images)
    old = variables["batch_stats"]["encoder"]["bn1"]["mean"]
    new = updates["batch_stats"]["encoder"]["bn1"]["mean"]
    assert not np.allclose(old, new)
    # Eval mode: an example's output does not depend on the rest of the batch.
    alone, _ = _apply(model, False)(variables, images[:1])
    together, _ = _apply(model, False)(variables, images)
    np.testing.assert_allclose(alone[0], together[0], rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_are_synced_across_replicas():
    """Train-mode outputs under pmap over 4 devices equal one device on the whole batch."""
    model = models.create_model(
        "small_cnn", width=4, head_hidden_dim=8, projection_dim=4, bn_axis_name="batch"
    )
    variables = _init(model, (1, 8, 8, 1))
    # Per-device batches with very different statistics: unsynced BN would differ a lot.
    images = (
        jax.random.normal(jax.random.key(3), (4, 3, 8, 8, 1))
        * jnp.arange(1.0, 5.0)[:, None, None, None, None]
    )

    def forward(v, x):
        (features, projection), updates = model.apply(v, x, train=True, mutable=["batch_stats"])
        return features, projection, updates["batch_stats"]

    devices = jax.devices()[:4]
    replicated = flax.jax_utils.replicate(variables, devices)
    features, projection, stats = jax.pmap(forward, axis_name="batch", devices=devices)(
        replicated, images
    )
    single = jax.pmap(forward, axis_name="batch", devices=devices[:1])(
        flax.jax_utils.replicate(variables, devices[:1]), images.reshape(1, 12, 8, 8, 1)
    )
    np.testing.assert_allclose(features.reshape(12, -1), single[0][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(projection.reshape(12, -1), single[1][0], rtol=1e-4, atol=1e-5)
    for device in range(4):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, d=device: x[d], stats),
            jax.tree.map(lambda x: x[0], single[2]),
            rtol=1e-4,
            atol=1e-6,
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "resnet101"}, "model.name='resnet101' is unknown"),
        ({"name": "resnet18", "dtype": "float16"}, "model.dtype='float16'"),
        ({"name": "resnet18", "width": 0}, "model.width=0"),
        ({"name": "small_cnn", "projection_dim": -1}, "model.projection_dim=-1"),
        ({"name": "resnet50", "stage_sizes": (2, 0)}, "model.stage_sizes=\\(2, 0\\)"),
        ({"name": "small_cnn", "stage_sizes": (1,)}, "stem apply to ResNets only"),
        ({"name": "small_cnn", "stem": "imagenet"}, "stem apply to ResNets only"),
        (
            {"name": "resnet18", "stem": "vit"},
            "model.stem='vit' is unknown; allowed: cifar, imagenet",
        ),
    ],
)
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.create_model(**kwargs)
