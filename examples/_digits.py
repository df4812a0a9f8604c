"""What the digits examples share: scikit-learn's 8x8 digits split, two random views of a batch,
and the weighted-kNN accuracy of an encoder. Needs the ``[data]`` extra (scikit-learn).

A user's own loop would bring its own data and augmentation; these are as small as the examples
allow (a shift of up to one pixel plus Gaussian noise), so that each script stays about the
training loop around ``hscl_jax.losses``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

from hscl_jax import evaluate

NUM_CLASSES = 10


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_images, train_labels, test_images, test_labels): images (N, 64) float32 in [0, 1],
    a seeded 80/20 split of the 1,797 digits."""
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(0.8 * len(images))
    train, test = order[:cut], order[cut:]
    return (
        images[train],
        labels[train].astype(np.int32),
        images[test],
        labels[test].astype(np.int32),
    )


def two_views(key: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two random views of (B, 64) images: each shifted by up to one pixel per axis, plus noise."""

    def view(view_key: jax.Array) -> jax.Array:
        shift_key, noise_key = jax.random.split(view_key)
        shifts = jax.random.randint(shift_key, (images.shape[0], 2), -1, 2)
        grids = images.reshape(-1, 8, 8)
        shifted = jax.vmap(lambda grid, s: jnp.roll(grid, (s[0], s[1]), axis=(0, 1)))(grids, shifts)
        return shifted.reshape(images.shape) + 0.1 * jax.random.normal(noise_key, images.shape)

    key1, key2 = jax.random.split(key)
    return view(key1), view(key2)


def train_and_report(
    args: argparse.Namespace,
    state: Any,
    train_step: Callable[[Any, np.ndarray, np.ndarray, jax.Array], tuple[Any, jax.Array]],
    encode: Callable[[Any, np.ndarray], jax.Array],
    describe: Callable[[Any], str] = lambda state: "",
) -> Any:
    """The examples' loop over random batches of the digits' training split.

    ``train_step(state, images, labels, view_key) -> (state, loss)`` is one optimiser step;
    ``encode(state, images)`` gives the encoder's features. Prints the weighted-kNN top-1 accuracy
    of the features on the test split (``hscl_jax.evaluate.knn_accuracy``) before and after
    training, and six times during training the step, the mean loss since the previous line and
    ``describe(state)``. Returns the last state.
    """
    train_x, train_y, test_x, test_y = digits_split(args.seed)

    def accuracy() -> float:
        features = (np.asarray(encode(state, x)) for x in (train_x, test_x))
        train_features, test_features = features
        return evaluate.knn_accuracy(
            train_features, train_y, test_features, test_y, num_classes=NUM_CLASSES
        )["knn_top1"]

    print(f"knn_top1 before: {accuracy():.4f}")
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed + 1)
    log_every, window = max(args.steps // 6, 1), []
    for step in range(1, args.steps + 1):
        batch = rng.choice(len(train_x), args.batch, replace=False)
        key, view_key = jax.random.split(key)
        state, loss = train_step(state, train_x[batch], train_y[batch], view_key)
        window.append(float(loss))
        if step % log_every == 0:
            print(f"step {step} loss {np.mean(window):.4f}{describe(state)}")
            window = []
    print(f"knn_top1 after: {accuracy():.4f}")
    return state


def size_parser(description: str, steps: int, batch: int) -> argparse.ArgumentParser:
    """Flags ``--steps`` and ``--batch`` (smaller values make a quick run) and ``--seed``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="training steps")
    parser.add_argument("--batch", type=int, default=batch, help="images per batch (2 views each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and views")
    return parser
