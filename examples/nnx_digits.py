"""H-SCL on the digits in a flax NNX + optax training loop.

    python examples/nnx_digits.py               # 300 steps of batch 128
    python examples/nnx_digits.py --steps=40    # a quick run

The loop of ``linen_digits.py`` written with ``flax.nnx``: the model is a stateful object,
``nnx.Optimizer`` holds the optax state, and ``nnx.jit`` / ``nnx.value_and_grad`` take the place
of their jax counterparts. It prints what ``linen_digits.py`` prints: the kNN top-1 accuracy
before and after training, and the mean loss six times during training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from _digits import size_parser, train_and_report, two_views
from flax import nnx

from hscl_jax import losses


class Encoder(nnx.Module):
    """Features (B, 128) of flattened 8x8 digits; the head projects them to 32-d for the loss."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(64, 256, rngs=rngs)
        self.features = nnx.Linear(256, 128, rngs=rngs)
        self.head_hidden = nnx.Linear(128, 128, rngs=rngs)
        self.head_out = nnx.Linear(128, 32, rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = nnx.relu(self.features(nnx.relu(self.hidden(images))))
        projection = self.head_out(nnx.relu(self.head_hidden(features)))
        return features, projection / jnp.linalg.norm(projection, axis=-1, keepdims=True)


@nnx.jit
def nnx_step(
    model: Encoder,
    optimizer: nnx.Optimizer,
    images: jax.Array,
    labels: jax.Array,
    view_key: jax.Array,
) -> jax.Array:
    """One optimiser step; updates ``model`` and ``optimizer`` in place and returns the loss."""

    def loss_fn(model: Encoder) -> jax.Array:
        view1, view2 = two_views(view_key, images)
        _, z1 = model(view1)
        _, z2 = model(view2)
        return losses.hscl(z1, z2, labels, beta=1.0, temperature=0.5)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def encode(model: Encoder, images: jax.Array) -> jax.Array:
    return model(images)[0]


def main() -> None:
    args = size_parser(__doc__.splitlines()[0], steps=300, batch=128).parse_args()
    model = Encoder(nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    def train_step(state, images, labels, view_key):
        return state, nnx_step(model, optimizer, images, labels, view_key)

    train_and_report(args, None, train_step, lambda state, images: encode(model, images))


if __name__ == "__main__":
    main()
