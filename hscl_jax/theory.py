"""The paper's theory as pure functions of a batch of projections: the four-loss comparison and
Assumption 1 (docs/losses.md), and the check of ``config.theory``, the train-time monitor's
settings (:func:`check_config`).

For a batch of projections ``z1, z2``:

* :func:`four_losses`: H-SCL, H-UCL, SCL and UCL with shared positives (the partner view) and the
  same Q = 2B - 2, computed by :mod:`hscl_jax.losses` (the paper's loss study).
* :func:`assumption1`: the batch estimate of Assumption 1. For anchor i the candidate set is H-UCL's
  negatives (every view but i and its partner), split by label into same-class and other-class
  views; over each part the beta-tilted mean of exp(s)::

      log m(i) = LSE_j((beta + 1) s_ij) - LSE_j(beta s_ij)

  The H-UCL mean is exactly the weighted mixture of m_same and m_diff, and m_diff is the H-SCL
  mean, so m_same >= m_diff for every anchor makes H-SCL <= H-UCL on the batch.
* :func:`hscl_against_negatives`: the H-SCL loss of a batch's anchors (partner positive, Q =
  2B - 2) with log_mu taken over the other-class rows of any given set of negatives: the batch's
  own views (the batch estimate, equal to hscl_jax.losses.hscl), the batch plus a queue, or a large
  fixed reference set. :func:`negative_set_estimates` compares them: how far the estimate with
  N = batch + first k queue rows sits from the reference one as k grows (the paper's analysis is
  for N -> infinity, where the estimate of the tilted mean stops depending on the sample).
* :func:`theory_metrics`: both, plus whether H-SCL <= H-UCL, SCL <= UCL and UCL < H-SCL held (as
  0/1 floats); the train-time monitor. :func:`beta_sweep`: the same across betas on fixed
  embeddings, showing where the lower-bound scenario UCL < H-SCL appears.

All three batch functions take ``axis_name``: inside ``jax.pmap`` each device's anchors meet the
all-gathered global batch (view ordering as in hscl_jax.losses) and every device returns the
global figures.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from hscl_jax import losses

if TYPE_CHECKING:
    import ml_collections

LOSS_KEYS = ("hscl", "hucl", "scl", "ucl")
ASSUMPTION_KEYS = ("assumption_fraction", "assumption_log_ratio", "assumption_num_anchors")
FLAG_KEYS = ("hscl_le_hucl", "scl_le_ucl", "ucl_lt_hscl")
# Keys of theory_metrics; a trainer logging them under these names in metrics.jsonl lets the CLI
# build theory_train.csv without recomputing anything.
THEORY_KEYS = LOSS_KEYS + ASSUMPTION_KEYS + FLAG_KEYS
SWEEP_KEYS = ("beta", "hscl", "hucl", "scl", "ucl", "ucl_lt_hscl", "assumption_fraction")
DEFAULT_BETAS = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0)


# ----------------------------------------------------------------------------- validation


def check_config(theory_config: ml_collections.ConfigDict) -> None:
    """``config.theory``: ``enabled`` a bool, ``reference_size`` an integer >= 0, ``beta`` and
    ``temperature`` None (follow config.loss) or valid for the losses; ValueError (one line
    naming the field) otherwise."""
    if not isinstance(theory_config.enabled, bool):
        raise ValueError(f"theory.enabled={theory_config.enabled!r} must be True or False")
    size = theory_config.reference_size
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"theory.reference_size={size!r} must be an integer >= 0")
    for key, check, allowed in (
        ("beta", losses.check_beta, ">= 0"),
        ("temperature", losses.check_temperature, "> 0"),
    ):
        value = theory_config[key]
        try:
            if value is not None:
                check(value)
        except ValueError:
            raise ValueError(
                f"theory.{key}={value!r} must be None (follow config.loss) or a finite number "
                f"{allowed}"
            ) from None


def _check_batch(z1: ArrayLike, z2: ArrayLike, labels: ArrayLike) -> None:
    z1_shape, z2_shape = jnp.shape(z1), jnp.shape(z2)
    if len(z1_shape) != 2 or z1_shape != z2_shape or z1_shape[0] < 1:
        raise ValueError(
            f"z1 and z2 must both have shape (batch >= 1, dim), got {z1_shape} and {z2_shape}"
        )
    if jnp.shape(labels) != (z1_shape[0],):
        raise ValueError(
            f"labels must have shape ({z1_shape[0]},) to match z1, got {jnp.shape(labels)}"
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {jnp.result_type(labels)}")


# ----------------------------------------------------------------------------- four losses


def four_losses(
    z1: ArrayLike,
    z2: ArrayLike,
    labels: ArrayLike,
    *,
    beta: ArrayLike,
    temperature: ArrayLike = 0.5,
    axis_name: Hashable | None = None,
) -> dict[str, jax.Array]:
    """The paper's loss study on one batch: {"hscl", "hucl", "scl", "ucl"} (scalars).

    All four use the partner view as the only positive and Q = 2B - 2: H-SCL and SCL with
    ``positives="partner"``, H-UCL with ``tau_plus=0`` and no clamp (the comparison setting), UCL.
    ``beta`` tilts H-SCL and H-UCL. With ``axis_name`` (inside pmap) the values are global.
    """
    return {
        "hscl": losses.hscl(
            z1,
            z2,
            labels,
            beta=beta,
            positives="partner",
            temperature=temperature,
            axis_name=axis_name,
        ),
        "hucl": losses.hucl(
            z1,
            z2,
            beta=beta,
            tau_plus=0.0,
            clamp=False,
            temperature=temperature,
            axis_name=axis_name,
        ),
        "scl": losses.scl(
            z1, z2, labels, positives="partner", temperature=temperature, axis_name=axis_name
        ),
        "ucl": losses.ucl(z1, z2, temperature=temperature, axis_name=axis_name),
    }


# ----------------------------------------------------------------------------- Assumption 1


def _tilted_log_mean(s_row: jax.Array, mask: jax.Array, beta: jax.Array) -> jax.Array:
    """log of sum_j exp((beta+1) s_j) / sum_j exp(beta s_j) over the masked j of one anchor."""
    lse = losses.masked_logsumexp
    return lse((beta + 1.0) * s_row, mask) - lse(beta * s_row, mask)


def _assumption1_sums(
    z1: ArrayLike,
    z2: ArrayLike,
    labels: ArrayLike,
    beta: jax.Array,
    temperature: ArrayLike,
    axis_name: Hashable | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Anchors counted, anchors for which m_same >= m_diff, and the sum of their log-ratios."""
    dtype = jnp.promote_types(jnp.result_type(z1, z2), jnp.float32)
    rows, row_partner, cols = losses.contrast_views(
        jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(labels), axis_name
    )
    row_index, row_label = rows.index, rows.label
    col_index, col_label = cols.index, cols.label
    row_z, col_z = rows.z.astype(dtype), cols.z.astype(dtype)
    s = jnp.matmul(row_z, col_z.T, precision=losses.MATMUL_PRECISION) / temperature
    candidate = (col_index[None, :] != row_index[:, None]) & (
        col_index[None, :] != row_partner[:, None]
    )
    same_label = col_label[None, :] == row_label[:, None]
    same, diff = candidate & same_label, candidate & ~same_label

    per_anchor = jax.vmap(_tilted_log_mean, in_axes=(0, 0, None))
    log_m_same = per_anchor(s, same, beta)
    log_m_diff = per_anchor(s, diff, beta)
    counted = jnp.any(same, axis=1) & jnp.any(diff, axis=1)
    log_ratio = jnp.where(counted, log_m_same - log_m_diff, 0.0)
    sums = (
        jnp.sum(counted, dtype=dtype),
        jnp.sum(counted & (log_ratio >= 0), dtype=dtype),
        jnp.sum(log_ratio),
    )
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    return sums


