"""Contrastive loss kernels: UCL (SimCLR), SCL, H-UCL, H-SCL and SupCon.

Every loss takes the L2-normalised projections of two views, ``z1`` and ``z2`` of shape
``(B, d)`` (row ``i`` of each is the same image), and returns a scalar. The 2B views are ordered
view 1 of every image first, then view 2, so view ``i`` and view ``i + B`` are partners.

The tilted family (UCL, SCL, H-UCL, H-SCL) shares one shape, per anchor ``i`` and positive ``j``::

    log_mu(i) = LSE_k((beta + 1) s_ik) - LSE_k(beta s_ik)      # k over the anchor's negatives
    l_ij      = softplus(log Q + log_mu(i) - s_ij)              # Q = 2B - 2, fixed

with ``s = z z^T / temperature``. SCL and H-SCL draw negatives from other classes only; UCL and
H-UCL from every view but the anchor and its partner. ``beta = 0`` is the untilted loss.

How the kernels are built:

* A per-anchor kernel (one anchor's row of similarities and its positive/negative masks in,
  running log-sum-exp statistics out) is ``jax.vmap``-ed over anchors; the batch-level code only
  builds masks and reduces. Everything is in log space and accumulated in float32 (float64 for
  float64 inputs), also for bfloat16 inputs. ``float32_beta_limit(temperature)`` is the beta up
  to which float32 gradients are accurate to 1e-3 (measured).
* Anchors with no positive or no negative are left out of the mean, never NaN. A batch with no
  valid anchor at all returns 0; ``return_aux=True`` returns ``(loss, LossAux)`` whose
  ``num_anchors`` says how many anchors entered the mean (0 in that case).
* ``axis_name``: inside ``jax.pmap(..., axis_name=...)`` each device's anchors are contrasted
  with the whole global batch (projections and labels all-gathered). Every device returns the
  global loss, and the gradient a device gets for its own ``z1, z2`` is its slice of the gradient
  of the global loss on the concatenated batch. Parameter gradients must therefore be *summed*
  over devices.
* Dense (``block_size=None``), tilted family: the backward pass is written by hand. Per anchor,
  dL/ds is one closed-form expression (``_AnchorKernel.similarity_cotangent``); the gradients of
  the projections are two matmuls with it. The forward pass keeps the similarities for it up to
  2^26 of them (256 MB in float32); above that the backward pass recomputes them, and memory
  stays per chunk. The anchors are walked in chunks of at least 128: on CPU of about 2^18
  similarities, so that a chunk's intermediates stay in cache ((2B x 2B) temporaries cost XLA:CPU
  more in fresh pages than in arithmetic); on accelerators of up to 2^28 (1 GB). Being a custom
  VJP, this path has no forward-mode ``jax.jvp`` (``block_size`` has); Hessians work. SupCon's
  dense path is differentiated automatically.
* ``block_size``: the same loss, values and gradients, computed over ``block_size x block_size``
  tiles of the similarity matrix with running log-sum-exp accumulators. The (2B x 2B) matrix is
  never materialised; tiles are recomputed in the backward pass (``jax.checkpoint``).

* ``hardening`` (hscl, hucl): the log-weight of each negative, ``"exp"`` (beta s, default),
  ``"topk"``, ``"poly"`` or a callable of s; only ``"exp"`` takes the hand-written dense
  backward, the others are differentiated automatically (dense: one tile; blocked: tiles).
* ``queue`` (every loss): a ``Queue`` of labelled extra contrast rows, constants for autodiff,
  appended after the batch's views (dense) or walked as tiles after the batch's (blocked).

Hyper-parameters (``beta``, ``temperature``, ``tau_plus``) are validated eagerly when they are
concrete numbers and are traced into the compiled kernel, so sweeping them does not recompile; a
traced value (``jax.vmap`` over ``beta``, say) is accepted unchecked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LOSS_NAMES = ("ucl", "scl", "hucl", "hscl", "supcon")
POSITIVES = ("all", "partner")

Array = jax.Array

# float32 gradient accuracy of the tilted losses, measured (tests/test_losses_precision.py says
# how the error is defined; python bench/losses.py --float32-limit measures it).
FLOAT32_GRADIENT_TOLERANCE = 1e-3
FLOAT32_BETA_LIMIT_PER_INVERSE_TEMPERATURE = 3000.0
FLOAT32_BETA_LIMIT_CAP = 600.0


def float32_beta_limit(temperature: float) -> float:
    """The largest beta at which float32 gradients of hscl/hucl stay within 1e-3 of float64.

    ``min(3000 * temperature, 600)``. The error is ``||g32 - g64|| / ||g64||`` over the gradients
    of z1 and z2, g64 from the same inputs in float64. What limits float32 is the rounding of
    the similarities themselves (about 2^-24 / t absolute), which the tilt multiplies by beta;
    the kernels add no error of their own beyond it. The limit is set by the worst case we could
    construct, every embedding within a cone so narrow that the spread of s over the negatives
    is about 1/beta (``python bench/losses.py --float32-limit``): there the error is 7e-4 to
    9e-4 at this beta for t in [0.05, 1], and doubles with beta. On typical batches float32 is
    far better: random unit batches stay below 3e-5 at this beta and below 3e-4 at beta 10,000.
    The trainer's config check warns above this limit.
    """
    temperature = _check_number("temperature", temperature, low=0.0, low_inclusive=False)
    return min(FLOAT32_BETA_LIMIT_PER_INVERSE_TEMPERATURE * temperature, FLOAT32_BETA_LIMIT_CAP)


class LossAux(NamedTuple):
    """Batch statistics returned next to the loss by ``return_aux=True`` (global under pmap).

    Attributes:
      num_anchors: anchors that entered the mean (at least one positive and one negative).
      num_pairs: (anchor, positive) pairs that entered the mean.
      mean_pos_cos: mean cosine similarity of those pairs.
      mean_neg_cos: mean cosine similarity of (valid anchor, negative) pairs; for SupCon the
        negatives are the other-class views.
      effective_negatives: mean over valid anchors of the effective number of negatives under the
        tilt, ``(sum_k w_k)^2 / sum_k w_k^2`` with ``w_k = exp(beta s_ik)``; the plain count of
        negatives when ``beta = 0``.
    """

    num_anchors: Array
    num_pairs: Array
    mean_pos_cos: Array
    mean_neg_cos: Array
    effective_negatives: Array


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of one loss: which views are negatives, positives, and the estimator.

    Only structure lives here; the values of beta, temperature and tau_plus are traced
    (``_Hyper``), so sweeping them does not recompile.
    """

    family: str  # "tilted" (UCL/SCL/H-UCL/H-SCL) or "supcon"
    negatives: str  # "other_class" | "other_views" (not self, not partner) | "not_self"
    positives: str  # "all" | "partner"
    tilted: bool = False  # the negatives carry log-weights (beta > 0, "poly", a callable)
    detach_weights: bool = False
    debiased: bool = False  # tau_plus > 0
    clamp: bool = False
    with_aux: bool = False
    hardening: str = "exp"  # "exp" | "topk" | "poly" | "callable"
    log_weight: Callable[[Array], Array] | None = None  # the user's function, "callable" only
    top_k: int | None = None
    queue: bool = False  # a Queue of extra contrast rows is passed
    queue_as_positives: bool = False
    queue_q: str = "fixed"


class _Hyper(NamedTuple):
    beta: Any
    temperature: Any
    tau_plus: Any


