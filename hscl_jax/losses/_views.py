"""Views, masks, tiles and queue rows: the batch laid out as rows (anchors) and columns (the
contrast set), with the metadata every mask is built from.

The 2B views are ordered view 1 of every image first, then view 2 (``docs/losses.md``), so view
``i`` and view ``i + B`` are partners. Queue rows are numbered -2, -3, ... (-1 marks padding):
never an anchor, never a partner.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from hscl_jax.losses._parallel import tree_varying_axes, vary
from hscl_jax.losses._queue import Queue
from hscl_jax.losses._spec import Array, Hyper, Spec

FIRST_QUEUE_INDEX = -2


class ContrastViews(NamedTuple):
    """Embeddings with the metadata the masks need: global view index, label, padding flag.

    Queue rows are numbered -2, -3, ... (-1 marks padding): never an anchor, never a partner.
    """

    z: Array
    index: Array
    label: Array
    real: Array  # False for rows added to pad the last block


def contrast_views(
    z1: Array, z2: Array, labels: Array | None, axis_name: Any = None
) -> tuple[ContrastViews, Array, ContrastViews]:
    """This device's anchors, their partners' global indices, and the global contrast set.

    Views are ordered as in ``docs/losses.md`` over the global batch: view 1 of every image,
    then view 2, so device ``d``'s rows are global views ``d*b .. d*b+b-1`` and ``B + d*b ..``.
    Without ``axis_name`` the device is the whole batch. ``labels=None`` labels every view 0.
    """
    b = z1.shape[0]
    labels = jnp.zeros((b,), jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)
    if axis_name is None:
        device, z1_all, z2_all, labels_all = 0, z1, z2, labels
    else:
        device = lax.axis_index(axis_name)
        z1_all, z2_all, labels_all = (
            lax.all_gather(x, axis_name, tiled=True) for x in (z1, z2, labels)
        )
    big_b = z1_all.shape[0]
    n_views = 2 * big_b
    local = device * b + jnp.arange(b)
    rows = ContrastViews(
        jnp.concatenate([z1, z2]),
        jnp.concatenate([local, local + big_b]),
        jnp.concatenate([labels, labels]),
        jnp.ones((2 * b,), bool),
    )
    partner = (rows.index + big_b) % n_views
    cols = ContrastViews(
        jnp.concatenate([z1_all, z2_all]),
        jnp.arange(n_views),
        jnp.concatenate([labels_all, labels_all]),
        jnp.ones((n_views,), bool),
    )
    return rows, partner, cols


def tile_masks(
    spec: Spec, rows: ContrastViews, partner_index: Array, cols: ContrastViews
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
    else:
        pos = same_label & not_self & real
        if unused is not None:
            pos = pos & ~unused
    if spec.negatives == "other_class":
        return pos, other_class, other_class
    if spec.negatives == "other_views":
        neg = not_self & (partner_index[:, None] != cols.index[None, :]) & real
        return pos, neg, neg
    # SupCon's contrast set holds the positives too; its reported negatives are the other classes.
    contrast = not_self & real
    if unused is not None:
        contrast = contrast & ~unused
    return pos, contrast, other_class


def queue_views(queue: Queue, dtype: Any) -> ContrastViews:
    """The queue as contrast rows: constants for autodiff, numbered -2, -3, ..."""
    size = queue.z.shape[0]
    return ContrastViews(
        lax.stop_gradient(jnp.asarray(queue.z)).astype(dtype),
        FIRST_QUEUE_INDEX - jnp.arange(size),
        jnp.asarray(queue.labels, jnp.int32),
        jnp.asarray(queue.valid, bool),
    )


def concat_views(a: ContrastViews, b: ContrastViews | None) -> ContrastViews:
    """The rows of ``a`` then those of ``b`` (``a`` alone without ``b``)."""
    return a if b is None else jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def similarities(rows: ContrastViews, cols: ContrastViews, temperature: Any, dtype: Any) -> Array:
    """s = rows cols^T / t; bfloat16 inputs multiply natively and accumulate in float32."""
    s = jnp.matmul(rows.z, cols.z.T, preferred_element_type=dtype)
    return s / temperature


def tile(
    spec: Spec,
    hyper: Hyper,
    rows: ContrastViews,
    partner: Array,
    cols: ContrastViews,
    dtype: Any,
) -> tuple[Array, Array, Array, Array]:
    """One tile's similarities and its positive, negative and reported-negative masks."""
    s = similarities(rows, cols, hyper.temperature, dtype)
    pos, neg, other = tile_masks(spec, rows, partner, cols)
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
