"""Views, masks, tiles and queue rows: the batch laid out as rows (anchors) and columns (the
contrast set), with the metadata every mask is built from.

The V B views are ordered view 1 of every image first, then view 2, ... (``docs/losses.md``): with
two views, view ``i`` and view ``i + B`` are partners. Queue rows are numbered -2, -3, ... (-1
marks padding): never an anchor, never a partner.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax

from hscl_jax.losses._parallel import tree_varying_axes, vary
from hscl_jax.losses._queue import Queue
from hscl_jax.losses._spec import Array, Hyper, Spec

FIRST_QUEUE_INDEX = -2


class ContrastViews(NamedTuple):
    """Embeddings with the metadata the masks need: global view index, label, padding flag, and
    the global index of the image the view is of.

    Queue rows are numbered -2, -3, ... (-1 marks padding): never an anchor, never a partner;
    their image is -1, as is that of padding rows.
    """

    z: Array
    index: Array  # type: ignore[assignment]  # the field shadows tuple.index
    label: Array
    real: Array  # False for rows added to pad the last block
    image: Array


def views_of(
    views: tuple[Array, ...], labels: Array | None, axis_name: Any = None
) -> tuple[ContrastViews, ContrastViews]:
    """This device's anchors (every view of its images) and the global contrast set.

    ``views`` holds V arrays (b, d), view v of each of this device's b images. Over the global
    batch of B images the views are ordered view 1 of every image, then view 2, ... (global index
    ``v * B + i``): device ``d``'s anchors are global views ``v * B + d * b + i``. Without
    ``axis_name`` the device is the whole batch. ``labels=None`` labels every view 0.
    """
    b, num_views = views[0].shape[0], len(views)
    labels = jnp.zeros((b,), jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
    device: Any = 0
    if axis_name is None:
        gathered, labels_all = views, labels
    else:
        device = lax.axis_index(axis_name)
        gathered = tuple(lax.all_gather(x, axis_name, tiled=True) for x in views)
        labels_all = lax.all_gather(labels, axis_name, tiled=True)
    big_b = gathered[0].shape[0]
    local = device * b + jnp.arange(b)
    rows = ContrastViews(
        jnp.concatenate(views),
        jnp.concatenate([local + v * big_b for v in range(num_views)]),
        jnp.concatenate([labels] * num_views),
        jnp.ones((num_views * b,), bool),
        jnp.concatenate([local] * num_views),
    )
    cols = ContrastViews(
        jnp.concatenate(gathered),
        jnp.arange(num_views * big_b),
        jnp.concatenate([labels_all] * num_views),
        jnp.ones((num_views * big_b,), bool),
        jnp.concatenate([jnp.arange(big_b)] * num_views),
    )
    return rows, cols


def contrast_views(
    z1: Array, z2: Array, labels: Array | None, axis_name: Any = None
) -> tuple[ContrastViews, Array, ContrastViews]:
    """This device's anchors, their partners' global indices, and the global contrast set, for
    two views per image (``views_of``): view ``i`` and view ``i + B`` are partners."""
    rows, cols = views_of((z1, z2), labels, axis_name)
    n_views = cols.z.shape[0]
    return rows, (rows.index + n_views // 2) % n_views, cols


def tile_masks(
    spec: Spec, rows: ContrastViews, cols: ContrastViews
) -> tuple[Array | None, Array, Array]:
    """(positives or None for "partner", negatives, reported negatives) of one tile."""
    same_label = rows.label[:, None] == cols.label[None, :]
    not_self = rows.index[:, None] != cols.index[None, :]
    real = rows.real[:, None] & cols.real[None, :]
    other_class = ~same_label & real
    # Same-label queue rows: positives with queue_as_positives, otherwise in no mask at all.
    unused = None
    if spec.queue and not spec.queue_as_positives:
        unused = same_label & (cols.index[None, :] <= FIRST_QUEUE_INDEX)
    if spec.positives == "partner":
        pos = None  # the partner's similarity is computed directly
    elif spec.positives == "image":
        pos = (rows.image[:, None] == cols.image[None, :]) & not_self & real
    else:
        pos = same_label & not_self & real
        if unused is not None:
            pos = pos & ~unused
    if spec.negatives == "other_class":
        return pos, other_class, other_class
    if spec.negatives == "other_views":  # not a view of the anchor's image
        neg = (rows.image[:, None] != cols.image[None, :]) & real
        return pos, neg, neg
    # SupCon's contrast set holds the positives too; its reported negatives are the other classes.
    contrast = not_self & real
    if unused is not None:
        contrast = contrast & ~unused
    return pos, contrast, other_class


def l2_normalize(z: Array) -> Array:
    """Each row of ``z`` divided by its L2 norm (at least 1e-12), differentiably, in ``z``'s
    dtype (the norm in at least float32)."""
    wide = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    # rsqrt of the floored square: a zero row gets a zero gradient, not 0 * inf.
    squared = jnp.sum(wide * wide, axis=-1, keepdims=True)
    return (wide * lax.rsqrt(jnp.maximum(squared, 1e-24))).astype(z.dtype)


def queue_views(queue: Queue, dtype: Any) -> ContrastViews:
    """The queue as contrast rows: constants for autodiff, numbered -2, -3, ..."""
    size = queue.z.shape[0]
    return ContrastViews(
        lax.stop_gradient(jnp.asarray(queue.z)).astype(dtype),
        FIRST_QUEUE_INDEX - jnp.arange(size),
        jnp.asarray(queue.labels, jnp.int32),
        jnp.asarray(queue.valid, bool),
        jnp.full((size,), -1),
    )


def concat_views(a: ContrastViews, b: ContrastViews | None) -> ContrastViews:
    """The rows of ``a`` then those of ``b`` (``a`` alone without ``b``)."""
    return a if b is None else jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


# Every matmul of the losses asks for full float32 precision: at their default precision GPUs and
# TPUs round float32 operands to TF32 or bfloat16, which moves the loss and its gradients about
# 1e-3 (relative) away from the float32 reference (docs/benchmarks.md). The similarity matmul is a
# negligible part of a train step; bfloat16 inputs still multiply natively.
MATMUL_PRECISION = lax.Precision.HIGHEST


def similarities(rows: ContrastViews, cols: ContrastViews, temperature: Any, dtype: Any) -> Array:
    """s = rows cols^T / t; bfloat16 inputs multiply natively and accumulate in float32."""
    s = jnp.matmul(rows.z, cols.z.T, precision=MATMUL_PRECISION, preferred_element_type=dtype)
    return cast(Array, s / temperature)


def tile(
    spec: Spec, hyper: Hyper, rows: ContrastViews, cols: ContrastViews, dtype: Any
) -> tuple[Array, Array, Array, Array]:
    """One tile's similarities and its positive, negative and reported-negative masks."""
    s = similarities(rows, cols, hyper.temperature, dtype)
    pos, neg, other = tile_masks(spec, rows, cols)
    return s, (jnp.zeros_like(neg) if pos is None else pos), neg, other


