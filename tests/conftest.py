"""Test-wide setup: 8 fake CPU devices for the multi-device tests, and fast XLA compiles.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything imports jax.
The train.py subprocesses that tests start inherit these flags (the launcher sets its own device
count; a run on fewer devices says so with --config.num_devices).
"""

import os
import subprocess
import sys

_TEST_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    # The suite is dominated by compiling many small programs; LLVM's optimisation passes are
    # most of that compile time and buy nothing at these sizes.
    "--xla_backend_optimization_level=0",
)
# XLA:CPU's older fusion emitters compile these small programs faster (docs/benchmarks.md, "Test
# suite"). XLA releases that no longer know the flag abort on it, so it is used only where this
# XLA accepts it.
_FASTER_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    """Whether a CPU backend starts with ``flag`` (XLA aborts the process on a flag it does not
    know, so the probe runs in a child)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices('cpu')"],
        env=dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu"),
        capture_output=True,
    )
    return probe.returncode == 0


_flags = os.environ.get("XLA_FLAGS", "").split()
_names = {g.split("=")[0] for g in _flags}
_flags += [f for f in _TEST_XLA_FLAGS if f.split("=")[0] not in _names]
# Test workers inherit the flags of the session that starts them: one probe per session.
if _FASTER_COMPILE_FLAG.split("=")[0] not in _names and _xla_accepts(_FASTER_COMPILE_FLAG):
    _flags.append(_FASTER_COMPILE_FLAG)
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow on 2 cores: keep its logging quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ----------------------------------------------------------------------------- shared fixtures
# (imported lazily: XLA_FLAGS above must be set before anything imports jax)

import tempfile  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_digits_config(**top_level):
    """configs/default.py shrunk to a few fast steps; keyword arguments set top-level fields."""
    from hscl_jax import config as config_lib

    config = config_lib.config_from_file(os.path.join(REPO, "configs", "default.py"))
    config.model.width = 4
    config.model.head_hidden_dim = 16
    config.model.projection_dim = 8
    config.global_batch_size = 16
    config.num_steps = 4
    config.num_devices = 1
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 0
    config.knn.k = 20
    config.knn.eval_batch_size = 512
    for key, value in top_level.items():
        config[key] = value
    return config


@pytest.fixture(scope="session")
def tiny_digits_config():
    """A factory: ``tiny_digits_config(num_steps=2, ...)`` is configs/default.py shrunk to a few
    fast steps on one device (keyword arguments set top-level fields)."""
    return _tiny_digits_config


@pytest.fixture(scope="session")
def repo_root():
    """The checkout's root (where train.py and configs/ are)."""
    return REPO


@pytest.fixture(autouse=True, scope="session")
def temporary_files_under_pytest_basetemp(tmp_path_factory):
    """Every temporary folder made during the tests (and by their subprocesses) lies under
    pytest's base temporary directory: TFDS makes a folder with tempfile.mkdtemp("tfds") whenever
    it sets up the metadata of a dataset that is not prepared yet, and never removes it."""
    scratch = str(tmp_path_factory.mktemp("tempfile"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", scratch)
        patch.setenv("TMPDIR", scratch)
        yield


@pytest.fixture(autouse=True, scope="session")
def compilation_cache_per_worker(tmp_path_factory):
    """One persistent compilation cache per test worker, used by its tests and inherited by the
    train.py subprocesses they start: many tests build the same small programs again (a resumed
    run, the same tiny config in several files), and XLA compiles dominate the suite. The cache
    holds executables only, so a hit runs the very program a compile would have produced."""
    import jax

    cache = str(tmp_path_factory.mktemp("jax_cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        previous = (
            jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs,
        )
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        yield
        jax.config.update("jax_compilation_cache_dir", previous[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
