"""The five public losses: argument checks, then the static spec and the traced hyper-parameters
handed to the orchestration. Definitions: ``docs/losses.md``."""

from __future__ import annotations

from typing import Any

from hscl_jax.losses._checks import (
    check_hardening,
    check_inputs,
    check_number,
    check_positives,
    check_queue,
    maybe_positive,
)
from hscl_jax.losses._orchestrate import run
from hscl_jax.losses._spec import Hyper, Spec


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
    """H-SCL: supervised contrastive loss with hard negatives (``docs/losses.md``).

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
      axis_name: the axis (or tuple of axes) the batch is split over, inside ``jax.pmap`` or
        ``jax.shard_map``; contrasts each device's anchors with the global batch
        (``docs/parallelism.md``).
      block_size: compute over block_size x block_size tiles without the full matrix.
      return_aux: also return a LossAux of batch statistics.

    Returns:
      The flat mean of l_ij over all valid (anchor, positive) pairs, or (loss, LossAux).
    """
    hardening_fields, beta = check_hardening(hardening, beta, top_k)
    queue_fields, queue = check_queue(queue, z1, queue_q, queue_as_positives)
    hyper = Hyper(
        beta=beta,
        temperature=check_number("temperature", temperature, low=0.0, low_inclusive=False),
        tau_plus=0.0,
    )
    spec = Spec(
        family="tilted",
        negatives="other_class",
        positives=check_positives(positives),
        detach_weights=bool(detach_weights) and hardening_fields["tilted"],
        with_aux=bool(return_aux),
        **hardening_fields,
        **queue_fields,
    )
    check_inputs(z1, z2, labels, block_size)
    return run(spec, hyper, z1, z2, labels, axis_name, block_size, queue)


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
    hardening_fields, beta = check_hardening(hardening, beta, top_k)
    queue_fields, queue = check_queue(queue, z1, queue_q)
    hyper = Hyper(
        beta=beta,
        temperature=check_number("temperature", temperature, low=0.0, low_inclusive=False),
        tau_plus=check_number("tau_plus", tau_plus, low=0.0, low_inclusive=True, high=1.0),
    )
    spec = Spec(
        family="tilted",
        negatives="other_views",
        positives="partner",
        debiased=maybe_positive(hyper.tau_plus),
        clamp=bool(clamp),
        with_aux=bool(return_aux),
        **hardening_fields,
        **queue_fields,
    )
    check_inputs(z1, z2, None, block_size)
    return run(spec, hyper, z1, z2, None, axis_name, block_size, queue)


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
    queue_fields, queue = check_queue(queue, z1, "fixed", queue_as_positives)
    hyper = Hyper(
        beta=0.0,
        temperature=check_number("temperature", temperature, low=0.0, low_inclusive=False),
        tau_plus=0.0,
    )
    spec = Spec(
        family="supcon",
        negatives="not_self",
        positives="all",
        with_aux=bool(return_aux),
        **queue_fields,
    )
    check_inputs(z1, z2, labels, block_size)
    return run(spec, hyper, z1, z2, labels, axis_name, block_size, queue)


BY_NAME: dict[str, Any] = {"ucl": ucl, "scl": scl, "hucl": hucl, "hscl": hscl, "supcon": supcon}
