"""hscl_jax: hard-negative supervised contrastive learning in JAX/Flax.

The version below is the package's only version: pyproject.toml reads it (setuptools dynamic
version) and installed metadata carries it.
"""

__version__ = "0.1.0"
