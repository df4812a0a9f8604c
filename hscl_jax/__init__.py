"""hscl_jax."""
