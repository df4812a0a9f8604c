"""The label-free losses: H-UCL and UCL (SimCLR's NT-Xent) (definitions: ``docs/losses.md``)."""

from __future__ import annotations

from typing import Literal, overload

from hscl_jax.losses._checks import check_hardening, check_number, check_queue, maybe_positive
from hscl_jax.losses._public import call_loss
from hscl_jax.losses._queue import Queue
from hscl_jax.losses._spec import Array, ArrayLike, AxisName, Hyper, LogWeight, LossAux, Spec


@overload
def hucl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    *,
    beta: ArrayLike | None = ...,
    temperature: ArrayLike = ...,
    tau_plus: ArrayLike = ...,
    clamp: bool = ...,
    hardening: str | LogWeight = ...,
    top_k: int | None = ...,
    queue: Queue | None = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: Literal[False] = ...,
) -> Array: ...


@overload
def hucl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    *,
    beta: ArrayLike | None = ...,
    temperature: ArrayLike = ...,
    tau_plus: ArrayLike = ...,
    clamp: bool = ...,
    hardening: str | LogWeight = ...,
    top_k: int | None = ...,
    queue: Queue | None = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: Literal[True],
) -> tuple[Array, LossAux]: ...


@overload
def hucl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    *,
    beta: ArrayLike | None = ...,
    temperature: ArrayLike = ...,
    tau_plus: ArrayLike = ...,
    clamp: bool = ...,
    hardening: str | LogWeight = ...,
    top_k: int | None = ...,
    queue: Queue | None = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: bool = ...,
) -> Array | tuple[Array, LossAux]: ...


def hucl(
    z1: ArrayLike,
    z2: ArrayLike | None = None,
    *,
    beta: ArrayLike | None = None,
    temperature: ArrayLike = 0.5,
    tau_plus: ArrayLike = 0.0,
    clamp: bool = False,
    hardening: str | LogWeight = "exp",
    top_k: int | None = None,
    queue: Queue | None = None,
    queue_q: str = "fixed",
    normalize: bool = False,
    check_inputs: bool = False,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> Array | tuple[Array, LossAux]:
    """H-UCL (Robinson et al. 2021): label-free hard negatives with debiasing.

    Negatives are every view but those of the anchor's image (and every filled queue row); the
    other views of its image are its positives (the partner, with two views).
    ``Ng = Q (mu_hat - tau_plus exp(s_positive)) / (1 - tau_plus)``, floored at 0 and, with
    ``clamp=True``, clamped below at ``Q exp(-1/temperature)`` as in Robinson's code; the loss is
    the mean over (anchor, positive) pairs of ``log(1 + Ng exp(-s_positive))``. ``tau_plus = 0``
    without clamp is the paper's comparison setting; Robinson's own default is
    ``tau_plus=0.1, clamp=True``. ``losses.hucl(z1, z2, beta=1.0)``, or
    ``losses.hucl(z, beta=1.0)`` with z of shape (B, V, d). ``hardening``, ``top_k``, ``beta``,
    the queue options and the others are those of ``hscl``.
    """
    hardening_fields, beta = check_hardening(hardening, beta, top_k)
    queue_fields, checked_queue = check_queue(queue, z1, queue_q)
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
        normalize=bool(normalize),
        **hardening_fields,
        **queue_fields,
    )
    return call_loss(
        spec,
        hyper,
        z1,
        z2,
        None,
        checked_queue,
        check=bool(check_inputs),
        axis_name=axis_name,
        block_size=block_size,
    )


@overload
def ucl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    *,
    temperature: ArrayLike = ...,
    queue: Queue | None = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: Literal[False] = ...,
) -> Array: ...


@overload
def ucl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    *,
    temperature: ArrayLike = ...,
    queue: Queue | None = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: Literal[True],
) -> tuple[Array, LossAux]: ...


@overload
def ucl(
    z1: ArrayLike,
    z2: ArrayLike | None = ...,
    *,
    temperature: ArrayLike = ...,
    queue: Queue | None = ...,
    queue_q: str = ...,
    normalize: bool = ...,
    check_inputs: bool = ...,
    axis_name: AxisName = ...,
    block_size: int | None = ...,
    return_aux: bool = ...,
) -> Array | tuple[Array, LossAux]: ...


def ucl(
    z1: ArrayLike,
    z2: ArrayLike | None = None,
    *,
    temperature: ArrayLike = 0.5,
    queue: Queue | None = None,
    queue_q: str = "fixed",
    normalize: bool = False,
    check_inputs: bool = False,
    axis_name: AxisName = None,
    block_size: int | None = None,
    return_aux: bool = False,
) -> Array | tuple[Array, LossAux]:
    """UCL: SimCLR's NT-Xent, mean over anchors of log(1 + sum_k exp(s_ik - s_i,partner)).

    ``losses.ucl(z1, z2)``. With a queue and ``queue_q="grows"`` the sum runs over the queue's
    filled rows too (MoCo's InfoNCE with the partner as key); with "fixed" it is scaled by
    (2B - 2) / (2B - 2 + K). The options are those of ``hucl``.
    """
    return hucl(
        z1,
        z2,
        beta=0.0,
        temperature=temperature,
        queue=queue,
        queue_q=queue_q,
        normalize=normalize,
        check_inputs=check_inputs,
        axis_name=axis_name,
        block_size=block_size,
        return_aux=return_aux,
    )
