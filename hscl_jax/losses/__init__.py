"""Contrastive losses: UCL (SimCLR), SCL, H-UCL, H-SCL and SupCon, as pure JAX functions.

Every loss takes the L2-normalised projections of two views, ``z1`` and ``z2`` of shape
``(B, d)`` (row ``i`` of each is the same image), or one array of V >= 2 views per image of shape
``(B, V, d)`` (``labels=`` then by keyword), and returns a scalar::

    loss = losses.hscl(z1, z2, labels, beta=1.0)
    loss = losses.hscl(z, labels=labels, beta=1.0, normalize=True) The definitions, as the
code implements them, are in ``docs/losses.md``; the hardenings and the queue in
``docs/hardening-and-queue.md``; the batch split over devices (``axis_name``, ``jax.pmap``,
``jax.shard_map``, ``jax.jit`` over a mesh) in ``docs/parallelism.md``.

The tilted family (UCL, SCL, H-UCL, H-SCL) shares one shape, per anchor ``i`` and positive ``j``::

    log_mu(i) = LSE_k((beta + 1) s_ik) - LSE_k(beta s_ik)      # k over the anchor's negatives
    l_ij      = softplus(log Q + log_mu(i) - s_ij)              # Q = 2B - 2, fixed

with ``s = z z^T / temperature``. SCL and H-SCL draw negatives from other classes only; UCL and
H-UCL from every view but the anchor and its partner. ``beta = 0`` is the untilted loss.

Hyper-parameters (``beta``, ``temperature``, ``tau_plus``) are validated eagerly when they are
concrete numbers and are traced into the compiled kernel, so sweeping them does not recompile; a
traced value (``jax.vmap`` over ``beta``, say) is accepted unchecked. ``return_aux=True`` returns
``(loss, LossAux)``. ``block_size`` computes the same loss over tiles of the similarity matrix
without materialising it; the dense path of the tilted family has a hand-written backward pass.
"""

from hscl_jax.losses._checks import check_beta, check_temperature, float32_beta_limit
from hscl_jax.losses._kernel import masked_logsumexp
from hscl_jax.losses._queue import Queue
from hscl_jax.losses._registry import (
    allowed_options,
    check_config,
    compute,
    options_from_config,
    takes_labels,
    warn_above_float32_beta_limit,
)
from hscl_jax.losses._spec import (
    FLOAT32_BETA_LIMIT_CAP,
    FLOAT32_BETA_LIMIT_PER_INVERSE_TEMPERATURE,
    FLOAT32_GRADIENT_TOLERANCE,
    HARDENINGS,
    LOSS_NAMES,
    POSITIVES,
    QUEUE_Q_MODES,
    SUPERVISED_LOSSES,
    LossAux,
)
from hscl_jax.losses._supervised import hscl, scl, supcon
from hscl_jax.losses._unsupervised import hucl, ucl
from hscl_jax.losses._views import MATMUL_PRECISION, ContrastViews, contrast_views

__all__ = [
    "FLOAT32_BETA_LIMIT_CAP",
    "FLOAT32_BETA_LIMIT_PER_INVERSE_TEMPERATURE",
    "FLOAT32_GRADIENT_TOLERANCE",
    "HARDENINGS",
    "LOSS_NAMES",
    "MATMUL_PRECISION",
    "POSITIVES",
    "QUEUE_Q_MODES",
    "SUPERVISED_LOSSES",
    "ContrastViews",
    "LossAux",
    "Queue",
    "allowed_options",
    "check_beta",
    "check_config",
    "check_temperature",
    "compute",
    "contrast_views",
    "float32_beta_limit",
    "hscl",
    "hucl",
    "masked_logsumexp",
    "options_from_config",
    "scl",
    "supcon",
    "takes_labels",
    "ucl",
    "warn_above_float32_beta_limit",
]
