"""hscl_jax: hard-negative supervised contrastive learning in JAX/Flax.

``import hscl_jax`` imports nothing else: each submodule (``hscl_jax.losses``,
``hscl_jax.models``, ``hscl_jax.data``, ...) is imported on first attribute access (PEP 562), so
the package costs no JAX or TensorFlow import until a module is used, and a module that needs an
extra (``plot`` and ``analysis`` need ``[plot]``) fails only when it is touched.

The version below is the package's only version: pyproject.toml reads it (setuptools dynamic
version) and installed metadata carries it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public modules, in the order of the docs' API reference (written out, not computed, so that
# type checkers read it). tests/test_docs_api.py holds it equal to the package's modules on disk.
__all__ = [
    "__version__",
    "losses",
    "models",
    "data",
    "config",
    "step",
    "trainer",
    "monitors",
    "evaluate",
    "theory",
    "analysis",
    "features",
    "optim",
    "checkpoints",
    "metrics",
    "distributed",
    "launch",
    "preemption",
    "locks",
    "sweep",
    "plot",
]
_SUBMODULES = tuple(name for name in __all__ if name != "__version__")

if TYPE_CHECKING:
    from hscl_jax import analysis as analysis
    from hscl_jax import checkpoints as checkpoints
    from hscl_jax import config as config
    from hscl_jax import data as data
    from hscl_jax import distributed as distributed
    from hscl_jax import evaluate as evaluate
    from hscl_jax import features as features
    from hscl_jax import launch as launch
    from hscl_jax import locks as locks
    from hscl_jax import losses as losses
    from hscl_jax import metrics as metrics
    from hscl_jax import models as models
    from hscl_jax import monitors as monitors
    from hscl_jax import optim as optim
    from hscl_jax import plot as plot
    from hscl_jax import preemption as preemption
    from hscl_jax import step as step
    from hscl_jax import sweep as sweep
    from hscl_jax import theory as theory
    from hscl_jax import trainer as trainer

else:
    # Hidden from type checkers, which read the imports above: to them an unknown attribute is an
    # error rather than a module.
    def __getattr__(name: str) -> ModuleType:
        """Imports the submodule ``name`` on first access; importing binds it on the package, so
        this runs once per module."""
        if name in _SUBMODULES:
            return importlib.import_module(f"{__name__}.{name}")
        modules = ", ".join(_SUBMODULES)
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r}; its modules are: {modules}"
        )

    def __dir__() -> list[str]:
        return sorted(__all__)