def _assumption1(
    z1: ArrayLike,
    z2: ArrayLike,
    labels: ArrayLike,
    beta: ArrayLike,
    temperature: ArrayLike,
    axis_name: Hashable | None,
) -> dict[str, jax.Array]:
    num_counted, num_holding, log_ratio_sum = _assumption1_sums(
        lax.stop_gradient(z1),
        lax.stop_gradient(z2),
        labels,
        jnp.asarray(beta, jnp.float32),
        temperature,
        axis_name,
    )
    denominator = jnp.maximum(num_counted, 1.0)
    return {
        "assumption_fraction": (num_holding / denominator).astype(jnp.float32),
        "assumption_log_ratio": (log_ratio_sum / denominator).astype(jnp.float32),
        "assumption_num_anchors": num_counted.astype(jnp.float32),
    }


_assumption1_jit = jax.jit(_assumption1, static_argnums=(5,))


def assumption1(
    z1: ArrayLike,
    z2: ArrayLike,
    labels: ArrayLike,
    *,
    beta: ArrayLike,
    temperature: ArrayLike = 0.5,
    axis_name: Hashable | None = None,
) -> dict[str, jax.Array]:
    """Batch estimate of Assumption 1 (m_same >= m_diff per anchor), global under pmap.

    For anchor i, ``m_same`` / ``m_diff`` are the beta-tilted means of exp(s_ij) over the
    same-class / other-class views among H-UCL's negatives of i (every view but i and its
    partner). Anchors with both sets non-empty are counted.

    Returns float32 scalars: ``assumption_fraction`` (fraction of counted anchors with
    m_same >= m_diff; 0 when none is counted), ``assumption_log_ratio`` (mean over counted anchors
    of log(m_same / m_diff)) and ``assumption_num_anchors`` (anchors counted).
    """
    _check_batch(z1, z2, labels)
    beta = losses.check_beta(beta)
    temperature = losses.check_temperature(temperature)
    if axis_name is None:
        return _assumption1_jit(z1, z2, labels, beta, temperature, None)
    return _assumption1(z1, z2, labels, beta, temperature, axis_name)