class Queue(NamedTuple):
    """Labelled extra contrast rows, e.g. a MoCo-style FIFO of key projections.

    Attributes:
      z: (K, d) L2-normalised projections. Treated as constants: no gradient reaches them.
      labels: (K,) integer class ids (ignored by ucl and hucl).
      valid: (K,) bool; False marks a row not filled yet, which is left out of every mask
        (never contrasted as a zero vector).

    Queue rows are never anchors. As negatives they enter as the batch's views would: the
    other-class rows for scl/hscl/supcon, every valid row for ucl/hucl. Same-label rows are
    positives of the supervised losses only with ``queue_as_positives=True`` (and then SupCon's
    contrast set holds them too); otherwise they are left out. Under ``pmap`` the queue is the
    same on every device and is not gathered.
    """

    z: Array
    labels: Array
    valid: Array


# ----------------------------------------------------------------------------- validation


def _check_number(name: str, value: Any, *, low: float, low_inclusive: bool, high=None):
    """Validates a hyper-parameter; a traced value (e.g. under jax.vmap over beta) passes as is."""
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, jax.Array | np.ndarray) and value.shape == ():
        value = value.item()
    allowed = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number {allowed}, got {value!r}")
    value = float(value)
    too_low = value < low if low_inclusive else value <= low
    if not math.isfinite(value) or too_low or (high is not None and value >= high):
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")
    return value


def check_beta(value: Any):
    """A concrete beta as a float (finite, >= 0); a traced value passes as is."""
    return _check_number("beta", value, low=0.0, low_inclusive=True)


def check_temperature(value: Any):
    """A concrete temperature as a float (finite, > 0); a traced value passes as is."""
    return _check_number("temperature", value, low=0.0, low_inclusive=False)


def _check_inputs(z1, z2, labels, block_size) -> None:
    z1_shape, z2_shape = jnp.shape(z1), jnp.shape(z2)
    if len(z1_shape) != 2 or z1_shape != z2_shape:
        raise ValueError(
            f"z1 and z2 must both have shape (batch, dim), got {z1_shape} and {z2_shape}"
        )
    if z1_shape[0] < 1:
        raise ValueError(f"the batch must hold at least one image, got shape {z1_shape}")
    for name, z in (("z1", z1), ("z2", z2)):
        if not jnp.issubdtype(jnp.result_type(z), jnp.floating):
            raise ValueError(f"{name} must be floating point, got dtype {jnp.result_type(z)}")
    if labels is not None:
        if jnp.shape(labels) != (z1_shape[0],):
            raise ValueError(
                f"labels must have shape ({z1_shape[0]},) to match z1, got {jnp.shape(labels)}"
            )
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise ValueError(
                f"labels must be integers, got dtype {jnp.result_type(labels)}; "
                "cast class ids with labels.astype(jnp.int32)"
            )
    if block_size is not None and (
        isinstance(block_size, bool)
        or not isinstance(block_size, numbers.Integral)
        or block_size < 1
    ):
        raise ValueError(f"block_size must be None or a positive integer, got {block_size!r}")


HARDENINGS = ("exp", "topk", "poly")
QUEUE_Q_MODES = ("fixed", "grows")
# "poly" floors 1 + cos here, so that a negative exactly opposite the anchor gets a tiny weight
# rather than log(0) and an infinite derivative.
_POLY_MIN_ONE_PLUS_COS = 1e-6


def _check_hardening(hardening: Any, beta: Any, top_k: Any):
    """(spec fields, beta to trace) for a hardening; beta is left out where it is not used."""
    if callable(hardening):
        name = "callable"
    elif isinstance(hardening, str) and hardening in HARDENINGS:
        name = hardening
    else:
        raise ValueError(
            f"hardening must be one of {HARDENINGS} or a callable s -> log-weight, "
            f"got {hardening!r}"
        )
    shown = "a callable" if name == "callable" else repr(name)
    if name in ("exp", "poly"):
        if beta is None:
            raise ValueError(f"beta is required with hardening={shown}, got None")
        beta = _check_number("beta", beta, low=0.0, low_inclusive=True)
    elif beta is not None:
        raise ValueError(
            f"beta is not used with hardening={shown}, got beta={beta!r}; leave it out"
            + (" (fold it into the callable)" if name == "callable" else "")
        )
    if name == "topk":
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(
                f"top_k must be a positive integer with hardening='topk', got {top_k!r}"
            )
        top_k = int(top_k)
    elif top_k is not None:
        raise ValueError(f"top_k is used with hardening='topk' only, got top_k={top_k!r}")
    fields = {
        "hardening": name,
        "log_weight": hardening if name == "callable" else None,
        "top_k": top_k,
        "tilted": name in ("poly", "callable") or (name == "exp" and _maybe_positive(beta)),
    }
    return fields, (0.0 if beta is None else beta)


def _check_queue(queue: Any, z1, queue_q: Any, queue_as_positives: Any = False):
    """(spec fields, the queue as arrays) for the queue options."""
    if queue_q not in QUEUE_Q_MODES:
        raise ValueError(f"queue_q must be one of {QUEUE_Q_MODES}, got {queue_q!r}")
    if not isinstance(queue_as_positives, bool):
        raise ValueError(f"queue_as_positives must be True or False, got {queue_as_positives!r}")
    if queue is None:
        return {}, None
    if not isinstance(queue, tuple) or len(queue) != 3:
        raise ValueError(f"queue must be a losses.Queue(z, labels, valid) or None, got {queue!r}")
    z, labels, valid = queue
    dim = jnp.shape(z1)[-1] if len(jnp.shape(z1)) == 2 else None
    if len(jnp.shape(z)) != 2 or jnp.shape(z)[1] != dim:
        raise ValueError(f"queue.z must have shape (K, {dim}) to match z1, got {jnp.shape(z)}")
    size = jnp.shape(z)[0]
    if not jnp.issubdtype(jnp.result_type(z), jnp.floating):
        raise ValueError(f"queue.z must be floating point, got dtype {jnp.result_type(z)}")
    if jnp.shape(labels) != (size,) or not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(
            f"queue.labels must be integers of shape ({size},), got "
            f"{jnp.result_type(labels)} {jnp.shape(labels)}"
        )
    if jnp.shape(valid) != (size,) or jnp.result_type(valid) != jnp.bool_:
        raise ValueError(
            f"queue.valid must be booleans of shape ({size},), got "
            f"{jnp.result_type(valid)} {jnp.shape(valid)}"
        )
    fields = {"queue": True, "queue_as_positives": queue_as_positives, "queue_q": queue_q}
    return fields, Queue(z, labels, valid)


def _maybe_positive(value) -> bool:
    """Whether a hyper-parameter may be > 0: the general code path serves a traced value."""
    return isinstance(value, jax.core.Tracer) or value > 0


def _check_positives(positives: Any) -> str:
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    return positives


# ----------------------------------------------------------------------------- per-anchor kernel


def _masked_lse_update(run_max, run_sum, x, mask, block_max=None):
    """Folds the masked entries of one row block ``x`` into a running log-sum-exp.

    ``block_max``, when the caller knows it, is the max of the masked ``x`` (saves a reduction).
    """
    x = jnp.where(mask, x, -jnp.inf)
    if block_max is None:
        block_max = jnp.max(x)
    # The shift is a constant for autodiff: LSE's gradient does not depend on it.
    new_max = jnp.maximum(run_max, lax.stop_gradient(block_max))
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    new_sum = run_sum * jnp.exp(run_max - shift) + jnp.sum(jnp.exp(x - shift))
    return new_max, new_sum


def _lse_value(run_max, run_sum):
    """log(sum) of a running accumulator; -inf for an empty one, with finite gradients."""
    nonempty = run_sum > 0
    return jnp.where(nonempty, run_max + jnp.log(jnp.where(nonempty, run_sum, 1.0)), -jnp.inf)


