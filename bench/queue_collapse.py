"""What a queue must hold: a momentum encoder's keys, or the online network's own projections.

    python bench/queue_collapse.py               # 150 steps, batch 64, a queue of 512 keys
    python bench/queue_collapse.py --steps 300 --queue-size 1024

Trains one small MLP encoder on sklearn's digits with ``losses.hscl`` (beta = 1, t = 0.1, Adam
at 3e-3) three times from the same initialisation and batches: without a queue, with a queue of
a momentum encoder's keys (an EMA of the online network, rate 0.99), and with a queue of the
online network's own projections (detached). It prints the loss every 25 steps and, at the end, the
loss of a fully collapsed batch, ``log(1 + Q)`` with ``Q = 2B - 2``; per run, the mean cosine of
the final embeddings of same-class and of other-class digits (both 1 when every embedding is the
same point) and a kNN accuracy (leave-one-out over the digits, k = 5).
"""

from __future__ import annotations

import argparse
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from hscl_jax import losses


class _Encoder(nn.Module):
    """64 pixels -> L2-normalised 32-d projection."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(128)(x))
        z = nn.Dense(32)(x)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def _augment(key: jax.Array, images: jax.Array) -> jax.Array:
    """A random shift of up to one pixel, pixel dropout and noise, on (B, 8, 8) images."""
    shift_key, drop_key, noise_key = jax.random.split(key, 3)
    shifts = jax.random.randint(shift_key, (2,), -1, 2)
    images = jnp.roll(images, shifts, axis=(1, 2))
    keep = jax.random.bernoulli(drop_key, 0.8, images.shape)
    images = images * keep + 0.1 * jax.random.normal(noise_key, images.shape)
    return images.reshape(images.shape[0], -1)


def _train(mode: str, images, labels, args) -> tuple[list[float], jax.Array]:
    model = _Encoder()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    tx = optax.adam(args.learning_rate)
    opt_state = tx.init(params)
    momentum_params = params
    queue = losses.Queue.empty(args.queue_size, 32)

    @jax.jit
    def step(params, momentum_params, opt_state, queue, key, batch_images, batch_labels):
        key1, key2 = jax.random.split(key)
        view1, view2 = _augment(key1, batch_images), _augment(key2, batch_images)
        with_queue = mode != "none"

        def objective(p):
            z1, z2 = model.apply(p, view1), model.apply(p, view2)
            loss = losses.hscl(z1, z2, batch_labels, beta=1.0, queue=queue if with_queue else None)
            return loss, z2

        (loss, z2), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        momentum_params = optax.incremental_update(params, momentum_params, 1.0 - args.momentum)
        if mode == "momentum":
            queue = queue.push(model.apply(momentum_params, view2), batch_labels)
        elif mode == "online":
            queue = queue.push(z2, batch_labels)
        return params, momentum_params, opt_state, queue, loss

    rng = np.random.default_rng(0)
    key = jax.random.key(1)
    history = []
    for _ in range(args.steps):
        idx = rng.choice(len(images), args.batch, replace=False)
        key, sub = jax.random.split(key)
        params, momentum_params, opt_state, queue, loss = step(
            params, momentum_params, opt_state, queue, sub, images[idx], labels[idx]
        )
        history.append(float(loss))
    return history, model.apply(params, images.reshape(len(images), -1))


def _mean_cosines(z: jax.Array, labels: np.ndarray) -> tuple[float, float]:
    """Mean cosine of same-class and of other-class pairs of distinct images."""
    s = np.asarray(z @ z.T)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    other = labels[:, None] != labels[None, :]
    return float(s[same].mean()), float(s[other].mean())


def _knn_accuracy(z: jax.Array, labels: np.ndarray, k: int = 5) -> float:
    s = np.array(z @ z.T)
    np.fill_diagonal(s, -np.inf)
    nearest = np.argsort(-s, axis=1)[:, :k]
    votes = labels[nearest]
    predicted = np.array([np.bincount(v, minlength=10).argmax() for v in votes])
    return float(np.mean(predicted == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=512)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=0.1)
    args = parser.parse_args()
    digits = load_digits()
    images = jnp.asarray(digits.images / 16.0, jnp.float32)
    labels = digits.target.astype(np.int32)
    collapsed = math.log(1 + 2 * args.batch - 2)
    print(
        f"hscl beta=1 t={args.temperature} on digits, batch {args.batch}, {args.steps} steps, "
        f"queue of {args.queue_size}; fully collapsed loss log(1 + Q) = {collapsed:.4f}"
    )
    every = max(args.steps // 6, 1)
    for mode in ("none", "momentum", "online"):
        history, z = _train(mode, images, jnp.asarray(labels), args)
        shown = " ".join(f"{history[i]:.4f}" for i in range(0, args.steps, every))
        same, other = _mean_cosines(z, labels)
        print(
            f"queue={mode:<9} loss every {every} steps: {shown}; last {history[-1]:.4f}; "
            f"mean cosine same class {same:.3f}, other class {other:.3f}; "
            f"kNN accuracy {_knn_accuracy(z, labels):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
