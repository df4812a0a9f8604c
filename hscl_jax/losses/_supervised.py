"""The supervised losses: H-SCL, SCL and SupCon (definitions: ``docs/losses.md``)."""

from __future__ import annotations

from typing import Literal, overload

from hscl_jax.losses._checks import (
    check_hardening,
    check_number,
    check_positives,
    check_queue,
)
from hscl_jax.losses._public import call_loss
from hscl_jax.losses._queue import Queue
from hscl_jax.losses._spec import Array, ArrayLike, AxisName, Hyper, LogWeight, LossAux, Spec


@overload
def hscl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    labels: ArrayLike | None = ...,
    *,
    beta: ArrayLike | None = ...,
    temperature: ArrayLike = ...,
    positives: str = ...,
    detach_weights: bool = ...,
    hardening: str | LogWeight = ...,
    top_k: int | None = ...,
    queue: Queue | None = ...,
    queue_as_positives: bool = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: Literal[False] = ...,
) -> Array: ...


@overload
def hscl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    labels: ArrayLike | None = ...,
    *,
    beta: ArrayLike | None = ...,
    temperature: ArrayLike = ...,
    positives: str = ...,
    detach_weights: bool = ...,
    hardening: str | LogWeight = ...,
    top_k: int | None = ...,
    queue: Queue | None = ...,
    queue_as_positives: bool = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: Literal[True],
) -> tuple[Array, LossAux]: ...


@overload
def hscl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    labels: ArrayLike | None = ...,
    *,
    beta: ArrayLike | None = ...,
    temperature: ArrayLike = ...,
    positives: str = ...,
    detach_weights: bool = ...,
    hardening: str | LogWeight = ...,
    top_k: int | None = ...,
    queue: Queue | None = ...,
    queue_as_positives: bool = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: bool = ...,
) -> Array | tuple[Array, LossAux]: ...


def hscl(
    z1: ArrayLike,
    z2: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    *,
    beta: ArrayLike | None = None,
    temperature: ArrayLike = 0.5,
    positives: str = "all",
    detach_weights: bool = False,
    hardening: str | LogWeight = "exp",
    top_k: int | None = None,
    queue: Queue | None = None,
    queue_as_positives: bool = False,
    queue_q: str = "fixed",
    normalize: bool = False,
    check_inputs: bool = False,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> Array | tuple[Array, LossAux]:
    """H-SCL: supervised contrastive loss with hard negatives (``docs/losses.md``).

    Negatives are the other-class views, tilted towards the anchor and estimated by
    self-normalised importance sampling: with log-weights ``log w(s)`` over the anchor's
    negatives, ``log mu = LSE_k(s_k + log w_k) - LSE_k(log w_k)``. ``beta = 0`` is SCL exactly.

    Example::

        loss = losses.hscl(z1, z2, labels, beta=1.0)
        loss, aux = losses.hscl(z, labels=labels, beta=1.0, return_aux=True)  # z: (B, V, d)

    Args:
      z1, z2: (B, d) L2-normalised projections of the two views; or ``z1`` one (B, V, d) array
        of V >= 2 views per image, ``z2`` left out and ``labels`` passed by keyword. Every view
        is an anchor; Q = V B - V.
      labels: (B,) integer class ids.
      beta: hardness, >= 0; required by the "exp" and "poly" hardenings, refused by the others.
      temperature: t in s = z . z' / t, > 0.
      positives: "all" (every other same-label view, the reference training script) or
        "partner" (the other views of the anchor's image only, the reference loss-comparison
        script).
      detach_weights: hold the importance weights w constant in the backward pass (same value).
      hardening: how negatives are weighted, q(x-|x) proportional to w(s(x, x-)) p(x-|class).
        "exp" (default, the paper): log w = beta s; backward written by hand (dense path).
        "topk": w = 1 for the ``top_k`` largest negative similarities of the anchor (ties with
        the k-th kept), 0 for the rest; no beta; k at least the number of negatives is SCL.
        "poly": w = (1 + cos)^beta, cos = t s (1 + cos floored at 1e-6); beta = 0 is SCL.
        A callable: log w as a function of the scaled similarity s, elementwise (``lambda s:
        2.0 * s`` is "exp" at beta 2); no beta. Pass the same function object to reuse the
        compiled kernel. All but "exp" are differentiated automatically.
      top_k: k of the "topk" hardening, a positive integer.
      queue: a ``Queue`` of extra contrast rows (see ``Queue``), or None.
      queue_as_positives: same-label queue rows are positives (with positives="all").
      queue_q: "fixed" (default): Q = 2B - 2 as without a queue: the queue only sharpens the
        estimate of mu; "grows": Q also counts the filled queue rows, the batch-only loss on the
        batch and the queue together (MoCo's and SimCLR's sum over all contrast rows).
      normalize: L2-normalise each row inside the loss (differentiably); by default the
        embeddings must already be of unit norm and are used as given.
      check_inputs: refuse non-finite values and (without ``normalize``) rows whose norm is not
        1, naming them in one ValueError line. Concrete inputs are checked at the call; under a
        trace (``jax.jit``) the checks are ``jax.experimental.checkify`` checks: wrap the
        function with ``checkify.checkify`` to get them (JAX refuses to stage them otherwise).
      axis_name: the axis (or tuple of axes) the batch is split over, inside ``jax.pmap`` or
        ``jax.shard_map``; contrasts each device's anchors with the global batch. Under
        ``jax.jit`` over a mesh, leave it out (``docs/parallelism.md``).
      block_size: compute over block_size x block_size tiles without the full matrix.
      return_aux: also return a LossAux of batch statistics.

    Returns:
      The flat mean of l_ij over all valid (anchor, positive) pairs, or (loss, LossAux).
    """
    hardening_fields, beta = check_hardening(hardening, beta, top_k)
    queue_fields, checked_queue = check_queue(queue, z1, queue_q, queue_as_positives)
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
        normalize=bool(normalize),
        **hardening_fields,
        **queue_fields,
    )
    return call_loss(
        spec,
        hyper,
        z1,
        z2,
        labels,
        checked_queue,
        check=bool(check_inputs),
        axis_name=axis_name,
        block_size=block_size,
    )