@jax.custom_jvp
def _softplus(x):
    """log(1 + exp(x)) for finite x: over a whole similarity row, jax.nn.softplus's inf/nan
    handling costs more than the function itself."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


@_softplus.defjvp
def _softplus_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _softplus(x)
    return y, dx * jnp.exp(x - y)  # sigmoid(x), from the value already computed


class _AnchorKernel:
    """Per-anchor computations on one row of the similarity matrix; vmapped over anchors."""

    def __init__(self, spec: _Spec, hyper: _Hyper):
        self.spec, self.hyper = spec, hyper
        self.tilted = spec.tilted
        # Log-weights that are not beta * s: each sum keeps its own running max.
        self.nonlinear = spec.hardening in ("poly", "callable")

    def init(self, dtype) -> dict[str, Array]:
        zero, neg_inf = jnp.zeros((), dtype), jnp.full((), -jnp.inf, dtype)
        sums = ("hi", "lo", "sq") if self.spec.with_aux else ("hi", "lo")
        if self.nonlinear:
            state = {
                f"{name}_{part}": v
                for name in sums
                for part, v in (("max", neg_inf), ("sum", zero))
            }
        else:
            state = {"s_max": neg_inf, "hi_sum": zero}
            if self.tilted:
                state.update({f"{name}_sum": zero for name in sums[1:]})
        state.update(n_neg=zero, n_pos=zero)
        if self.spec.hardening == "topk":
            # The k-th largest negative similarity of the anchor, set by _topk_thresholds.
            state["neg_threshold"] = neg_inf
        if self.spec.family == "supcon" or self.spec.with_aux:
            state["pos_s_sum"] = zero
        if self.spec.with_aux:
            state.update(neg_s_sum=zero, n_neg_aux=zero)
        return state

    def log_weight(self, s):
        """log w(s) of the "poly" hardening or the user's callable, elementwise."""
        if self.spec.hardening == "poly":
            cos = s * self.hyper.temperature
            return self.hyper.beta * jnp.log(jnp.maximum(1.0 + cos, _POLY_MIN_ONE_PLUS_COS))
        return self.spec.log_weight(s)

    def _accumulate_nonlinear(self, state, s_row, neg_row):
        """The sums of exp(s + log w), exp(log w) and exp(2 log w) over the negatives."""
        block_max = lax.stop_gradient(jnp.max(jnp.where(neg_row, s_row, -jnp.inf)))
        # Masked entries get a real negative's similarity: the user's function is then never
        # evaluated (nor differentiated) outside the range it is meant for.
        fill = jnp.where(jnp.isfinite(block_max), block_max, 0.0)
        s_in = jnp.where(neg_row, s_row, fill)
        log_w = self.log_weight(s_in)
        log_w_held = self.log_weight(lax.stop_gradient(s_in)) if self.spec.detach_weights else log_w
        for name, x in (("hi", s_in + log_w_held), ("lo", log_w)):
            state[f"{name}_max"], state[f"{name}_sum"] = _masked_lse_update(
                state[f"{name}_max"], state[f"{name}_sum"], x, neg_row
            )
        if self.spec.with_aux:
            sq_max, sq_sum = _masked_lse_update(
                state["sq_max"], state["sq_sum"], 2.0 * lax.stop_gradient(log_w), neg_row
            )
            state["sq_max"], state["sq_sum"] = lax.stop_gradient((sq_max, sq_sum))
        return state

    def accumulate(self, state, s_row, pos_row, neg_row, aux_neg_row):
        """Folds one block of one anchor's similarities into its running statistics.

        ``neg_row`` marks the views in the log-sum-exp (the negatives; SupCon's contrast set),
        ``pos_row`` the positives, ``aux_neg_row`` the negatives reported in LossAux.

        Each sum holds exp(a (s - m)) for its scale a (beta + 1, beta, 2 beta) and the running
        max m of s over the negatives, so that LSE(a s) = a m + log(sum). An exponent is never
        the difference of two rounded products a s - a m: at large beta their rounding errors
        (eps a |s|) would dominate the weights and their gradients.
        """
        spec, state = self.spec, dict(state)
        beta = self.hyper.beta
        if spec.hardening == "topk":  # ties with the k-th hardest negative are kept
            neg_row = neg_row & (s_row >= state["neg_threshold"])
        state["n_neg"] = state["n_neg"] + jnp.sum(neg_row, dtype=s_row.dtype)
        state["n_pos"] = state["n_pos"] + jnp.sum(pos_row, dtype=s_row.dtype)
        if "pos_s_sum" in state:
            state["pos_s_sum"] = state["pos_s_sum"] + jnp.sum(jnp.where(pos_row, s_row, 0.0))
        if spec.with_aux:
            s_const = lax.stop_gradient(s_row)
            state["neg_s_sum"] = state["neg_s_sum"] + jnp.sum(jnp.where(aux_neg_row, s_const, 0.0))
            state["n_neg_aux"] = state["n_neg_aux"] + jnp.sum(aux_neg_row, dtype=s_row.dtype)
        if self.nonlinear:
            return self._accumulate_nonlinear(state, s_row, neg_row)

        block_max = lax.stop_gradient(jnp.max(jnp.where(neg_row, s_row, -jnp.inf)))
        old_max = state["s_max"]
        new_max = jnp.maximum(old_max, block_max)
        state["s_max"] = new_max
        # Where a sum is still empty its old max is -inf; any finite shift serves.
        old_shift = jnp.where(jnp.isfinite(old_max), old_max - new_max, 0.0)
        centred = jnp.where(neg_row, s_row - jnp.where(jnp.isfinite(new_max), new_max, 0.0), 0.0)

        def fold(run_sum, scale, exponent):
            terms = jnp.where(neg_row, jnp.exp(exponent), 0.0)
            return run_sum * jnp.exp(scale * old_shift) + jnp.sum(terms)

        if self.tilted:
            # detach_weights: exp(s + stop_gradient(beta s)) has the value of exp((beta+1) s)
            # and the gradient that holds the importance weights exp(beta s) constant.
            lo = lax.stop_gradient(centred) if spec.detach_weights else centred
            state["hi_sum"] = fold(state["hi_sum"], beta + 1.0, centred + beta * lo)
            state["lo_sum"] = fold(state["lo_sum"], beta, beta * centred)
        else:
            state["hi_sum"] = fold(state["hi_sum"], 1.0, centred)
        if spec.with_aux and self.tilted:
            sq = fold(state["sq_sum"], 2.0 * beta, 2.0 * beta * lax.stop_gradient(centred))
            state["sq_sum"] = lax.stop_gradient(sq)
        return state

    def log_sum(self, state, name):
        """log of one running sum, ``log sum_k exp(a (s_k - m))``; -inf for an empty one."""
        return _lse_value(jnp.zeros_like(state[name]), state[name])

    def log_mu(self, state, valid):
        """log of the (tilted) mean of exp(s) over the negatives; 0 where the anchor is invalid.

        log_mu = LSE((beta+1) s) - LSE(beta s) = m + log hi_sum - log lo_sum: the terms beta m
        cancel exactly instead of in rounded arithmetic.
        """
        if self.nonlinear:
            log_hi = _lse_value(state["hi_max"], state["hi_sum"])
            log_lo = _lse_value(state["lo_max"], state["lo_sum"])
            if self.spec.detach_weights:
                log_lo = lax.stop_gradient(log_lo)
            return jnp.where(valid, jnp.where(valid, log_hi - log_lo, 0.0), 0.0)
        m = jnp.where(valid, state["s_max"], 0.0)
        log_hi = self.log_sum(state, "hi_sum")
        if self.tilted:
            log_lo = self.log_sum(state, "lo_sum")
            if self.spec.detach_weights:
                # LSE(s + sg(beta s)) - sg(LSE(beta s)): beta's gradient is E_hi[s] as before.
                beta = self.hyper.beta
                log_lo = lax.stop_gradient(log_lo) - (beta - lax.stop_gradient(beta)) * m
        else:
            log_lo = jnp.log(jnp.maximum(state["n_neg"], 1.0))
        return jnp.where(valid, m + jnp.where(valid, log_hi - log_lo, 0.0), 0.0)

    def hucl_loss(self, log_mu, s_partner, log_q):
        """Robinson et al.'s debiased H-UCL term for one anchor and its partner."""
        spec = self.spec
        tau = self.hyper.tau_plus
        if not spec.debiased:
            log_ng = log_q + log_mu
        else:
            # Ng = Q (mu - tau exp(s_p)) / (1 - tau). An estimate <= 0 is floored at 0 (a sum of
            # positive terms cannot be negative): the reference would take the log of a
            # non-positive number there.
            d = s_partner - log_mu
            ok = (tau == 0) | (d < -jnp.log(tau))
            d_safe = jnp.where(ok & (tau > 0), d, 0.0)
            log_ng = jnp.where(
                ok, log_q - jnp.log1p(-tau) + log_mu + jnp.log1p(-tau * jnp.exp(d_safe)), -jnp.inf
            )
        if spec.clamp:
            log_ng = jnp.maximum(log_ng, log_q - 1.0 / self.hyper.temperature)
        return jax.nn.softplus(log_ng - s_partner)

    def positive_sum(self, offset, s_row, pos_row):
        """Sum over one block of an anchor's positives of softplus(offset - s_ij)."""
        return jnp.sum(jnp.where(pos_row, _softplus(offset - s_row), 0.0))

    def similarity_cotangent(self, state, s_row, pos_row, neg_row, offset, g_log_mu, g_pairs):
        """The hand-written backward pass of one anchor: dL/ds over its row, and dL/dbeta.

        ``g_log_mu`` and ``g_pairs`` are the cotangents of the anchor's log_mu and of its
        positive sum (``None`` without a positive sum); ``offset`` is log Q + log_mu.
        With p_hi, p_lo the softmax of (beta+1) s and of beta s over the negatives::

            d log_mu / ds_k = (beta + 1) p_hi,k - beta p_lo,k   (p_hi,k: weights held constant)
                            = p_hi,k + beta p_lo,k expm1(s_k - log_mu)
            d softplus(offset - s_j) = sigmoid(offset - s_j) (d offset - ds_j)

        The second form is the one computed: p_hi / p_lo = exp(s - log_mu), so the difference
        of two nearly equal terms, multiplied by beta, never appears.
        """
        spec, beta = self.spec, self.hyper.beta
        ds = jnp.zeros_like(s_row)
        if g_pairs is not None:
            sig = jnp.where(pos_row, jax.nn.sigmoid(offset - s_row), 0.0)
            g_log_mu = g_log_mu + g_pairs * jnp.sum(sig)
            ds = ds - g_pairs * sig
        m = state["s_max"]
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # an anchor without negatives: p = 0 below
        centred = jnp.where(neg_row, s_row - m, 0.0)
        log_hi = self.log_sum(state, "hi_sum")
        hi_scale = beta + 1.0 if self.tilted else 1.0
        p_hi = jnp.where(neg_row, jnp.exp(hi_scale * centred - log_hi), 0.0)
        if not self.tilted:
            return ds + g_log_mu * p_hi, jnp.zeros((), s_row.dtype)
        if spec.detach_weights:
            # log_mu = LSE(s + stop_gradient(beta s)) - stop_gradient(LSE(beta s)).
            return ds + g_log_mu * p_hi, g_log_mu * (jnp.sum(p_hi * centred) + m)
        log_lo = self.log_sum(state, "lo_sum")
        p_lo = jnp.where(neg_row, jnp.exp(beta * centred - log_lo), 0.0)
        # p_hi - p_lo, from s - log_mu = centred - (log_hi - log_lo) without cancellation.
        p_diff = p_lo * jnp.expm1(jnp.where(neg_row, centred - (log_hi - log_lo), 0.0))
        # d log_mu / d beta = E_hi[s] - E_lo[s] = sum_k (p_hi - p_lo)_k (s_k - m).
        return ds + g_log_mu * (p_hi + beta * p_diff), g_log_mu * jnp.sum(p_diff * centred)


