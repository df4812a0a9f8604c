"""The tilted family's dense path: forward pass, custom_vjp binding and hand-written backward pass
together, as a fused kernel is kept in one file.

The forward pass runs the per-anchor kernel over chunks of anchors. The backward pass is written
by hand: per anchor, dL/ds is one closed-form expression
(``AnchorKernel.similarity_cotangent``), and the gradients of the projections are two matmuls
with it, instead of differentiating through every masked log-sum-exp. The forward pass keeps the
similarities for it up to ``MAX_SAVED_SIMILARITIES`` of them; above that the backward pass
recomputes them, and memory stays per chunk. The anchors are walked in chunks of at least
``MIN_CHUNK_ROWS``: on CPU of about ``CPU_CHUNK_SIMILARITIES`` similarities, so that a chunk's
intermediates stay in cache ((2B x 2B) temporaries cost XLA:CPU more in fresh pages than in
arithmetic); on accelerators of up to ``ACCELERATOR_CHUNK_SIMILARITIES`` (1 GB of float32), so
that a large batch does not run out of memory. Being a custom VJP, this path has no forward-mode
``jax.jvp`` (the blocked path has); Hessians work.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hscl_jax.losses._kernel import AnchorKernel, State, valid_anchors
from hscl_jax.losses._parallel import sum_to_primal_type
from hscl_jax.losses._spec import Array, Hyper, Spec
from hscl_jax.losses._views import (
    MATMUL_PRECISION,
    ContrastViews,
    concat_views,
    over_chunks,
    pad_blocks,
    similarities,
    tile,
    tile_masks,
)

CPU_CHUNK_SIMILARITIES = 1 << 18
ACCELERATOR_CHUNK_SIMILARITIES = 1 << 28
MIN_CHUNK_ROWS = 128  # fewer rows make the chunk's matmuls inefficient
# Up to this many similarities (256 MB in float32) the forward pass keeps them for the backward
# pass; above, the backward pass recomputes them (one more matmul).
MAX_SAVED_SIMILARITIES = 1 << 26


def rows_per_chunk(n_rows: int, n_cols: int) -> int:
    """How many anchors the dense path handles at once (read when a loss is traced)."""
    on_cpu = jax.default_backend() == "cpu"
    target = CPU_CHUNK_SIMILARITIES if on_cpu else ACCELERATOR_CHUNK_SIMILARITIES
    return min(n_rows, max(MIN_CHUNK_ROWS, target // max(n_cols, 1)))


class DenseMeta(NamedTuple):
    """The inputs of the dense path that get no cotangent: indices, labels and masks, log Q
    (a count), and the queue's rows (constants)."""

    row_index: Array
    row_label: Array
    row_real: Array
    row_image: Array
    col_index: Array
    col_label: Array
    col_real: Array
    col_image: Array
    log_q: Array
    queue: ContrastViews | None


def _dense_cols(z_cols: Array, meta: DenseMeta) -> ContrastViews:
    """The contrast set: the batch's views, then the queue's rows."""
    cols = ContrastViews(z_cols, meta.col_index, meta.col_label, meta.col_real, meta.col_image)
    return concat_views(cols, meta.queue)


def _dense_chunks(chunk: int, z_rows: Array, meta: DenseMeta) -> ContrastViews:
    """The anchors split into chunks of row views (num_chunks, chunk, ...)."""
    rows = ContrastViews(z_rows, meta.row_index, meta.row_label, meta.row_real, meta.row_image)
    return pad_blocks(rows, chunk)


def _dense_forward(
    spec: Spec,
    chunk: int,
    z_rows: Array,
    z_cols: Array,
    beta: Array,
    temperature: Array,
    meta: DenseMeta,
    keep_s: bool = False,
) -> Any:
    """(log_mu, positive sums or None, state, similarities or None), each (num_chunks, chunk, ...).

    The chunk layout is kept for the backward pass; dense_terms flattens the outputs.
    """
    dtype = jnp.result_type(beta)
    hyper = Hyper(beta, temperature, 0.0)
    kernel = AnchorKernel(spec, hyper)
    cols = _dense_cols(z_cols, meta)

    def one_chunk(_: None, rows: ContrastViews) -> tuple[None, Any]:
        s, pos, neg, other = tile(spec, hyper, rows, cols, dtype)
        state0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (chunk,)), kernel.init(dtype))
        state = jax.vmap(kernel.accumulate)(state0, s, pos, neg, other)
        valid = valid_anchors(spec, state, rows.real)
        log_mu = jax.vmap(kernel.log_mu)(state, valid)
        pairs = None
        if spec.positives != "partner":
            offset = meta.log_q + log_mu
            pairs = jnp.where(valid, jax.vmap(kernel.positive_sum)(offset, s, pos), 0.0)
        return None, (log_mu, pairs, state, (s if keep_s else None))

    return over_chunks(one_chunk, None, _dense_chunks(chunk, z_rows, meta))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dense_terms_vjp(
    spec: Spec,
    chunk: int,
    z_rows: Array,
    z_cols: Array,
    beta: Array,
    temperature: Array,
    meta: DenseMeta,
) -> Any:
    return _dense_forward(spec, chunk, z_rows, z_cols, beta, temperature, meta)[:3]