def blocked(x: Array, block: int, fill: Any) -> Array:
    """Pads axis 0 of ``x`` to a whole number of blocks and splits it: (num_blocks, block, ...)."""
    n = x.shape[0]
    padded = -(-n // block) * block
    x = jnp.pad(x, [(0, padded - n)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape((padded // block, block) + x.shape[1:])


def pad_blocks(views: ContrastViews, block: int) -> ContrastViews:
    """``views`` padded to whole blocks and split into (num_blocks, block, ...) tiles."""
    return ContrastViews(
        blocked(views.z, block, 0),
        blocked(views.index, block, -1),
        blocked(views.label, block, 0),
        blocked(views.real, block, False),
        blocked(views.image, block, -1),
    )


def over_chunks(fn: Any, carry: Any, chunks: Any, like: Any = None) -> tuple[Any, Any]:
    """lax.scan over the leading (chunk) axis; one chunk is called directly, without a loop.

    The carry is typed as varying over the mesh axes the chunks and ``like`` (values the body
    closes over) vary over, as the body makes it (``docs/parallelism.md``).
    """
    if jax.tree.leaves(chunks)[0].shape[0] > 1:
        return lax.scan(fn, vary(carry, tree_varying_axes((chunks, like))), chunks)
    carry, out = fn(carry, jax.tree.map(lambda x: x[0], chunks))
    return carry, jax.tree.map(lambda x: x[None], out)
