"""From the embeddings to the loss: the views, the walk over anchors and tiles (dense or
blocked), the per-anchor sums, and the mean over the global batch.

Anchors with no positive or no negative are left out of the mean, never NaN; a batch with no valid
anchor at all returns 0. With ``block_size`` the same loss is computed over
``block_size x block_size`` tiles of the similarity matrix with running log-sum-exp accumulators:
the (2B x 2B) matrix is never materialised, and tiles are recomputed in the backward pass
(``jax.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import lax

from hscl_jax.losses._dense import dense_terms
from hscl_jax.losses._kernel import (
    AnchorKernel,
    State,
    lse_value,
    positive_counts,
    valid_anchors,
)
from hscl_jax.losses._parallel import (
    check_split,
    explicit_batch_axes,
    global_mean,
    on_explicit_mesh,
)
from hscl_jax.losses._queue import Queue
from hscl_jax.losses._spec import Array, Hyper, LossAux, Spec
from hscl_jax.losses._views import (
    ContrastViews,
    blocked,
    l2_normalize,
    over_chunks,
    pad_blocks,
    queue_views,
    tile,
    views_of,
)


@dataclasses.dataclass(frozen=True)
class _TileWalk:
    """The anchors of one row block and the contrast tiles they are folded over.

    ``cols`` is the batch's contrast set and ``queue`` the queue's rows (or None), both stacked
    into (num_tiles, tile, ...): one tile each on the dense path; with ``block_size`` they come
    already padded and split, made once outside the loop over row blocks so that no copy of them
    becomes a per-iteration residual of the backward pass. The queue's tiles are walked after
    the batch's, as constants: the backward pass computes no gradient for them.
    """

    spec: Spec
    hyper: Hyper
    rows: ContrastViews
    cols: ContrastViews
    queue: ContrastViews | None
    blocked: bool
    dtype: Any

    def fold(
        self, fn: Callable[[Any, ContrastViews], Any], carry: Any, with_queue: bool = True
    ) -> Any:
        """Folds fn(carry, tile) over the batch's tiles, then the queue's."""

        def body(c: Any, col_tile: ContrastViews) -> tuple[Any, None]:
            return fn(c, col_tile), None

        if self.blocked:  # tiles are recomputed in the backward pass
            body = jax.checkpoint(body)
        for tiles in (self.cols, self.queue if with_queue else None):
            if tiles is not None:
                carry, _ = over_chunks(body, carry, tiles, like=self.rows)
        return carry

    def tile(self, col_tile: ContrastViews) -> tuple[Array, Array, Array, Array]:
        return tile(self.spec, self.hyper, self.rows, col_tile, self.dtype)

    def num_columns(self) -> int:
        """Every column of the walk, padding included."""
        return sum(t.z.shape[0] * t.z.shape[1] for t in (self.cols, self.queue) if t is not None)


def _topk_thresholds(walk: _TileWalk) -> Array:
    """Each anchor's k-th largest negative similarity (-inf with fewer than k negatives).

    One pass over the tiles before the loss, carrying each anchor's running k largest: memory
    (rows x k) on the blocked path. Constants for autodiff: the selection is piecewise constant.
    The number of columns (padding included) bounds every anchor's negatives from above, its own
    view being a column and never a negative: with k >= that number no pass is needed.
    """
    spec, n_rows = walk.spec, walk.rows.z.shape[0]
    top_k = spec.top_k
    assert top_k is not None
    if top_k >= walk.num_columns():
        return jnp.full((n_rows,), -jnp.inf, walk.dtype)
    const_walk = dataclasses.replace(walk, rows=jax.tree.map(lax.stop_gradient, walk.rows))

    def top_of_tile(top: Array, col_tile: ContrastViews) -> Array:
        s, _, neg, _ = const_walk.tile(jax.tree.map(lax.stop_gradient, col_tile))
        merged = jnp.concatenate([top, jnp.where(neg, lax.stop_gradient(s), -jnp.inf)], axis=1)
        return lax.top_k(merged, top_k)[0]

    top: Array = const_walk.fold(top_of_tile, jnp.full((n_rows, top_k), -jnp.inf, walk.dtype))
    return top[:, -1]


def _anchor_statistics(walk: _TileWalk, log_q: Any) -> tuple[State, Array | None, Array | None]:
    """Every anchor's running statistics, and on the dense "exp" path its log_mu and positive
    sums (differentiated by the hand-written backward pass; None elsewhere)."""
    spec = walk.spec
    kernel = AnchorKernel(spec, walk.hyper)
    n_rows = walk.rows.z.shape[0]
    state0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_rows,)), kernel.init(walk.dtype))
    if spec.hardening == "topk":
        state0["neg_threshold"] = _topk_thresholds(walk)
    # The hand-written backward pass knows the pair term softplus(c - s), not H-UCL's debiased or
    # clamped one over several positives.
    hucl_pairs = spec.positives == "image" and (spec.debiased or spec.clamp)
    if not walk.blocked and spec.family == "tilted" and spec.hardening == "exp" and not hucl_pairs:
        cols, queue = jax.tree.map(lambda x: x[0], (walk.cols, walk.queue))
        log_mu, pairs, state = dense_terms(spec, walk.hyper, walk.rows, cols, queue, log_q)
        return state, log_mu, pairs
    # Blocked, SupCon, other hardenings, H-UCL's pairs: differentiated automatically.
    vaccumulate = jax.vmap(kernel.accumulate)
    state = walk.fold(lambda st, col_tile: vaccumulate(st, *walk.tile(col_tile)), state0)
    return state, None, None


def _supcon_sums(kernel: AnchorKernel, state: State, valid: Array, n_pos: Array) -> Array:
    """Each valid anchor's SupCon term: LSE over the contrast set minus the mean positive s."""
    lse = state["s_max"] + kernel.log_sum(state, "hi_sum")
    mean_pos = state["pos_s_sum"] / jnp.maximum(n_pos, 1.0)
    return jnp.where(valid, jnp.where(valid, lse, 0.0) - mean_pos, 0.0)