@overload
def scl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    labels: ArrayLike | None = ...,
    *,
    temperature: ArrayLike = ...,
    positives: str = ...,
    queue: Queue | None = ...,
    queue_as_positives: bool = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: Literal[False] = ...,
) -> Array: ...


@overload
def scl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    labels: ArrayLike | None = ...,
    *,
    temperature: ArrayLike = ...,
    positives: str = ...,
    queue: Queue | None = ...,
    queue_as_positives: bool = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: Literal[True],
) -> tuple[Array, LossAux]: ...


@overload
def scl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    labels: ArrayLike | None = ...,
    *,
    temperature: ArrayLike = ...,
    positives: str = ...,
    queue: Queue | None = ...,
    queue_as_positives: bool = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: bool = ...,
) -> Array | tuple[Array, LossAux]: ...


def scl(
    z1: ArrayLike,
    z2: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 0.5,
    positives: str = "all",
    queue: Queue | None = None,
    queue_as_positives: bool = False,
    queue_q: str = "fixed",
    normalize: bool = False,
    check_inputs: bool = False,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> Array | tuple[Array, LossAux]:
    """SCL: negatives drawn uniformly from the other classes; H-SCL at beta = 0.

    ``losses.scl(z1, z2, labels)``; the options are those of ``hscl``.
    """
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
        normalize=normalize,
        check_inputs=check_inputs,
        axis_name=axis_name,
        block_size=block_size,
        return_aux=return_aux,
    )


@overload
def supcon(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    labels: ArrayLike | None = ...,
    *,
    temperature: ArrayLike = ...,
    queue: Queue | None = ...,
    queue_as_positives: bool = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: Literal[False] = ...,
) -> Array: ...


@overload
def supcon(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    labels: ArrayLike | None = ...,
    *,
    temperature: ArrayLike = ...,
    queue: Queue | None = ...,
    queue_as_positives: bool = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: Literal[True],
) -> tuple[Array, LossAux]: ...


@overload
def supcon(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    labels: ArrayLike | None = ...,
    *,
    temperature: ArrayLike = ...,
    queue: Queue | None = ...,
    queue_as_positives: bool = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: bool = ...,
) -> Array | tuple[Array, LossAux]: ...


def supcon(
    z1: ArrayLike,
    z2: ArrayLike | None = None,
    labels: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 0.1,
    queue: Queue | None = None,
    queue_as_positives: bool = False,
    normalize: bool = False,
    check_inputs: bool = False,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> Array | tuple[Array, LossAux]:
    """SupCon (Khosla et al. 2020, L_out), a different loss from SCL.

    For anchor i with positives P(i) (every other same-label view) and contrast set A(i) (every
    view but i, positives included)::

        l_i = - 1/|P(i)| sum_{p in P(i)} (s_ip - LSE_{a in A(i)} s_ia)

    averaged over the anchors that have a positive. Khosla's code also multiplies by
    ``temperature / base_temperature``; that constant factor is left out here. With one
    (B, V, d) array of views (``losses.supcon(z, labels=labels)``) every view is an anchor, as
    in SupContrast's multi-crop loss.

    A queue adds its other-class rows to A(i) and, with ``queue_as_positives=True``, its
    same-label rows to P(i) and A(i). SupCon has no Q, so there is no ``queue_q``. The other
    options are those of ``hscl``.
    """
    queue_fields, checked_queue = check_queue(queue, z1, "fixed", queue_as_positives)
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
        normalize=bool(normalize),
        **queue_fields,
    )
    return call_loss(
        spec,
        hyper,
        z1,
        z2,
        labels,
        checked_queue,
        check=bool(check_inputs),
        axis_name=axis_name,
        block_size=block_size,
    )
