"""Test-wide setup: 8 fake CPU devices for the multi-device tests, and fast XLA compiles.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything imports jax.
"""

import os

_TEST_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    # The suite is dominated by compiling many small programs; LLVM's optimisation passes cost
    # about 3x the compile time and buy nothing at these sizes.
    "--xla_backend_optimization_level=0",
)
_flags = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(
    _flags
    + [f for f in _TEST_XLA_FLAGS if f.split("=")[0] not in {g.split("=")[0] for g in _flags}]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow on 2 cores: keep its logging quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