def _tilted_sums(
    walk: _TileWalk,
    kernel: AnchorKernel,
    log_mu: Array,
    pairs: Array | None,
    s_partner: Array,
    valid: Array,
    n_pos: Array,
    log_q: Any,
) -> tuple[Array, Array]:
    """Each anchor's sum of l_ij over its positives, and how many pairs enter the mean."""
    spec = walk.spec
    offset = log_q + log_mu  # the anchor's constant c in l_ij = softplus(c - s_ij)
    hucl = spec.negatives == "other_views"  # UCL / H-UCL: Robinson's estimator
    if spec.positives == "partner" and hucl:
        loss = jax.vmap(kernel.hucl_loss, in_axes=(0, 0, None))(log_mu, s_partner, log_q)
        return jnp.where(valid, loss, 0.0), valid.astype(walk.dtype)
    if spec.positives == "partner":
        pair_sum = jax.nn.softplus(offset - s_partner)
    elif pairs is not None:
        pair_sum = pairs
    else:

        def add_tile(acc: Array, col_tile: ContrastViews) -> Array:
            s, pos, _, _ = walk.tile(col_tile)
            if hucl:
                pair_terms = jax.vmap(kernel.hucl_positive_sum, in_axes=(0, 0, 0, None))
                return acc + pair_terms(log_mu, s, pos, log_q)
            return acc + jax.vmap(kernel.positive_sum)(offset, s, pos)

        zeros = jnp.zeros((walk.rows.z.shape[0],), walk.dtype)
        pair_sum = walk.fold(add_tile, zeros, with_queue=spec.queue_as_positives)
    return jnp.where(valid, pair_sum, 0.0), jnp.where(valid, n_pos, 0.0)