def _dense_terms_fwd(
    spec: Spec,
    chunk: int,
    z_rows: Array,
    z_cols: Array,
    beta: Array,
    temperature: Array,
    meta: DenseMeta,
) -> tuple[Any, Any]:
    n_cols = z_cols.shape[0] + (0 if meta.queue is None else meta.queue.z.shape[0])
    keep_s = z_rows.shape[0] * n_cols <= MAX_SAVED_SIMILARITIES
    log_mu, pairs, state, s = _dense_forward(
        spec, chunk, z_rows, z_cols, beta, temperature, meta, keep_s
    )
    return (log_mu, pairs, state), (z_rows, z_cols, beta, temperature, meta, log_mu, state, s)


def _dense_terms_bwd(spec: Spec, chunk: int, residuals: Any, cotangents: Any) -> Any:
    z_rows, z_cols, beta, temperature, meta, log_mu, state, saved_s = residuals
    g_log_mu, g_pairs, _ = cotangents  # the state holds counts and statistics: no gradient
    dtype = jnp.result_type(beta)
    hyper = Hyper(beta, temperature, 0.0)
    kernel = AnchorKernel(spec, hyper)
    cols = _dense_cols(z_cols, meta)
    cotangent_row = jax.vmap(kernel.similarity_cotangent)
    z_cols_wide = cols.z.astype(dtype)
    n_batch_cols = z_cols.shape[0]  # the queue's rows are constants: no gradient for them

    def one_chunk(carry: tuple[Array, Array, Array], args: Any) -> tuple[Any, Array]:
        dz_cols, d_beta, d_temperature = carry
        rows, chunk_state, chunk_log_mu, chunk_g_log_mu, chunk_g_pairs, s = args
        if s is None:
            s = similarities(rows, cols, hyper.temperature, dtype)
        pos, neg, _ = tile_masks(spec, rows, cols)  # pos is None for "partner"
        valid = valid_anchors(spec, chunk_state, rows.real)
        g_log_mu_valid = jnp.where(valid, chunk_g_log_mu, 0.0)
        g_pairs_valid = None if chunk_g_pairs is None else jnp.where(valid, chunk_g_pairs, 0.0)
        g_s, g_beta_rows = cotangent_row(
            chunk_state, s, pos, neg, meta.log_q + chunk_log_mu, g_log_mu_valid, g_pairs_valid
        )
        # s = z_rows z_cols^T / t.
        g_s = g_s / temperature
        dz_rows = jnp.matmul(g_s, z_cols_wide, precision=MATMUL_PRECISION)
        dz_cols = dz_cols + jnp.matmul(
            g_s[:, :n_batch_cols].T, rows.z.astype(dtype), precision=MATMUL_PRECISION
        )
        d_temperature = d_temperature - jnp.sum(g_s * s)
        return (dz_cols, d_beta + jnp.sum(g_beta_rows), d_temperature), dz_rows

    zero = jnp.zeros((), dtype)
    carry = (jnp.zeros(z_cols.shape, dtype), zero, zero)
    xs = (_dense_chunks(chunk, z_rows, meta), state, log_mu, g_log_mu, g_pairs, saved_s)
    carry, dz_rows = over_chunks(one_chunk, carry, xs)
    dz_cols, d_beta, d_temperature = carry
    dz_rows = dz_rows.reshape((-1,) + z_rows.shape[1:])[: z_rows.shape[0]]
    return (
        dz_rows.astype(z_rows.dtype),
        dz_cols.astype(z_cols.dtype),
        sum_to_primal_type(d_beta, beta).astype(jnp.result_type(beta)),
        sum_to_primal_type(d_temperature, temperature).astype(jnp.result_type(temperature)),
        None,
    )


_dense_terms_vjp.defvjp(_dense_terms_fwd, _dense_terms_bwd)


def dense_terms(
    spec: Spec,
    hyper: Hyper,
    rows: ContrastViews,
    cols: ContrastViews,
    queue: ContrastViews | None,
    log_q: Any,
) -> tuple[Array, Array | None, State]:
    """log_mu, the positive sums (but with one partner) and the state of every anchor, over full
    rows."""
    n_rows = rows.z.shape[0]
    chunk = rows_per_chunk(n_rows, cols.z.shape[0] + (0 if queue is None else queue.z.shape[0]))
    meta = DenseMeta(
        rows.index,
        rows.label,
        rows.real,
        rows.image,
        cols.index,
        cols.label,
        cols.real,
        cols.image,
        jnp.asarray(log_q, hyper.beta.dtype),
        queue,
    )
    log_mu, pairs, state = _dense_terms_vjp(
        spec, chunk, rows.z, cols.z, hyper.beta, hyper.temperature, meta
    )
    log_mu, pairs, state = jax.tree.map(lambda x: x.reshape(-1)[:n_rows], (log_mu, pairs, state))
    return log_mu, pairs, jax.lax.stop_gradient(state)