# ----------------------------------------------------------------------------- N -> infinity


def _hscl_against_negatives(
    z1: jax.Array,
    z2: jax.Array,
    labels: jax.Array,
    negatives: jax.Array,
    negative_labels: jax.Array,
    negative_valid: jax.Array,
    beta: jax.Array,
    t: jax.Array,
) -> jax.Array:
    dtype = jnp.promote_types(jnp.result_type(z1, z2), jnp.float32)
    anchors = jnp.concatenate([z1, z2]).astype(dtype)
    partners = jnp.concatenate([z2, z1]).astype(dtype)
    anchor_labels = jnp.concatenate([labels, labels])
    s = jnp.matmul(anchors, negatives.astype(dtype).T, precision=losses.MATMUL_PRECISION) / t
    s_partner = jnp.sum(anchors * partners, axis=-1) / t
    mask = negative_valid[None, :] & (negative_labels[None, :] != anchor_labels[:, None])
    log_mu = jax.vmap(_tilted_log_mean, in_axes=(0, 0, None))(s, mask, beta)
    counted = jnp.any(mask, axis=1)
    log_q = jnp.log(jnp.maximum(anchors.shape[0] - 2, 1).astype(dtype))
    per_anchor = jax.nn.softplus(log_q + jnp.where(counted, log_mu, 0.0) - s_partner)
    total = jnp.sum(jnp.where(counted, per_anchor, 0.0))
    return (total / jnp.maximum(jnp.sum(counted), 1)).astype(jnp.float32)