def _aux_sums(
    spec: Spec, kernel: AnchorKernel, state: State, valid: Array, n_pos: Array, s_partner: Array
) -> dict[str, Array]:
    """The sums LossAux is made of, over the valid anchors."""
    pos_s = s_partner if spec.positives == "partner" else state["pos_s_sum"]
    if kernel.nonlinear:
        log_w = lse_value(state["lo_max"], state["lo_sum"])
        log_w2 = lse_value(state["sq_max"], state["sq_sum"])
        ess = jnp.exp(jnp.where(valid, 2.0 * log_w - log_w2, 0.0))
    elif kernel.tilted:
        # (sum w)^2 / sum w^2, w = exp(beta s): the factors exp(beta m) cancel.
        log_w = kernel.log_sum(state, "lo_sum")
        log_w2 = kernel.log_sum(state, "sq_sum")
        ess = jnp.exp(jnp.where(valid, 2.0 * log_w - log_w2, 0.0))
    else:
        ess = state["n_neg"]
    parts = {
        "num_anchors": valid.astype(ess.dtype),
        "num_pairs": jnp.where(valid, n_pos, 0.0),
        "pos_s_sum": jnp.where(valid, lax.stop_gradient(pos_s), 0.0),
        "neg_s_sum": jnp.where(valid, state["neg_s_sum"], 0.0),
        "n_neg": jnp.where(valid, state["n_neg_aux"], 0.0),
        "ess": jnp.where(valid, lax.stop_gradient(ess), 0.0),
    }
    return cast(dict[str, Array], jax.tree.map(jnp.sum, parts))


def _anchor_terms(
    walk: _TileWalk, s_partner: Array, log_q: Any
) -> tuple[Array, Array, dict[str, Array] | None]:
    """Per-anchor loss sums and counts (and aux parts), summed over the anchors of ``walk``."""
    spec = walk.spec
    kernel = AnchorKernel(spec, walk.hyper)
    state, dense_log_mu, dense_pairs = _anchor_statistics(walk, log_q)
    valid = valid_anchors(spec, state, walk.rows.real)
    n_pos = positive_counts(spec, state)
    if spec.family == "supcon":
        anchor_sum = _supcon_sums(kernel, state, valid, n_pos)
        anchor_count = valid.astype(walk.dtype)
    else:
        log_mu = jax.vmap(kernel.log_mu)(state, valid) if dense_log_mu is None else dense_log_mu
        anchor_sum, anchor_count = _tilted_sums(
            walk, kernel, log_mu, dense_pairs, s_partner, valid, n_pos, log_q
        )
    aux_parts = _aux_sums(spec, kernel, state, valid, n_pos, s_partner) if spec.with_aux else None
    return jnp.sum(anchor_sum), jnp.sum(anchor_count), aux_parts


def _local_sums(
    spec: Spec,
    hyper: Hyper,
    rows: ContrastViews,
    s_partner: Array,
    cols: ContrastViews,
    queue: ContrastViews | None,
    log_q: Any,
    block_size: int | None,
    dtype: Any,
) -> tuple[Array, Array, dict[str, Array] | None]:
    """This device's loss total, pair count and aux parts: one walk over full rows (dense), or
    a ``lax.map`` over row blocks, each walking the column tiles (blocked)."""
    if block_size is None:  # one tile of each
        cols_tiles, queue_tiles = jax.tree.map(lambda x: x[None], (cols, queue))
        walk = _TileWalk(spec, hyper, rows, cols_tiles, queue_tiles, False, dtype)
        return _anchor_terms(walk, s_partner, log_q)
    cols_tiles, queue_tiles = jax.tree.map(
        lambda views: pad_blocks(views, block_size),
        (cols, queue),
        is_leaf=lambda x: isinstance(x, ContrastViews),
    )

    @jax.checkpoint
    def row_block(args: tuple[ContrastViews, Array]) -> Any:
        tile_rows, tile_s_partner = args
        walk = _TileWalk(spec, hyper, tile_rows, cols_tiles, queue_tiles, True, dtype)
        return _anchor_terms(walk, tile_s_partner, log_q)

    row_tiles = (pad_blocks(rows, block_size), blocked(s_partner, block_size, 0))
    totals, counts, aux_parts = lax.map(row_block, row_tiles)
    if aux_parts is not None:
        aux_parts = jax.tree.map(jnp.sum, aux_parts)
    return jnp.sum(totals), jnp.sum(counts), aux_parts


