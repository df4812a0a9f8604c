"""H-SCL on the digits in a plain flax linen + optax training loop.

    python examples/linen_digits.py               # 300 steps of batch 128
    python examples/linen_digits.py --steps=40    # a quick run

An MLP encoder and projection head are trained with ``hscl_jax.losses.hscl`` on two random views
of each image. It prints the weighted-kNN top-1 accuracy of the encoder's features on the
held-out fifth of the digits (chance: 0.1) before and after training, and six times during
training the step and the mean loss since the previous line::

    knn_top1 before: <accuracy>
    step 50 loss <mean loss>
    ...
    knn_top1 after: <accuracy>
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _digits import size_parser, train_and_report, two_views

from hscl_jax import losses


class Encoder(nn.Module):
    """Features (B, 128) of flattened 8x8 digits; the head projects them to 32-d for the loss."""

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = nn.relu(nn.Dense(256)(images))
        features = nn.relu(nn.Dense(128)(features))
        projection = nn.Dense(32)(nn.relu(nn.Dense(128)(features)))
        return features, projection / jnp.linalg.norm(projection, axis=-1, keepdims=True)


def main() -> None:
    args = size_parser(__doc__.splitlines()[0], steps=300, batch=128).parse_args()
    model = Encoder()
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, 64)))
    optimizer = optax.adam(1e-3)

    @jax.jit
    def train_step(state, images, labels, view_key):
        params, opt_state = state

        def loss_fn(params):
            view1, view2 = two_views(view_key, images)
            _, z1 = model.apply(params, view1)
            _, z2 = model.apply(params, view2)
            return losses.hscl(z1, z2, labels, beta=1.0, temperature=0.5)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    encode = jax.jit(lambda state, images: model.apply(state[0], images)[0])
    train_and_report(args, (params, optimizer.init(params)), train_step, encode)


if __name__ == "__main__":
    main()
