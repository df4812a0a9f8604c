"""Test-wide setup: 8 fake CPU devices for the multi-device tests.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow on 2 cores: keep its logging quiet and its thread pools small.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
