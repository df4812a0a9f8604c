"""The paper's theory as pure functions of a batch of projections: the four-loss comparison and
Assumption 1 (SPEC.md, "The theory the project lets users check").

Layer 1: imports only :mod:`hscl_jax.losses`; imported by step.py (the train-time monitor),
analysis.py (a run's checkpoints) and anything later.

For a batch of projections ``z1, z2``:

* :func:`four_losses`: H-SCL, H-UCL, SCL and UCL with shared positives (the partner view) and the
  same Q = 2B - 2, computed by :mod:`hscl_jax.losses` (the paper's loss study).
* :func:`assumption1`: the batch estimate of Assumption 1. For anchor i the candidate set is H-UCL's
  negatives (every view but i and its partner), split by label into same-class and other-class
  views; over each part the beta-tilted mean of exp(s)::

      log m(i) = LSE_j((beta + 1) s_ij) - LSE_j(beta s_ij)

  The H-UCL mean is exactly the weighted mixture of m_same and m_diff, and m_diff is the H-SCL
  mean, so m_same >= m_diff for every anchor makes H-SCL <= H-UCL on the batch.
* :func:`theory_metrics`: both, plus whether H-SCL <= H-UCL, SCL <= UCL and UCL < H-SCL held (as
  0/1 floats); the train-time monitor. :func:`beta_sweep`: the same across betas on fixed
  embeddings, showing where the lower-bound scenario UCL < H-SCL appears.

All three batch functions take ``axis_name``: inside ``jax.pmap`` each device's anchors meet the
all-gathered global batch (view ordering as in hscl_jax.losses) and every device returns the
global figures.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hscl_jax import losses

LOSS_KEYS = ("hscl", "hucl", "scl", "ucl")
ASSUMPTION_KEYS = ("assumption_fraction", "assumption_log_ratio", "assumption_num_anchors")
FLAG_KEYS = ("hscl_le_hucl", "scl_le_ucl", "ucl_lt_hscl")
# Keys of theory_metrics; a trainer logging them under these names in metrics.jsonl lets the CLI
# build theory_train.csv without recomputing anything.
THEORY_KEYS = LOSS_KEYS + ASSUMPTION_KEYS + FLAG_KEYS
SWEEP_KEYS = ("beta", "hscl", "hucl", "scl", "ucl", "ucl_lt_hscl", "assumption_fraction")
DEFAULT_BETAS = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0)


# ----------------------------------------------------------------------------- validation


def _check_batch(z1, z2, labels) -> None:
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


def four_losses(z1, z2, labels, *, beta, temperature=0.5, axis_name=None) -> dict[str, jax.Array]:
    """The paper's loss study on one batch: {"hscl", "hucl", "scl", "ucl"} (scalars).

    All four use the partner view as the only positive and Q = 2B - 2: H-SCL and SCL with
    ``positives="partner"``, H-UCL with ``tau_plus=0`` and no clamp (the comparison setting), UCL.
    ``beta`` tilts H-SCL and H-UCL. With ``axis_name`` (inside pmap) the values are global.
    """
    common = {"temperature": temperature, "axis_name": axis_name}
    return {
        "hscl": losses.hscl(z1, z2, labels, beta=beta, positives="partner", **common),
        "hucl": losses.hucl(z1, z2, beta=beta, tau_plus=0.0, clamp=False, **common),
        "scl": losses.scl(z1, z2, labels, positives="partner", **common),
        "ucl": losses.ucl(z1, z2, **common),
    }


# ----------------------------------------------------------------------------- Assumption 1


def _tilted_log_mean(s_row, mask, beta):
    """log of sum_j exp((beta+1) s_j) / sum_j exp(beta s_j) over the masked j of one anchor."""
    lse = losses.masked_logsumexp
    return lse((beta + 1.0) * s_row, mask) - lse(beta * s_row, mask)


def _assumption1_sums(z1, z2, labels, beta, temperature, axis_name):
    """Anchors counted, anchors for which m_same >= m_diff, and the sum of their log-ratios."""
    dtype = jnp.promote_types(jnp.result_type(z1, z2), jnp.float32)
    rows, row_partner, cols = losses.contrast_views(z1, z2, labels, axis_name)
    row_index, row_label = rows.index, rows.label
    col_index, col_label = cols.index, cols.label
    rows, cols = rows.z.astype(dtype), cols.z.astype(dtype)
    s = rows @ cols.T / temperature
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


def _assumption1(z1, z2, labels, beta, temperature, axis_name):
    beta = jnp.asarray(beta, jnp.float32)
    z1, z2 = lax.stop_gradient(z1), lax.stop_gradient(z2)
    num_counted, num_holding, log_ratio_sum = _assumption1_sums(
        z1, z2, labels, beta, temperature, axis_name
    )
    denominator = jnp.maximum(num_counted, 1.0)
    return {
        "assumption_fraction": (num_holding / denominator).astype(jnp.float32),
        "assumption_log_ratio": (log_ratio_sum / denominator).astype(jnp.float32),
        "assumption_num_anchors": num_counted.astype(jnp.float32),
    }


_assumption1_jit = jax.jit(_assumption1, static_argnums=(5,))


def assumption1(z1, z2, labels, *, beta, temperature=0.5, axis_name=None) -> dict[str, jax.Array]:
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


# ----------------------------------------------------------------------------- combined


def _theory_metrics(z1, z2, labels, beta, temperature, axis_name):
    z1, z2 = lax.stop_gradient(z1), lax.stop_gradient(z2)
    metrics = four_losses(z1, z2, labels, beta=beta, temperature=temperature, axis_name=axis_name)
    metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    metrics.update(_assumption1(z1, z2, labels, beta, temperature, axis_name))
    metrics["hscl_le_hucl"] = (metrics["hscl"] <= metrics["hucl"]).astype(jnp.float32)
    metrics["scl_le_ucl"] = (metrics["scl"] <= metrics["ucl"]).astype(jnp.float32)
    metrics["ucl_lt_hscl"] = (metrics["ucl"] < metrics["hscl"]).astype(jnp.float32)
    return metrics


_theory_metrics_jit = jax.jit(_theory_metrics, static_argnums=(5,))


def theory_metrics(
    z1, z2, labels, *, beta, temperature=0.5, axis_name=None
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
def _sweep(z1, z2, labels, betas, temperature):
    return jax.vmap(lambda beta: _theory_metrics(z1, z2, labels, beta, temperature, None))(betas)


def beta_sweep(z1, z2, labels, betas: Iterable[float], *, temperature=0.5) -> dict[str, np.ndarray]:
    """H-SCL vs UCL (and H-UCL, SCL, Assumption 1) across ``betas`` on fixed embeddings.

    Returns numpy arrays of len(betas) keyed by SWEEP_KEYS: ``beta``, the four losses (SCL and
    UCL do not depend on beta), ``ucl_lt_hscl`` (1.0 where the lower-bound scenario UCL < H-SCL
    holds) and ``assumption_fraction`` at that beta. One compilation serves any betas of the
    same length.
    """
    _check_batch(z1, z2, labels)
    temperature = losses.check_temperature(temperature)
    betas = [losses.check_beta(beta) for beta in betas]
    if not betas:
        raise ValueError("betas must hold at least one value >= 0, got none")
    swept = _sweep(z1, z2, labels, jnp.asarray(betas, jnp.float32), temperature)
    result = {"beta": np.asarray(betas, np.float64)}
    result.update({k: np.asarray(swept[k]) for k in SWEEP_KEYS if k != "beta"})
    return result
