"""Encoders and the projection head (Flax linen).

Every model maps images (N, H, W, C) to a pair ``(features, projection)``:

- ``features``: the encoder output after global average pooling, L2-normalised (what kNN and the
  linear probe see; 512-d for ResNet-18, 2048-d for ResNet-50 at the reference width);
- ``projection``: the projection head output, L2-normalised (what the contrastive loss sees).

Both come back in float32 whatever the compute ``dtype``; parameters are always float32.

BatchNorm statistics are synchronised across replicas when ``bn_axis_name`` is set and the model is
applied with ``train=True`` inside ``pmap``/``shard_map`` over that axis (SimCLR's global BN). With
``train=False`` BatchNorm uses its running averages and no collective is issued, so initialisation
and evaluation work outside any mapped context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    import ml_collections

MODEL_NAMES = ("small_cnn", "resnet18", "resnet50")
DTYPE_NAMES = ("float32", "bfloat16")
# "cifar": 3x3 stride-1 convolution, no max-pool (the paper's 32 px recipe); "imagenet": the
# standard 7x7 stride-2 convolution + 3x3 stride-2 max-pool for 224 px crops.
STEM_NAMES = ("cifar", "imagenet")

# PyTorch BatchNorm2d defaults (momentum 0.1 there is 1 - 0.9 here).
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# torchvision initialises ResNet convolutions with Kaiming normal, fan_out, ReLU gain.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def l2_normalize(x: jax.Array | np.ndarray, eps: float = 1e-12) -> jax.Array:
    """Rows of ``x`` divided by their L2 norm (as torch.nn.functional.normalize), in float32."""
    x = jnp.asarray(x, jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _batch_norm(
    train: bool, axis_name: str | None, dtype: Any, name: str | None = None, **kw: Any
) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=_BN_MOMENTUM,
        epsilon=_BN_EPSILON,
        axis_name=axis_name if train else None,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
        **kw,
    )


def _block_layers(
    dtype: Any, bn_axis_name: str | None, train: bool
) -> tuple[Callable[..., nn.Conv], Callable[..., nn.BatchNorm]]:
    """The bias-free convolution and the BatchNorm every residual block builds from."""
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=_conv_init
    )
    return conv, functools.partial(_batch_norm, train, bn_axis_name, dtype)


class BasicBlock(nn.Module):
    """ResNet-18/34 residual block (two 3x3 convolutions)."""

    filters: int
    strides: int = 1
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv, norm = _block_layers(self.dtype, self.bn_axis_name, train)
        residual = x
        y = conv(self.filters, (3, 3), strides=self.strides, padding=1, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(self.filters, (3, 3), padding=1, name="conv2")(y)
        y = norm(name="bn2")(y)
        if residual.shape != y.shape:
            residual = conv(self.filters, (1, 1), strides=self.strides, name="shortcut_conv")(x)
            residual = norm(name="shortcut_bn")(residual)
        return nn.relu(y + residual)


class BottleneckBlock(nn.Module):
    """ResNet-50 bottleneck (1x1, 3x3 with the stride, 1x1 x4), as torchvision's v1.5."""

    filters: int
    strides: int = 1
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv, norm = _block_layers(self.dtype, self.bn_axis_name, train)
        residual = x
        y = conv(self.filters, (1, 1), name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(self.filters, (3, 3), strides=self.strides, padding=1, name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y))
        y = conv(self.filters * 4, (1, 1), name="conv3")(y)
        y = norm(name="bn3")(y)
        if residual.shape != y.shape:
            residual = conv(self.filters * 4, (1, 1), strides=self.strides, name="shortcut_conv")(x)
            residual = norm(name="shortcut_bn")(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet with the CIFAR stem (3x3 stride-1 first convolution, no max-pool) or, with
    ``stem="imagenet"``, the standard 7x7 stride-2 convolution and 3x3 stride-2 max-pool (4x less
    resolution before the first stage). Both stems name their parameters alike.

    ``width`` is the channel count of the stem and first stage (64 in the reference); stages double
    it. Features after global average pooling have ``8 * width * block.expansion`` dimensions.
    """

    stage_sizes: Sequence[int]
    block_cls: type[BasicBlock] | type[BottleneckBlock]
    width: int = 64
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    stem: str = "cifar"

    @property
    def feature_dim(self) -> int:
        return self.width * 2 ** (len(self.stage_sizes) - 1) * self.block_cls.expansion

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        imagenet = self.stem == "imagenet"
        x = nn.Conv(
            self.width,
            (7, 7) if imagenet else (3, 3),
            strides=2 if imagenet else 1,
            padding=3 if imagenet else 1,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=_conv_init,
            name="stem_conv",
        )(x)
        x = nn.relu(_batch_norm(train, self.bn_axis_name, self.dtype, name="stem_bn")(x))
        if imagenet:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                x = self.block_cls(
                    filters=self.width * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    bn_axis_name=self.bn_axis_name,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x, train=train)
        return jnp.mean(x, axis=(1, 2))


class SmallCNN(nn.Module):
    """A three-convolution encoder for tiny images (8x8 digits): 4 * width features."""

    width: int = 32
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @property
    def feature_dim(self) -> int:
        return 4 * self.width

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        for i, channels in enumerate((self.width, 2 * self.width, 4 * self.width)):
            if i == 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
            x = nn.Conv(
                channels,
                (3, 3),
                padding=1,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"conv{i + 1}",
            )(x)
            x = nn.relu(_batch_norm(train, self.bn_axis_name, self.dtype, name=f"bn{i + 1}")(x))
        return jnp.mean(x, axis=(1, 2))


class ProjectionHead(nn.Module):
    """The reference head: Dense(no bias) -> BatchNorm -> ReLU -> Dense."""

    hidden_dim: int = 512
    output_dim: int = 128
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Dense(
            self.hidden_dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="fc1"
        )(x)
        x = nn.relu(_batch_norm(train, self.bn_axis_name, self.dtype, name="bn")(x))
        return nn.Dense(self.output_dim, dtype=self.dtype, param_dtype=jnp.float32, name="fc2")(x)


class ContrastiveModel(nn.Module):
    """Encoder + projection head; returns (normalised features, normalised projection) in f32."""

    encoder: nn.Module
    head: nn.Module

    def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        features = self.encoder(images, train=train)
        projection = self.head(features, train=train)
        return l2_normalize(features), l2_normalize(projection)


_RESNETS: dict[str, tuple[tuple[int, ...], type[BasicBlock] | type[BottleneckBlock]]] = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet50": ((3, 4, 6, 3), BottleneckBlock),
}

_DEFAULT_WIDTH = {"small_cnn": 32, "resnet18": 64, "resnet50": 64}


def parse_dtype(name: str) -> Any:
    """'float32' | 'bfloat16' -> the jnp dtype; anything else is a ValueError."""
    if name not in DTYPE_NAMES:
        raise ValueError(
            f"model.dtype={name!r} is not supported; allowed: {', '.join(DTYPE_NAMES)}"
        )
    return jnp.dtype(name)


def create_model(
    name: str,
    *,
    width: int | None = None,
    head_hidden_dim: int = 512,
    projection_dim: int = 128,
    dtype: str = "float32",
    bn_axis_name: str | None = None,
    stage_sizes: Sequence[int] | None = None,
    stem: str = "cifar",
) -> ContrastiveModel:
    """Builds a ContrastiveModel by name ('small_cnn', 'resnet18', 'resnet50').

    ``width`` None takes the reference width (64 for ResNets, 32 for the small CNN);
    ``stage_sizes`` None takes the named ResNet's blocks per stage ((2, 2, 2, 2) / (3, 4, 6, 3));
    tests shrink both. ``stem`` is the ResNet input stem, ``"cifar"`` or ``"imagenet"`` (see
    `ResNet`). ``bn_axis_name`` is the pmap/shard_map axis over which BatchNorm statistics are
    averaged in training mode.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name={name!r} is unknown; allowed: {', '.join(MODEL_NAMES)}")
    if stem not in STEM_NAMES:
        raise ValueError(f"model.stem={stem!r} is unknown; allowed: {', '.join(STEM_NAMES)}")
    width = _DEFAULT_WIDTH[name] if width is None else width
    for field, value in (
        ("width", width),
        ("head_hidden_dim", head_hidden_dim),
        ("projection_dim", projection_dim),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{field}={value!r} must be a positive integer")
    compute_dtype = parse_dtype(dtype)
    encoder: SmallCNN | ResNet
    if name == "small_cnn":
        if stage_sizes is not None or stem != "cifar":
            raise ValueError(
                "model.stage_sizes and model.stem apply to ResNets only; leave them at their "
                "defaults (None, 'cifar') for small_cnn"
            )
        encoder = SmallCNN(width=width, bn_axis_name=bn_axis_name, dtype=compute_dtype)
    else:
        default_stages, block = _RESNETS[name]
        stages = tuple(default_stages if stage_sizes is None else stage_sizes)
        if not stages or not all(isinstance(n, int) and n >= 1 for n in stages):
            raise ValueError(
                f"model.stage_sizes={stage_sizes!r} must be a non-empty sequence of positive ints"
            )
        encoder = ResNet(
            stages, block, width=width, bn_axis_name=bn_axis_name, dtype=compute_dtype, stem=stem
        )
    head = ProjectionHead(
        hidden_dim=head_hidden_dim,
        output_dim=projection_dim,
        bn_axis_name=bn_axis_name,
        dtype=compute_dtype,
    )
    return ContrastiveModel(encoder=encoder, head=head)


def model_from_config(
    model_config: ml_collections.ConfigDict, *, bn_axis_name: str | None = None
) -> ContrastiveModel:
    """create_model from the `config.model` ConfigDict (name, width, stage_sizes, dtype, ...)."""
    return create_model(
        model_config.name,
        width=model_config.get("width"),
        head_hidden_dim=model_config.get("head_hidden_dim", 512),
        projection_dim=model_config.get("projection_dim", 128),
        dtype=model_config.get("dtype", "float32"),
        bn_axis_name=bn_axis_name,
        stage_sizes=model_config.get("stage_sizes"),
        stem=model_config.get("stem", "cifar"),
    )


def feature_dim(model: ContrastiveModel) -> int:
    """Dimension of the encoder features of ``model``."""
    return model.encoder.feature_dim