def _make_aux(aux_parts: dict[str, Array], temperature: Array) -> LossAux:
    aux_parts = lax.stop_gradient(aux_parts)
    anchors = jnp.maximum(aux_parts["num_anchors"], 1.0)
    return LossAux(
        num_anchors=aux_parts["num_anchors"],
        num_pairs=aux_parts["num_pairs"],
        mean_pos_cos=temperature
        * aux_parts["pos_s_sum"]
        / jnp.maximum(aux_parts["num_pairs"], 1.0),
        mean_neg_cos=temperature * aux_parts["neg_s_sum"] / jnp.maximum(aux_parts["n_neg"], 1.0),
        effective_negatives=aux_parts["ess"] / anchors,
    )


@jax.named_call
def _contrastive(
    spec: Spec,
    hyper: Hyper,
    views: tuple[Array, ...],
    labels: Array | None,
    queue: Queue | None,
    axis_name: Any,
    block_size: int | None,
) -> Any:
    dtype = jnp.promote_types(jnp.result_type(*views), jnp.float32)
    hyper = Hyper(*(jnp.asarray(h, dtype) for h in hyper))
    if spec.normalize:
        views = tuple(l2_normalize(view) for view in views)
    rows, cols = views_of(views, labels, axis_name)
    n_views = cols.z.shape[0]
    if len(views) == 2:  # each anchor's one partner: its similarity directly
        z_partner = jnp.concatenate(views[::-1]).astype(dtype)
        s_partner = jnp.sum(rows.z.astype(dtype) * z_partner, axis=-1) / hyper.temperature
    else:
        s_partner = jnp.zeros(rows.z.shape[:1], dtype)
    # Q = V B - V over the global batch; log(0) for B = 1 leaves no valid anchor anyway.
    log_q: Any = math.log(max(n_views - len(views), 1))
    queue_rows = None
    if queue is not None:
        queue_rows = queue_views(queue, cols.z.dtype)
        if spec.queue_q == "grows":  # Q counts the queue's filled rows too
            filled = jnp.sum(queue_rows.real, dtype=dtype)
            log_q = jnp.log(jnp.maximum(n_views - len(views) + filled, 1.0))
    total, count, aux_parts = _local_sums(
        spec, hyper, rows, s_partner, cols, queue_rows, log_q, block_size, dtype
    )
    loss = global_mean(total, count, axis_name)
    if not spec.with_aux:
        return loss
    assert aux_parts is not None
    if axis_name is not None:
        aux_parts = lax.psum(aux_parts, axis_name)
    return loss, _make_aux(aux_parts, hyper.temperature)


_contrastive_jit = jax.jit(_contrastive, static_argnums=(0, 5, 6))


@jax.named_call
def _contrastive_on_explicit_mesh(
    spec: Spec,
    hyper: Hyper,
    views: tuple[Array, ...],
    labels: Array | None,
    queue: Queue | None,
    block_size: int | None,
    batch_axes: tuple[Any, ...],
) -> Any:
    """The loss of a batch sharded over Explicit mesh axes: the batch stays split, each device's
    anchors are contrasted with the gathered batch inside ``jax.shard_map``."""

    def per_device(axis_name: Any, *args: Any) -> Any:
        *device_views, device_labels, (device_hyper, device_queue) = args
        return _contrastive(
            spec,
            device_hyper,
            tuple(device_views),
            device_labels,
            device_queue,
            axis_name,
            block_size,
        )

    return on_explicit_mesh(per_device, batch_axes, (*views, labels), (hyper, queue))


_contrastive_on_explicit_mesh_jit = jax.jit(_contrastive_on_explicit_mesh, static_argnums=(0, 5, 6))


def run(
    spec: Spec,
    hyper: Hyper,
    views: tuple[Array, ...],
    labels: Array | None,
    axis_name: Any,
    block_size: int | None,
    queue: Queue | None = None,
) -> Any:
    """The loss of ``spec`` on checked inputs, jitted unless collectives need the caller's trace."""
    if axis_name is None:
        batch_axes = explicit_batch_axes(views[0])
        if batch_axes:
            return _contrastive_on_explicit_mesh_jit(
                spec, hyper, views, labels, queue, block_size, batch_axes
            )
        return _contrastive_jit(spec, hyper, views, labels, queue, None, block_size)
    check_split(views[0], axis_name)
    # Collectives need the enclosing pmap's or shard_map's trace; a jit inside would inline.
    return _contrastive(spec, hyper, views, labels, queue, axis_name, block_size)