# ----------------------------------------------------------------------------- batch level


class ContrastViews(NamedTuple):
    """Embeddings with the metadata the masks need: global view index, label, padding flag.

    Queue rows are numbered -2, -3, ... (-1 marks padding): never an anchor, never a partner.
    """

    z: Array
    index: Array
    label: Array
    real: Array  # False for rows added to pad the last block


def _tile_masks(spec: _Spec, rows: ContrastViews, partner_index: Array, cols: ContrastViews):
    same_label = rows.label[:, None] == cols.label[None, :]
    not_self = rows.index[:, None] != cols.index[None, :]
    real = rows.real[:, None] & cols.real[None, :]
    other_class = ~same_label & real
    # Same-label queue rows: positives with queue_as_positives, otherwise in no mask at all.
    unused = None
    if spec.queue and not spec.queue_as_positives:
        unused = same_label & (cols.index[None, :] <= _FIRST_QUEUE_INDEX)
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


_FIRST_QUEUE_INDEX = -2


def _queue_views(queue: Queue, dtype) -> ContrastViews:
    """The queue as contrast rows: constants for autodiff, numbered -2, -3, ..."""
    size = queue.z.shape[0]
    return ContrastViews(
        lax.stop_gradient(jnp.asarray(queue.z)).astype(dtype),
        _FIRST_QUEUE_INDEX - jnp.arange(size),
        jnp.asarray(queue.labels, jnp.int32),
        jnp.asarray(queue.valid, bool),
    )


def _concat_views(a: ContrastViews, b: ContrastViews | None) -> ContrastViews:
    return a if b is None else jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def _similarities(rows: ContrastViews, cols: ContrastViews, temperature, dtype) -> Array:
    # bfloat16 inputs multiply natively and accumulate in float32.
    s = jnp.matmul(rows.z, cols.z.T, preferred_element_type=dtype)
    return s / temperature


def _tile(spec: _Spec, hyper: _Hyper, rows, partner, cols, dtype):
    """One tile's similarities and its positive, negative and reported-negative masks."""
    s = _similarities(rows, cols, hyper.temperature, dtype)
    pos, neg, other = _tile_masks(spec, rows, partner, cols)
    return s, (jnp.zeros_like(neg) if pos is None else pos), neg, other