def hscl_against_negatives(
    z1: ArrayLike,
    z2: ArrayLike,
    labels: ArrayLike,
    negatives: ArrayLike,
    negative_labels: ArrayLike,
    negative_valid: ArrayLike | None = None,
    *,
    beta: ArrayLike,
    temperature: ArrayLike = 0.5,
) -> jax.Array:
    """H-SCL of the batch ``z1, z2`` (anchors: all 2B views, positive: the partner view, Q = 2B -
    2, as in :func:`four_losses`) with each anchor's tilted mean taken over the rows of
    ``negatives`` (N, d) whose label differs from the anchor's (and ``negative_valid``, (N,) bool,
    when given). With ``negatives`` = the batch's own views this is losses.hscl(...,
    positives="partner"); anchors without any negative are left out of the mean. No gradient.
    """
    _check_batch(z1, z2, labels)
    beta = losses.check_beta(beta)
    temperature = losses.check_temperature(temperature)
    if negative_valid is None:
        negative_valid = jnp.ones(jnp.shape(negative_labels), bool)
    args = (z1, z2, labels, negatives, negative_labels, negative_valid)
    return _hscl_against_negatives_jit(*(lax.stop_gradient(a) for a in args), beta, temperature)


_hscl_against_negatives_jit = jax.jit(_hscl_against_negatives)


