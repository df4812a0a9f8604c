"""The per-anchor kernel: one anchor's row of similarities and its masks in, running log-sum-exp
statistics out (``jax.vmap``-ed over anchors), and the log-sum-exp helpers it is built from.

Everything is in log space and accumulated in float32 (float64 for float64 inputs), also for
bfloat16 inputs. The definitions are those of ``docs/losses.md``.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import lax

from hscl_jax.losses._spec import Array, Hyper, Spec

# "poly" floors 1 + cos here, so that a negative exactly opposite the anchor gets a tiny weight
# rather than log(0) and an infinite derivative.
POLY_MIN_ONE_PLUS_COS = 1e-6

State = dict[str, Array]


def masked_lse_update(
    run_max: Any, run_sum: Any, x: Array, mask: Array, block_max: Array | None = None
) -> tuple[Array, Array]:
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


def lse_value(run_max: Array, run_sum: Array) -> Array:
    """log(sum) of a running accumulator; -inf for an empty one, with finite gradients."""
    nonempty = run_sum > 0
    return jnp.where(nonempty, run_max + jnp.log(jnp.where(nonempty, run_sum, 1.0)), -jnp.inf)


def masked_logsumexp(x: Array, mask: Array) -> Array:
    """log(sum over the masked entries of exp(x)) of one row; -inf when the mask is empty."""
    return lse_value(*masked_lse_update(-jnp.inf, 0.0, x, mask))


@jax.custom_jvp
def softplus(x: Array) -> Array:
    """log(1 + exp(x)) for finite x: over a whole similarity row, jax.nn.softplus's inf/nan
    handling costs more than the function itself."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


@softplus.defjvp
def _softplus_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (dx,) = primals, tangents
    y = softplus(x)
    return y, dx * jnp.exp(x - y)  # sigmoid(x), from the value already computed


def positive_counts(spec: Spec, state: State) -> Array:
    """Each anchor's number of positives."""
    return jnp.ones_like(state["n_neg"]) if spec.positives == "partner" else state["n_pos"]


def valid_anchors(spec: Spec, state: State, real: Array) -> Array:
    """Anchors with at least one positive and one negative (the others leave the mean)."""
    return real & (positive_counts(spec, state) > 0) & (state["n_neg"] > 0)


class AnchorKernel:
    """Per-anchor computations on one row of the similarity matrix; vmapped over anchors."""

    def __init__(self, spec: Spec, hyper: Hyper):
        self.spec, self.hyper = spec, hyper
        self.tilted = spec.tilted
        # Log-weights that are not beta * s: each sum keeps its own running max.
        self.nonlinear = spec.hardening in ("poly", "callable")

    def init(self, dtype: Any) -> State:
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
            # The k-th largest negative similarity of the anchor, set by topk_thresholds.
            state["neg_threshold"] = neg_inf
        if self.spec.family == "supcon" or self.spec.with_aux:
            state["pos_s_sum"] = zero
        if self.spec.with_aux:
            state.update(neg_s_sum=zero, n_neg_aux=zero)
        return state

    def log_weight(self, s: Array) -> Array:
        """log w(s) of the "poly" hardening or the user's callable, elementwise."""
        if self.spec.hardening == "poly":
            cos = s * self.hyper.temperature
            log_w = self.hyper.beta * jnp.log(jnp.maximum(1.0 + cos, POLY_MIN_ONE_PLUS_COS))
            return cast(Array, log_w)
        assert self.spec.log_weight is not None
        return self.spec.log_weight(s)

    def _accumulate_nonlinear(self, state: State, s_row: Array, neg_row: Array) -> State:
        """The sums of exp(s + log w), exp(log w) and exp(2 log w) over the negatives."""
        block_max = lax.stop_gradient(jnp.max(jnp.where(neg_row, s_row, -jnp.inf)))
        # Masked entries get a real negative's similarity: the user's function is then never
        # evaluated (nor differentiated) outside the range it is meant for.
        fill = jnp.where(jnp.isfinite(block_max), block_max, 0.0)
        s_in = jnp.where(neg_row, s_row, fill)
        log_w = self.log_weight(s_in)
        log_w_held = self.log_weight(lax.stop_gradient(s_in)) if self.spec.detach_weights else log_w
        for name, x in (("hi", s_in + log_w_held), ("lo", log_w)):
            state[f"{name}_max"], state[f"{name}_sum"] = masked_lse_update(
                state[f"{name}_max"], state[f"{name}_sum"], x, neg_row
            )
        if self.spec.with_aux:
            sq_max, sq_sum = masked_lse_update(
                state["sq_max"], state["sq_sum"], 2.0 * lax.stop_gradient(log_w), neg_row
            )
            state["sq_max"], state["sq_sum"] = lax.stop_gradient((sq_max, sq_sum))
        return state

    def accumulate(
        self, state: State, s_row: Array, pos_row: Array, neg_row: Array, aux_neg_row: Array
    ) -> State:
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

        def fold(run_sum: Array, scale: Any, exponent: Array) -> Array:
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

    def log_sum(self, state: State, name: str) -> Array:
        """log of one running sum, ``log sum_k exp(a (s_k - m))``; -inf for an empty one."""
        return lse_value(jnp.zeros_like(state[name]), state[name])

    def log_mu(self, state: State, valid: Array) -> Array:
        """log of the (tilted) mean of exp(s) over the negatives; 0 where the anchor is invalid.

        log_mu = LSE((beta+1) s) - LSE(beta s) = m + log hi_sum - log lo_sum: the terms beta m
        cancel exactly instead of in rounded arithmetic.
        """
        if self.nonlinear:
            log_hi = lse_value(state["hi_max"], state["hi_sum"])
            log_lo = lse_value(state["lo_max"], state["lo_sum"])
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

    def hucl_loss(self, log_mu: Array, s_partner: Array, log_q: Any) -> Array:
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

    def positive_sum(self, offset: Array, s_row: Array, pos_row: Array) -> Array:
        """Sum over one block of an anchor's positives of softplus(offset - s_ij)."""
        return jnp.sum(jnp.where(pos_row, softplus(offset - s_row), 0.0))

    def hucl_positive_sum(self, log_mu: Array, s_row: Array, pos_row: Array, log_q: Any) -> Array:
        """Sum over one block of an anchor's positives of its H-UCL term (several views)."""
        return jnp.sum(jnp.where(pos_row, self.hucl_loss(log_mu, s_row, log_q), 0.0))

    def similarity_cotangent(
        self,
        state: State,
        s_row: Array,
        pos_row: Array | None,
        neg_row: Array,
        offset: Array,
        g_log_mu: Array,
        g_pairs: Array | None,
    ) -> tuple[Array, Array]:
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
            assert pos_row is not None
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
