"""A user's code calling the losses, checked with ``mypy --strict`` (tests/test_losses_typing.py):
no call may be untyped, and the return types follow ``return_aux``."""

import jax
import jax.numpy as jnp

from hscl_jax import losses

z1 = jnp.ones((4, 8)) / jnp.sqrt(8.0)
labels = jnp.arange(4) % 2
loss: jax.Array = losses.hscl(z1, z1, labels, beta=1.0)
pair: tuple[jax.Array, losses.LossAux] = losses.hscl(z1, z1, labels, beta=1.0, return_aux=True)
views = jnp.stack([z1, z1, z1], axis=1)
multi: jax.Array = losses.supcon(views, labels=labels, normalize=True)
unsupervised: jax.Array = losses.ucl(z1, z1, temperature=0.2) + losses.hucl(z1, z1, beta=0.5)
scl_loss: jax.Array = losses.scl(z1, z1, labels, block_size=2)
queue = losses.Queue.empty(16, 8).push(z1, labels)
with_queue: jax.Array = losses.hscl(z1, z1, labels, beta=1.0, queue=queue)
flag = bool(loss > 0)
either: jax.Array | tuple[jax.Array, losses.LossAux] = losses.hscl(
    z1, z1, labels, beta=1.0, return_aux=flag
)
by_name = losses.compute("hscl", z1, z1, labels, beta=1.0)