def _blocked(x: Array, block: int, fill) -> Array:
    """Pads axis 0 of ``x`` to a whole number of blocks and splits it: (num_blocks, block, ...)."""
    n = x.shape[0]
    padded = -(-n // block) * block
    x = jnp.pad(x, [(0, padded - n)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape((padded // block, block) + x.shape[1:])


def _pad_blocks(views: ContrastViews, block: int) -> ContrastViews:
    return ContrastViews(
        _blocked(views.z, block, 0),
        _blocked(views.index, block, -1),
        _blocked(views.label, block, 0),
        _blocked(views.real, block, False),
    )


# ----------------------------------------------------------------------------- dense path

# The dense path walks the anchors in chunks of about this many similarities. On CPU a chunk's
# intermediates stay in cache: measured at 2B = 2048 (H-SCL fwd+bwd), 1.4x faster than one
# chunk, whose (2B x 2B) temporaries cost XLA:CPU more in fresh pages than in arithmetic. On an
# accelerator a chunk is at most 1 GB of float32, so a large batch does not run out of memory.
_CPU_CHUNK_SIMILARITIES = 1 << 18
_ACCELERATOR_CHUNK_SIMILARITIES = 1 << 28
_MIN_CHUNK_ROWS = 128  # fewer rows make the chunk's matmuls inefficient
# Up to this many similarities (256 MB in float32) the forward pass keeps them for the backward
# pass; above, the backward pass recomputes them (one more matmul) and memory stays per chunk.
_MAX_SAVED_SIMILARITIES = 1 << 26


def _rows_per_chunk(n_rows: int, n_cols: int) -> int:
    on_cpu = jax.default_backend() == "cpu"
    target = _CPU_CHUNK_SIMILARITIES if on_cpu else _ACCELERATOR_CHUNK_SIMILARITIES
    return min(n_rows, max(_MIN_CHUNK_ROWS, target // max(n_cols, 1)))


def _positive_counts(spec: _Spec, state) -> Array:
    return state["n_pos"] if spec.positives == "all" else jnp.ones_like(state["n_neg"])


def _valid_anchors(spec: _Spec, state, real: Array) -> Array:
    return real & (_positive_counts(spec, state) > 0) & (state["n_neg"] > 0)


class _DenseMeta(NamedTuple):
    """The inputs of the dense path that get no cotangent: indices, labels and masks, log Q
    (a count), and the queue's rows (constants)."""

    row_index: Array
    row_label: Array
    row_real: Array
    partner: Array
    col_index: Array
    col_label: Array
    col_real: Array
    log_q: Array
    queue: ContrastViews | None


def _dense_cols(z_cols: Array, meta: _DenseMeta) -> ContrastViews:
    """The contrast set: the batch's views, then the queue's rows."""
    cols = ContrastViews(z_cols, meta.col_index, meta.col_label, meta.col_real)
    return _concat_views(cols, meta.queue)


def _dense_chunks(chunk: int, z_rows: Array, meta: _DenseMeta):
    """The anchors split into chunks: row views (num_chunks, chunk, ...) and their partners."""
    rows = _pad_blocks(ContrastViews(z_rows, meta.row_index, meta.row_label, meta.row_real), chunk)
    return rows, _blocked(meta.partner, chunk, -1)


def _over_chunks(fn, carry, chunks):
    """lax.scan over the leading (chunk) axis; one chunk is called directly, without a loop."""
    if jax.tree.leaves(chunks)[0].shape[0] > 1:
        return lax.scan(fn, carry, chunks)
    carry, out = fn(carry, jax.tree.map(lambda x: x[0], chunks))
    return carry, jax.tree.map(lambda x: x[None], out)


def _dense_forward(spec, chunk, z_rows, z_cols, beta, temperature, meta, keep_s=False):
    """(log_mu, positive sums or None, state, similarities or None), each (num_chunks, chunk, ...).

    The chunk layout is kept for the backward pass; _dense_terms flattens the outputs.
    """
    dtype = jnp.result_type(beta)
    hyper = _Hyper(beta, temperature, 0.0)
    kernel = _AnchorKernel(spec, hyper)
    cols = _dense_cols(z_cols, meta)
    row_chunks, partner_chunks = _dense_chunks(chunk, z_rows, meta)

    def one_chunk(_, args):
        rows, partner = args
        s, pos, neg, other = _tile(spec, hyper, rows, partner, cols, dtype)
        state0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (chunk,)), kernel.init(dtype))
        state = jax.vmap(kernel.accumulate)(state0, s, pos, neg, other)
        valid = _valid_anchors(spec, state, rows.real)
        log_mu = jax.vmap(kernel.log_mu)(state, valid)
        pairs = None
        if spec.positives == "all":
            offset = meta.log_q + log_mu
            pairs = jnp.where(valid, jax.vmap(kernel.positive_sum)(offset, s, pos), 0.0)
        return None, (log_mu, pairs, state, (s if keep_s else None))

    return _over_chunks(one_chunk, None, (row_chunks, partner_chunks))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dense_terms_vjp(spec, chunk, z_rows, z_cols, beta, temperature, meta):
    return _dense_forward(spec, chunk, z_rows, z_cols, beta, temperature, meta)[:3]


def _dense_terms_fwd(spec, chunk, z_rows, z_cols, beta, temperature, meta):
    n_cols = z_cols.shape[0] + (0 if meta.queue is None else meta.queue.z.shape[0])
    keep_s = z_rows.shape[0] * n_cols <= _MAX_SAVED_SIMILARITIES
    log_mu, pairs, state, s = _dense_forward(
        spec, chunk, z_rows, z_cols, beta, temperature, meta, keep_s
    )
    return (log_mu, pairs, state), (z_rows, z_cols, beta, temperature, meta, log_mu, state, s)


def _dense_terms_bwd(spec, chunk, residuals, cotangents):
    z_rows, z_cols, beta, temperature, meta, log_mu, state, saved_s = residuals
    g_log_mu, g_pairs, _ = cotangents  # the state holds counts and statistics: no gradient
    dtype = jnp.result_type(beta)
    hyper = _Hyper(beta, temperature, 0.0)
    kernel = _AnchorKernel(spec, hyper)
    cols = _dense_cols(z_cols, meta)
    row_chunks, partner_chunks = _dense_chunks(chunk, z_rows, meta)
    cotangent_row = jax.vmap(kernel.similarity_cotangent)
    z_cols_wide = cols.z.astype(dtype)
    n_batch_cols = z_cols.shape[0]  # the queue's rows are constants: no gradient for them

    def one_chunk(carry, args):
        dz_cols, d_beta, d_temperature = carry
        rows, partner, chunk_state, chunk_log_mu, chunk_g_log_mu, chunk_g_pairs, s = args
        if s is None:
            s = _similarities(rows, cols, hyper.temperature, dtype)
        pos, neg, _ = _tile_masks(spec, rows, partner, cols)  # pos is None for "partner"
        valid = _valid_anchors(spec, chunk_state, rows.real)
        g_log_mu_valid = jnp.where(valid, chunk_g_log_mu, 0.0)
        g_pairs_valid = None if chunk_g_pairs is None else jnp.where(valid, chunk_g_pairs, 0.0)
        g_s, g_beta_rows = cotangent_row(
            chunk_state, s, pos, neg, meta.log_q + chunk_log_mu, g_log_mu_valid, g_pairs_valid
        )
        # s = z_rows z_cols^T / t.
        g_s = g_s / temperature
        dz_rows = jnp.matmul(g_s, z_cols_wide)
        dz_cols = dz_cols + jnp.matmul(g_s[:, :n_batch_cols].T, rows.z.astype(dtype))
        d_temperature = d_temperature - jnp.sum(g_s * s)
        return (dz_cols, d_beta + jnp.sum(g_beta_rows), d_temperature), dz_rows

    zero = jnp.zeros((), dtype)
    carry = (jnp.zeros(z_cols.shape, dtype), zero, zero)
    xs = (row_chunks, partner_chunks, state, log_mu, g_log_mu, g_pairs, saved_s)
    carry, dz_rows = _over_chunks(one_chunk, carry, xs)
    dz_cols, d_beta, d_temperature = carry
    dz_rows = dz_rows.reshape((-1,) + z_rows.shape[1:])[: z_rows.shape[0]]
    return (
        dz_rows.astype(z_rows.dtype),
        dz_cols.astype(z_cols.dtype),
        d_beta.astype(jnp.result_type(beta)),
        d_temperature.astype(jnp.result_type(temperature)),
        None,
    )


_dense_terms_vjp.defvjp(_dense_terms_fwd, _dense_terms_bwd)


def _dense_terms(spec: _Spec, hyper: _Hyper, rows, partner, cols, queue, log_q):
    """log_mu, the positive sums ("all" only) and the state of every anchor, over full rows.

    The tilted family's dense path: the forward pass runs the per-anchor kernel over chunks of
    anchors; the backward pass is written by hand (``similarity_cotangent``): it takes each
    chunk's similarities (kept from the forward pass, or recomputed above
    ``_MAX_SAVED_SIMILARITIES``) and turns dL/ds into gradients with two matmuls, instead of
    differentiating through every masked log-sum-exp.
    """
    n_rows = rows.z.shape[0]
    chunk = _rows_per_chunk(n_rows, cols.z.shape[0] + (0 if queue is None else queue.z.shape[0]))
    meta = _DenseMeta(
        rows.index,
        rows.label,
        rows.real,
        partner,
        cols.index,
        cols.label,
        cols.real,
        jnp.asarray(log_q, hyper.beta.dtype),
        queue,
    )
    log_mu, pairs, state = _dense_terms_vjp(
        spec, chunk, rows.z, cols.z, hyper.beta, hyper.temperature, meta
    )
    log_mu, pairs, state = jax.tree.map(lambda x: x.reshape(-1)[:n_rows], (log_mu, pairs, state))
    return log_mu, pairs, lax.stop_gradient(state)


def _anchor_terms(
    spec: _Spec,
    hyper: _Hyper,
    rows: ContrastViews,
    partner: Array,
    s_partner: Array,
    cols: ContrastViews,
    queue: ContrastViews | None,
    log_q,
    block_size: int | None,
    dtype,
):
    """Per-anchor loss sums and counts (and aux parts), summed over the anchors in ``rows``.

    ``cols`` is the batch's contrast set and ``queue`` the queue's rows (or None); with
    ``block_size`` both come already padded and stacked into (num_blocks, block_size, ...)
    tiles, made once outside the loop over row blocks so that no copy of them becomes a
    per-iteration residual of the backward pass. The queue's tiles are walked after the batch's,
    as constants: the backward pass computes no gradient for them.
    """
    kernel = _AnchorKernel(spec, hyper)
    vaccumulate = jax.vmap(kernel.accumulate)
    n_rows = rows.z.shape[0]
    if block_size is None:  # one tile of each
        cols_tiles, queue_tiles = jax.tree.map(lambda x: x[None], (cols, queue))
    else:
        cols_tiles, queue_tiles = cols, queue

    def over_tiles(fn, carry, with_queue=True):
        """Folds fn(carry, tile) over the batch's tiles, then the queue's."""
        body = lambda c, tile: (fn(c, tile), None)  # noqa: E731
        if block_size is not None:  # tiles are recomputed in the backward pass
            body = jax.checkpoint(body)
        for tiles in (cols_tiles, queue_tiles if with_queue else None):
            if tiles is not None:
                carry, _ = _over_chunks(body, carry, tiles)
        return carry

    def stats_of_tile(state, col_tile: ContrastViews):
        return vaccumulate(state, *_tile(spec, hyper, rows, partner, col_tile, dtype))

    def positives_of_tile(offset, col_tile: ContrastViews):
        s, pos, _, _ = _tile(spec, hyper, rows, partner, col_tile, dtype)
        return jax.vmap(kernel.positive_sum)(offset, s, pos)

    dense_log_mu = dense_pairs = None
    state0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_rows,)), kernel.init(dtype))
    if spec.hardening == "topk":
        n_columns = sum(
            t.z.shape[0] * t.z.shape[1] for t in (cols_tiles, queue_tiles) if t is not None
        )
        state0["neg_threshold"] = _topk_thresholds(
            spec, hyper, rows, partner, over_tiles, n_columns, dtype
        )
    if block_size is None and spec.family == "tilted" and spec.hardening == "exp":
        dense_log_mu, dense_pairs, state = _dense_terms(
            spec, hyper, rows, partner, cols, queue, log_q
        )
    else:  # blocked, SupCon, hardenings other than "exp": differentiated automatically
        state = over_tiles(stats_of_tile, state0)

    valid = _valid_anchors(spec, state, rows.real)
    n_pos = _positive_counts(spec, state)

    if spec.family == "supcon":
        lse = state["s_max"] + kernel.log_sum(state, "hi_sum")
        mean_pos = state["pos_s_sum"] / jnp.maximum(n_pos, 1.0)
        anchor_sum = jnp.where(valid, jnp.where(valid, lse, 0.0) - mean_pos, 0.0)
        anchor_count = valid.astype(dtype)
    else:
        if dense_log_mu is None:
            log_mu = jax.vmap(kernel.log_mu)(state, valid)
        else:
            log_mu = dense_log_mu
        # The anchor's constant c in l_ij = softplus(c - s_ij).
        offset = log_q + log_mu
        if spec.negatives == "other_views":  # UCL / H-UCL: Robinson's estimator
            loss = jax.vmap(kernel.hucl_loss, in_axes=(0, 0, None))(log_mu, s_partner, log_q)
            anchor_sum = jnp.where(valid, loss, 0.0)
            anchor_count = valid.astype(dtype)
        else:  # SCL / H-SCL
            if spec.positives == "partner":
                pair_sum = jax.nn.softplus(offset - s_partner)
            elif dense_pairs is not None:
                pair_sum = dense_pairs
            else:
                pair_sum = over_tiles(
                    lambda acc, tile: acc + positives_of_tile(offset, tile),
                    jnp.zeros((n_rows,), dtype),
                    with_queue=spec.queue_as_positives,
                )
            anchor_sum = jnp.where(valid, pair_sum, 0.0)
            anchor_count = jnp.where(valid, n_pos, 0.0)

    aux_parts = None
    if spec.with_aux:
        pos_s = state["pos_s_sum"] if spec.positives == "all" else s_partner
        if kernel.nonlinear:
            log_w = _lse_value(state["lo_max"], state["lo_sum"])
            log_w2 = _lse_value(state["sq_max"], state["sq_sum"])
            ess = jnp.exp(jnp.where(valid, 2.0 * log_w - log_w2, 0.0))
        elif kernel.tilted:
            # (sum w)^2 / sum w^2, w = exp(beta s): the factors exp(beta m) cancel.
            log_w = kernel.log_sum(state, "lo_sum")
            log_w2 = kernel.log_sum(state, "sq_sum")
            ess = jnp.exp(jnp.where(valid, 2.0 * log_w - log_w2, 0.0))
        else:
            ess = state["n_neg"]
        aux_parts = {
            "num_anchors": valid.astype(dtype),
            "num_pairs": jnp.where(valid, n_pos, 0.0),
            "pos_s_sum": jnp.where(valid, lax.stop_gradient(pos_s), 0.0),
            "neg_s_sum": jnp.where(valid, state["neg_s_sum"], 0.0),
            "n_neg": jnp.where(valid, state["n_neg_aux"], 0.0),
            "ess": jnp.where(valid, lax.stop_gradient(ess), 0.0),
        }
        aux_parts = jax.tree.map(jnp.sum, aux_parts)
    return jnp.sum(anchor_sum), jnp.sum(anchor_count), aux_parts


def _topk_thresholds(
    spec: _Spec, hyper: _Hyper, rows, partner, over_tiles, n_columns: int, dtype
) -> Array:
    """Each anchor's k-th largest negative similarity (-inf with fewer than k negatives).

    One pass over the tiles before the loss, carrying each anchor's running k largest: memory
    (rows x k) on the blocked path. Constants for autodiff: the selection is piecewise constant.
    ``n_columns`` (padding included) bounds every anchor's negatives from above, its own view
    being a column and never a negative: with k >= n_columns no pass is needed.
    """
    if spec.top_k >= n_columns:
        return jnp.full((rows.z.shape[0],), -jnp.inf, dtype)
    rows = jax.tree.map(lax.stop_gradient, rows)

    def top_of_tile(top, col_tile: ContrastViews):
        col_tile = jax.tree.map(lax.stop_gradient, col_tile)
        s, _, neg, _ = _tile(spec, hyper, rows, partner, col_tile, dtype)
        merged = jnp.concatenate([top, jnp.where(neg, lax.stop_gradient(s), -jnp.inf)], axis=1)
        return lax.top_k(merged, spec.top_k)[0]

    top = over_tiles(top_of_tile, jnp.full((rows.z.shape[0], spec.top_k), -jnp.inf, dtype))
    return top[:, -1]


def contrast_views(z1, z2, labels, axis_name=None) -> tuple[ContrastViews, Array, ContrastViews]:
    """This device's anchors, their partners' global indices, and the global contrast set.

    Views are ordered as in SPEC.md over the global batch: view 1 of every image, then view 2,
    so device ``d``'s rows are global views ``d*b .. d*b+b-1`` and ``B + d*b ..``. Without
    ``axis_name`` the device is the whole batch. ``labels=None`` labels every view 0.
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


def masked_logsumexp(x: Array, mask: Array) -> Array:
    """log(sum over the masked entries of exp(x)) of one row; -inf when the mask is empty."""
    return _lse_value(*_masked_lse_update(-jnp.inf, 0.0, x, mask))


@jax.named_call
def _contrastive(spec: _Spec, hyper: _Hyper, z1, z2, labels, queue, axis_name, block_size):
    dtype = jnp.promote_types(jnp.result_type(z1, z2), jnp.float32)
    hyper = _Hyper(*(jnp.asarray(h, dtype) for h in hyper))
    rows, partner, cols = contrast_views(z1, z2, labels, axis_name)
    n_views = cols.z.shape[0]
    z_rows32, z_partner32 = rows.z.astype(dtype), jnp.concatenate([z2, z1]).astype(dtype)
    s_partner = jnp.sum(z_rows32 * z_partner32, axis=-1) / hyper.temperature
    # Q = 2B - 2 over the global batch; log(0) for B = 1 leaves no valid anchor anyway.
    log_q = math.log(max(n_views - 2, 1))
    queue_views = None
    if queue is not None:
        queue_views = _queue_views(queue, cols.z.dtype)
        if spec.queue_q == "grows":  # Q counts the queue's filled rows too
            filled = jnp.sum(queue_views.real, dtype=dtype)
            log_q = jnp.log(jnp.maximum(n_views - 2 + filled, 1.0))

    def terms(row_views: ContrastViews, row_partner, row_s_partner):
        return _anchor_terms(
            spec,
            hyper,
            row_views,
            row_partner,
            row_s_partner,
            contrast,
            queue_contrast,
            log_q,
            block_size,
            dtype,
        )

    if block_size is None:
        contrast, queue_contrast = cols, queue_views
    else:
        contrast, queue_contrast = jax.tree.map(
            lambda views: _pad_blocks(views, block_size),
            (cols, queue_views),
            is_leaf=lambda x: isinstance(x, ContrastViews),
        )
    if block_size is None:
        total, count, aux_parts = terms(rows, partner, s_partner)
    else:
        row_tiles = _pad_blocks(rows, block_size)
        partner_tiles = _blocked(partner, block_size, -1)
        s_partner_tiles = _blocked(s_partner, block_size, 0)

        @jax.checkpoint
        def row_block(args):
            tile, tile_partner, tile_s_partner = args
            return terms(tile, tile_partner, tile_s_partner)

        totals, counts, aux_parts = lax.map(row_block, (row_tiles, partner_tiles, s_partner_tiles))
        total, count = jnp.sum(totals), jnp.sum(counts)
        if aux_parts is not None:
            aux_parts = jax.tree.map(jnp.sum, aux_parts)

    if axis_name is None:
        global_total, global_count = total, count
    else:
        global_total, global_count = lax.psum((total, count), axis_name)
    denom = lax.stop_gradient(jnp.maximum(global_count, 1.0))
    # The gradient flows through this device's own share only; the all_gather transposes into a
    # sum over devices, so each device ends up with its slice of the global gradient.
    local_loss = total / denom
    loss = local_loss + lax.stop_gradient(global_total / denom - local_loss)
    if not spec.with_aux:
        return loss
    if axis_name is not None:
        aux_parts = lax.psum(aux_parts, axis_name)
    aux_parts = lax.stop_gradient(aux_parts)
    t = hyper.temperature
    anchors = jnp.maximum(aux_parts["num_anchors"], 1.0)
    aux = LossAux(
        num_anchors=aux_parts["num_anchors"],
        num_pairs=aux_parts["num_pairs"],
        mean_pos_cos=t * aux_parts["pos_s_sum"] / jnp.maximum(aux_parts["num_pairs"], 1.0),
        mean_neg_cos=t * aux_parts["neg_s_sum"] / jnp.maximum(aux_parts["n_neg"], 1.0),
        effective_negatives=aux_parts["ess"] / anchors,
    )
    return loss, aux


_contrastive_jit = jax.jit(_contrastive, static_argnums=(0, 6, 7))


def _run(spec: _Spec, hyper: _Hyper, z1, z2, labels, axis_name, block_size, queue=None):
    _check_inputs(z1, z2, labels, block_size)
    if axis_name is None:
        return _contrastive_jit(spec, hyper, z1, z2, labels, queue, None, block_size)
    # Collectives need the enclosing pmap's trace; jit-in-pmap would inline anyway.
    return _contrastive(spec, hyper, z1, z2, labels, queue, axis_name, block_size)


# ----------------------------------------------------------------------------- public API


def hscl(
    z1,
    z2,
    labels,
    *,
    beta=None,
    temperature=0.5,
    positives="all",
    detach_weights=False,
    hardening="exp",
    top_k=None,
    queue=None,
    queue_as_positives=False,
    queue_q="fixed",
    axis_name=None,
    block_size=None,
    return_aux=False,
):
    """H-SCL: supervised contrastive loss with hard negatives (SPEC.md, "The four losses").

    Negatives are the other-class views, tilted towards the anchor and estimated by
    self-normalised importance sampling: with log-weights ``log w(s)`` over the anchor's
    negatives, ``log mu = LSE_k(s_k + log w_k) - LSE_k(log w_k)``. ``beta = 0`` is SCL exactly.

    Args:
      z1, z2: (B, d) L2-normalised projections of the two views.
      labels: (B,) integer class ids.
      beta: hardness, >= 0; required by the "exp" and "poly" hardenings, refused by the others.
      temperature: t in s = z . z' / t, > 0 (the reference hard-codes 0.5).
      positives: "all" (every other same-label view, the reference training script) or
        "partner" (the other view only, the reference loss-comparison script).
      detach_weights: hold the importance weights w constant in the backward pass;
        same value, different gradient ("detached" in the golden file).
      hardening: how negatives are weighted, q(x-|x) proportional to w(s(x, x-)) p(x-|class):
        "exp" (default, the paper): log w = beta s. Backward written by hand on the dense
          path.
        "topk": w = 1 for the ``top_k`` largest negative similarities of the anchor, 0 for
          the rest (mu is the plain mean of exp(s) over them); a negative tied with the k-th
          largest is kept, so ties keep more than k. No beta. With k at least the number of
          negatives it is SCL. The blocked path finds the k-th largest in one more pass over
          the tiles, carrying each anchor's running top k.
        "poly": w = (1 + cos)^beta, cos = t s, a polynomial rather than exponential tilt
          (1 + cos floored at 1e-6); beta = 0 is SCL.
        a callable: receives the scaled similarity s (any shape) and returns log w
          elementwise, e.g. ``lambda s: 2.0 * s`` is "exp" at beta 2. No beta (fold it into
          the function). Pass the same function object to reuse the compiled kernel.
        Every hardening but "exp" is differentiated automatically, on both paths.
      top_k: k of the "topk" hardening, a positive integer.
      queue: a ``Queue(z, labels, valid)`` of extra contrast rows (see ``Queue``), or None.
      queue_q: "fixed" (default): Q = 2B - 2 as without a queue, so the queue only sharpens
        the estimate of mu and the loss being estimated does not change with K (nor while the
        queue fills up); "grows": Q = 2B - 2 + the number of filled queue rows, the batch-only
        loss on the batch and the queue together (the sum over all contrast rows of MoCo and
        SimCLR).
      queue_as_positives: same-label queue rows are positives (with positives="all").
      axis_name: pmap axis name; contrasts each device's anchors with the global batch.
      block_size: compute over block_size x block_size tiles without the full matrix.
      return_aux: also return a LossAux of batch statistics.

    Returns:
      The flat mean of l_ij over all valid (anchor, positive) pairs, or (loss, LossAux).
    """
    hardening_fields, beta = _check_hardening(hardening, beta, top_k)
    queue_fields, queue = _check_queue(queue, z1, queue_q, queue_as_positives)
    hyper = _Hyper(
        beta=beta,
        temperature=_check_number("temperature", temperature, low=0.0, low_inclusive=False),
        tau_plus=0.0,
    )
    spec = _Spec(
        family="tilted",
        negatives="other_class",
        positives=_check_positives(positives),
        detach_weights=bool(detach_weights) and hardening_fields["tilted"],
        with_aux=bool(return_aux),
        **hardening_fields,
        **queue_fields,
    )
    return _run(spec, hyper, z1, z2, labels, axis_name, block_size, queue)


def scl(
    z1,
    z2,
    labels,
    *,
    temperature=0.5,
    positives="all",
    queue=None,
    queue_as_positives=False,
    queue_q="fixed",
    axis_name=None,
    block_size=None,
    return_aux=False,
):
    """SCL: negatives drawn uniformly from the other classes; H-SCL at beta = 0."""
    return hscl(
        z1,
        z2,
        labels,
        beta=0.0,
        temperature=temperature,
        positives=positives,
        queue=queue,
        queue_as_positives=queue_as_positives,
        queue_q=queue_q,
        axis_name=axis_name,
        block_size=block_size,
        return_aux=return_aux,
    )


def hucl(
    z1,
    z2,
    *,
    beta=None,
    temperature=0.5,
    tau_plus=0.0,
    clamp=False,
    hardening="exp",
    top_k=None,
    queue=None,
    queue_q="fixed",
    axis_name=None,
    block_size=None,
    return_aux=False,
):
    """H-UCL (Robinson et al. 2021): label-free hard negatives with debiasing.

    Negatives are every view but the anchor and its partner (and every filled queue row); the
    partner is the only positive.
    ``Ng = Q (mu_hat - tau_plus exp(s_partner)) / (1 - tau_plus)``, floored at 0 and, with
    ``clamp=True``, clamped below at ``Q exp(-1/temperature)`` as in Robinson's code; the loss is
    the mean over anchors of ``log(1 + Ng exp(-s_partner))``. ``tau_plus = 0`` without clamp is the
    paper's comparison setting; Robinson's own default is ``tau_plus=0.1, clamp=True``.
    ``hardening``, ``top_k``, ``beta`` and the queue options are those of ``hscl``.
    """
    hardening_fields, beta = _check_hardening(hardening, beta, top_k)
    queue_fields, queue = _check_queue(queue, z1, queue_q)
    hyper = _Hyper(
        beta=beta,
        temperature=_check_number("temperature", temperature, low=0.0, low_inclusive=False),
        tau_plus=_check_number("tau_plus", tau_plus, low=0.0, low_inclusive=True, high=1.0),
    )
    spec = _Spec(
        family="tilted",
        negatives="other_views",
        positives="partner",
        debiased=_maybe_positive(hyper.tau_plus),
        clamp=bool(clamp),
        with_aux=bool(return_aux),
        **hardening_fields,
        **queue_fields,
    )
    return _run(spec, hyper, z1, z2, None, axis_name, block_size, queue)


def ucl(
    z1,
    z2,
    *,
    temperature=0.5,
    queue=None,
    queue_q="fixed",
    axis_name=None,
    block_size=None,
    return_aux=False,
):
    """UCL: SimCLR's NT-Xent, mean over anchors of log(1 + sum_k exp(s_ik - s_i,partner)).

    With a queue and ``queue_q="grows"`` the sum runs over the queue's filled rows too (MoCo's
    InfoNCE with the partner as key); with "fixed" it is scaled by (2B - 2) / (2B - 2 + K).
    """
    return hucl(
        z1,
        z2,
        beta=0.0,
        temperature=temperature,
        queue=queue,
        queue_q=queue_q,
        axis_name=axis_name,
        block_size=block_size,
        return_aux=return_aux,
    )


def supcon(
    z1,
    z2,
    labels,
    *,
    temperature=0.1,
    queue=None,
    queue_as_positives=False,
    axis_name=None,
    block_size=None,
    return_aux=False,
):
    """SupCon (Khosla et al. 2020, L_out), a different loss from SCL.

    For anchor i with positives P(i) (every other same-label view) and contrast set A(i) (every
    view but i, positives included)::

        l_i = - 1/|P(i)| sum_{p in P(i)} (s_ip - LSE_{a in A(i)} s_ia)

    averaged over the anchors that have a positive. Khosla's code also multiplies by
    ``temperature / base_temperature``; that constant factor is left out here.

    A queue adds its other-class rows to A(i) and, with ``queue_as_positives=True``, its
    same-label rows to P(i) and A(i). SupCon has no Q, so there is no ``queue_q``.
    """
    queue_fields, queue = _check_queue(queue, z1, "fixed", queue_as_positives)
    hyper = _Hyper(
        beta=0.0,
        temperature=_check_number("temperature", temperature, low=0.0, low_inclusive=False),
        tau_plus=0.0,
    )
    spec = _Spec(
        family="supcon",
        negatives="not_self",
        positives="all",
        with_aux=bool(return_aux),
        **queue_fields,
    )
    return _run(spec, hyper, z1, z2, labels, axis_name, block_size, queue)


_BY_NAME: dict[str, Callable[..., Any]] = {
    "ucl": ucl,
    "scl": scl,
    "hucl": hucl,
    "hscl": hscl,
    "supcon": supcon,
}
_TAKES_LABELS = ("scl", "hscl", "supcon")


def compute(name: str, z1, z2, labels=None, *, axis_name=None, **options):
    """Dispatches to the loss called ``name`` (one of LOSS_NAMES) with its keyword options.

    ``labels`` is ignored by the label-free losses (ucl, hucl). An option the loss does not take
    raises ValueError naming it and the options allowed.
    """
    if name not in _BY_NAME:
        raise ValueError(f"unknown loss {name!r}; allowed: {LOSS_NAMES}")
    fn = _BY_NAME[name]
    allowed = sorted(allowed_options(name))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"loss {name!r} does not take option(s) {unknown}; allowed: {allowed}")
    if name in _TAKES_LABELS:
        if labels is None:
            raise ValueError(f"loss {name!r} needs labels, got None")
        return fn(z1, z2, labels, axis_name=axis_name, **options)
    return fn(z1, z2, axis_name=axis_name, **options)


def allowed_options(name: str) -> tuple[str, ...]:
    """Keyword options of loss ``name``, besides the embeddings, labels and axis_name."""
    import inspect

    if name not in _BY_NAME:
        raise ValueError(f"unknown loss {name!r}; allowed: {LOSS_NAMES}")
    params = inspect.signature(_BY_NAME[name]).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "axis_name")


def takes_labels(name: str) -> bool:
    """Whether loss ``name`` is supervised (scl, hscl, supcon): its negatives are views of other
    classes, so a batch needs two classes for any anchor to have one."""
    if name not in _BY_NAME:
        raise ValueError(f"unknown loss {name!r}; allowed: {LOSS_NAMES}")
    return name in _TAKES_LABELS