def queue_prefix_sizes(queue_size: int) -> tuple[int, ...]:
    """The queue lengths :func:`negative_set_estimates` reports: 0 and K/8, K/4, K/2, K."""
    return (0,) + tuple(
        sorted({queue_size // 8, queue_size // 4, queue_size // 2, queue_size} - {0})
    )


def negative_set_estimates(
    z1: ArrayLike,
    z2: ArrayLike,
    labels: ArrayLike,
    reference: ArrayLike,
    reference_labels: ArrayLike,
    *,
    beta: ArrayLike,
    temperature: ArrayLike = 0.5,
    queue_keys: ArrayLike | None = None,
    queue_labels: ArrayLike | None = None,
    queue_count: int | jax.Array = 0,
) -> dict[str, float]:
    """The batch's H-SCL (:func:`hscl_against_negatives`) with three kinds of negative set.

    ``hscl_reference``: over the fixed ``reference`` set (M, d) with ``reference_labels``;
    ``hscl_batch``: over the batch's own 2B views (the batch estimate); ``hscl_queue_<k>`` for k in
    :func:`queue_prefix_sizes` of the queue (``queue_keys`` (K, d), newest first, its first
    ``queue_count`` rows filled): over the batch plus the queue's newest k rows. ``gap_<name>`` is
    each estimate minus ``hscl_reference``. Plain floats.
    """
    batch_views = jnp.concatenate([z1, z2])
    batch_labels = jnp.concatenate([labels, labels])
    common = {"beta": beta, "temperature": temperature}
    out = {
        "hscl_reference": hscl_against_negatives(
            z1, z2, labels, reference, reference_labels, **common
        ),
        "hscl_batch": hscl_against_negatives(z1, z2, labels, batch_views, batch_labels, **common),
    }
    if queue_keys is not None:
        if queue_labels is None:
            raise ValueError("queue_labels must be given with queue_keys")
        size = jnp.shape(queue_labels)[0]
        negatives = jnp.concatenate([batch_views, queue_keys])
        negative_labels = jnp.concatenate([batch_labels, queue_labels])
        for k in queue_prefix_sizes(size)[1:]:
            in_queue = jnp.arange(size) < min(k, int(queue_count))
            valid = jnp.concatenate([jnp.ones(batch_labels.shape, bool), in_queue])
            out[f"hscl_queue_{k}"] = hscl_against_negatives(
                z1, z2, labels, negatives, negative_labels, valid, **common
            )
    estimates = {key: float(value) for key, value in out.items()}
    for key in list(estimates):
        if key != "hscl_reference":
            estimates["gap_" + key[len("hscl_") :]] = estimates[key] - estimates["hscl_reference"]
    return estimates


# ----------------------------------------------------------------------------- combined


def _theory_metrics(
    z1: ArrayLike,
    z2: ArrayLike,
    labels: ArrayLike,
    beta: ArrayLike,
    temperature: ArrayLike,
    axis_name: Hashable | None,
) -> dict[str, jax.Array]:
    z1, z2 = lax.stop_gradient(z1), lax.stop_gradient(z2)
    losses_four = four_losses(
        z1, z2, labels, beta=beta, temperature=temperature, axis_name=axis_name
    )
    metrics = {k: v.astype(jnp.float32) for k, v in losses_four.items()}
    metrics.update(_assumption1(z1, z2, labels, beta, temperature, axis_name))
    metrics["hscl_le_hucl"] = (metrics["hscl"] <= metrics["hucl"]).astype(jnp.float32)
    metrics["scl_le_ucl"] = (metrics["scl"] <= metrics["ucl"]).astype(jnp.float32)
    metrics["ucl_lt_hscl"] = (metrics["ucl"] < metrics["hscl"]).astype(jnp.float32)
    return metrics


_theory_metrics_jit = jax.jit(_theory_metrics, static_argnums=(5,))


def theory_metrics(
    z1: ArrayLike,
    z2: ArrayLike,
    labels: ArrayLike,
    *,
    beta: ArrayLike,
    temperature: ArrayLike = 0.5,
    axis_name: Hashable | None = None,
) -> dict[str, jax.Array]:
    """The train-time theory monitor: :func:`four_losses`, :func:`assumption1` and the flags.

    Returns float32 scalars keyed by THEORY_KEYS: the four losses, the three Assumption 1
    figures, and ``hscl_le_hucl``, ``scl_le_ucl``, ``ucl_lt_hscl`` (1.0 where the inequality held
    on this batch, else 0.0). No gradient flows through it. ``beta`` and ``temperature`` are traced,
    so changing them does not recompile. With ``axis_name`` (inside pmap) all figures are global.
    """
    _check_batch(z1, z2, labels)
    beta = losses.check_beta(beta)
    temperature = losses.check_temperature(temperature)
    if axis_name is None:
        return _theory_metrics_jit(z1, z2, labels, beta, temperature, None)
    return _theory_metrics(z1, z2, labels, beta, temperature, axis_name)


@jax.jit
def _sweep(
    z1: jax.Array, z2: jax.Array, labels: jax.Array, betas: jax.Array, temperature: jax.Array
) -> dict[str, jax.Array]:
    return jax.vmap(lambda beta: _theory_metrics(z1, z2, labels, beta, temperature, None))(betas)


def beta_sweep(
    z1: ArrayLike,
    z2: ArrayLike,
    labels: ArrayLike,
    betas: Iterable[float],
    *,
    temperature: float = 0.5,
) -> dict[str, np.ndarray]:
    """H-SCL vs UCL (and H-UCL, SCL, Assumption 1) across ``betas`` on fixed embeddings.

    Returns numpy arrays of len(betas) keyed by SWEEP_KEYS: ``beta``, the four losses (SCL and
    UCL do not depend on beta), ``ucl_lt_hscl`` (1.0 where the lower-bound scenario UCL < H-SCL
    holds) and ``assumption_fraction`` at that beta. One compilation serves any betas of the
    same length.
    """
    _check_batch(z1, z2, labels)
    temperature = losses.check_temperature(temperature)
    checked = [losses.check_beta(beta) for beta in betas]
    if not checked:
        raise ValueError("betas must hold at least one value >= 0, got none")
    swept = _sweep(z1, z2, labels, jnp.asarray(checked, jnp.float32), temperature)
    result = {"beta": np.asarray(checked, np.float64)}
    result.update({k: np.asarray(swept[k]) for k in SWEEP_KEYS if k != "beta"})
    return result
