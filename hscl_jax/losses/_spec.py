"""The names, constants and static descriptions every part of the losses package shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
# A log-weight of the scaled similarity, elementwise (hardening=).
LogWeight = Callable[[Array], Array]
# A mesh or pmap axis name, or a tuple of them.
AxisName = Any

LOSS_NAMES = ("ucl", "scl", "hucl", "hscl", "supcon")
SUPERVISED_LOSSES = ("scl", "hscl", "supcon")
POSITIVES = ("all", "partner")
HARDENINGS = ("exp", "topk", "poly")
QUEUE_Q_MODES = ("fixed", "grows")

# float32 gradient accuracy of the tilted losses (tests/test_losses_precision.py says how the
# error is defined; `python bench/losses.py --float32-limit` measures it, docs/benchmarks.md).
FLOAT32_GRADIENT_TOLERANCE = 1e-3
FLOAT32_BETA_LIMIT_PER_INVERSE_TEMPERATURE = 3000.0
FLOAT32_BETA_LIMIT_CAP = 600.0


class LossAux(NamedTuple):
    """Batch statistics returned next to the loss by ``return_aux=True`` (global when the batch
    is split over devices).

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
class Spec:
    """Static description of one loss: which views are negatives, positives, and the estimator.

    Only structure lives here; the values of beta, temperature and tau_plus are traced
    (``Hyper``), so sweeping them does not recompile.
    """

    family: str  # "tilted" (UCL/SCL/H-UCL/H-SCL) or "supcon"
    negatives: str  # "other_class" | "other_views" (not of the anchor's image) | "not_self"
    # "all" (same label) | "partner" (the other view, two views per image) | "image" (the other
    # views of the anchor's image, more than two views per image)
    positives: str
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
    normalize: bool = False  # L2-normalise the embeddings inside the loss


class Hyper(NamedTuple):
    """The traced hyper-parameters of a loss."""

    beta: Any
    temperature: Any
    tau_plus: Any
