"""Packaging: the core modules import and compute with the core install alone (no TensorFlow, no
input or plotting stack); one version string; py.typed ships; CI runs the README's test command."""

import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import numpy as np
import pytest

import hscl_jax

REPO = pathlib.Path(__file__).resolve().parents[1]

# Modules that must import and work with the core install (pyproject's `dependencies`). When a
# module is added or split out (the step, features, ...), list it here; `_loss_results` and
# `_model_step_knn_results` below call the loss, model, train step and kNN evaluator from where
# they live.
CORE_MODULES = (
    "hscl_jax",
    "hscl_jax.losses",
    "hscl_jax.models",
    "hscl_jax.data",
    "hscl_jax.theory",
    "hscl_jax.optim",
    "hscl_jax.metrics",
    "hscl_jax.checkpoints",
    "hscl_jax.config",
    "hscl_jax.features",
    "hscl_jax.step",
    "hscl_jax.evaluate",
    "hscl_jax.trainer",
    "hscl_jax.sweep",
)
# Not core: hscl_jax.plot and hscl_jax.analysis (which imports plot) need the [plot] extra.
# Top-level packages that only the extras ([data], [plot]) install: blocked in the subprocess.
EXTRA_PACKAGES = (
    "tensorflow",
    "tensorflow_datasets",
    "tensorboard",
    "grain",
    "array_record",
    "sklearn",
    "matplotlib",
)

# The start of a fresh interpreter's script: a meta-path finder refuses every package named in
# sys.argv[1] (comma-separated) as if it were not installed, and records the attempt.
_BLOCK_PACKAGES = r"""
import importlib, importlib.abc, json, sys

blocked, attempts = sys.argv[1].split(","), []


class BlockPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None


sys.meta_path.insert(0, BlockPackages())
"""
# EXTRA_PACKAGES blocked: CORE_MODULES (argv[2]) import, then the computations run.
_WITHOUT_EXTRAS = (
    _BLOCK_PACKAGES
    + r"""
for module in sys.argv[2].split(","):
    importlib.import_module(module)
sys.path.insert(0, sys.argv[3])
import test_packaging

results = {**test_packaging._loss_results(), **test_packaging._model_step_knn_results()}
print(json.dumps({"results": results, "attempts": attempts}))
"""
)


def _loss_results() -> dict[str, float]:
    """H-SCL's value and gradient norm on a fixed batch (compared with this process's)."""
    import jax
    import jax.numpy as jnp

    from hscl_jax import losses

    rng = np.random.default_rng(0)
    z1, z2 = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(2))
    z1, z2 = (z / np.linalg.norm(z, axis=1, keepdims=True) for z in (z1, z2))
    labels = rng.integers(0, 3, size=16).astype(np.int32)
    loss, grad = jax.value_and_grad(lambda z: losses.hscl(z, z2, labels, beta=1.0))(jnp.asarray(z1))
    return {"loss": float(loss), "grad_norm": float(jnp.linalg.norm(grad))}


def _model_step_knn_results() -> dict[str, float]:
    """A model's init and forward pass, one pmapped SGD step, a kNN accuracy with a known answer."""
    import jax
    import jax.numpy as jnp

    from hscl_jax import config, data, distributed, evaluate, models, optim, step

    model = models.create_model(
        "small_cnn", width=4, head_hidden_dim=16, projection_dim=8, bn_axis_name=step.AXIS_NAME
    )
    optim_config = config.base_config("digits").optim
    optim_config.name, optim_config.learning_rate, optim_config.momentum = "sgd", 0.5, 0.0
    tx, _ = optim.create_optimizer(optim_config, 10)
    state = step.create_train_state(jax.random.key(0), model, tx, (8, 8, 1))
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 16, 8, 8, 1)).astype(np.float32)
    labels = np.arange(16, dtype=np.int32) % 4
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    features, projection = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, images[0]
    )
    parallel = distributed.Parallelism("pmap", jax.devices()[:1])
    aug = data.augmentation_for(data.default_data_config("digits"))
    train_step = step.make_train_step(
        parallel,
        model=model,
        tx=tx,
        loss_name="hscl",
        loss_kwargs={"beta": 1.0},
        augmentation=aug,
    )
    pixels = rng.integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)
    batch = jax.tree.map(lambda x: x[None], data.train_batch(pixels, labels, aug))
    new_state, metrics = train_step(parallel.replicate(state), batch)
    moved = jax.tree.map(
        lambda new, old: jnp.abs(new[0] - old).max(), new_state.params, state.params
    )

    # Four tight clusters, one per class: every point's 3 nearest neighbours share its class.
    centres = np.eye(4, 8, dtype=np.float32)
    points = centres[labels] + 0.01 * rng.normal(size=(16, 8)).astype(np.float32)
    knn = evaluate.knn_accuracy(points, labels, points, labels, num_classes=4, k=3)
    return {
        "feature_norm_error": float(jnp.abs(jnp.linalg.norm(features, axis=1) - 1).max()),
        "projection_norm_error": float(jnp.abs(jnp.linalg.norm(projection, axis=1) - 1).max()),
        "step_loss": float(metrics["loss"][0]),
        "step_num_anchors": float(metrics["num_anchors"][0]),
        "step_largest_update": float(max(jax.tree.leaves(moved))),
        "knn_top1": knn["knn_top1"],
    }


def test_core_modules_import_and_compute_without_the_extras():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _WITHOUT_EXTRAS,
            ",".join(EXTRA_PACKAGES),
            ",".join(CORE_MODULES),
            str(REPO / "tests"),
        ],
        cwd=REPO,
        # Without the suite's persistent compilation cache: JAX opens its folder through etils,
        # which looks for TensorFlow (for gs:// paths), an attempt that is JAX's, not the core's.
        env={k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    without_extras = json.loads(result.stdout.strip().splitlines()[-1])
    # The core never even tries to import an extra (a try/except around one would hide a feature
    # silently missing from the core install).
    assert without_extras["attempts"] == []
    results = without_extras["results"]
    assert all(np.isfinite(value) for value in results.values()), results
    for name, value in _loss_results().items():
        np.testing.assert_allclose(results[name], value, rtol=1e-5, err_msg=name)
    assert results["feature_norm_error"] < 1e-5 and results["projection_norm_error"] < 1e-5
    # Every one of the 2 x 16 views has a positive and a negative; SGD moved the parameters.
    assert results["step_num_anchors"] == 32 and results["step_loss"] > 0
    assert results["step_largest_update"] > 1e-4
    assert results["knn_top1"] == 1.0


def test_the_blocker_refuses_an_extra():
    # Guards the test above: a blocker that let TensorFlow through would make it pass vacuously.
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_PACKAGES + "import tensorflow\n", ",".join(EXTRA_PACKAGES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named 'tensorflow' (blocked)" in result.stderr


def test_metric_writer_without_tensorboard_writes_jsonl_and_warns_once(tmp_path):
    script = _BLOCK_PACKAGES + (
        "from hscl_jax import metrics\n"
        "writer = metrics.MetricWriter(sys.argv[2], enabled=True)\n"
        "writer.write(1, {'loss': 2.5})\n"
        "writer.write(2, {'loss': 1.5})\n"
        "writer.close()\n"
        "print(json.dumps(attempts))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "tensorboard", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)[0].startswith("tensorboard")
    assert result.stderr.count("tensorboard is not installed") == 1
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == [
            {"step": 1, "loss": 2.5},
            {"step": 2, "loss": 1.5},
        ]
    assert not (tmp_path / "tensorboard").exists()


def test_installed_metadata_carries_the_package_version():
    # Fails when the environment's install is stale: reinstall (see the README's test command).
    assert importlib.metadata.version("hscl_jax") == hscl_jax.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", hscl_jax.__version__)


def test_wheel_has_the_version_py_typed_and_only_core_requirements(tmp_path):
    # The wheel is built with this environment's setuptools (no download): it must be the one the
    # build system asks for, which the README's test command installs.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (required,) = pyproject["build-system"]["requires"]
    minimum = re.fullmatch(r"setuptools>=(\d+)", required).group(1)
    installed = importlib.metadata.version("setuptools")
    if int(installed.split(".")[0]) < int(minimum):
        pytest.fail(
            f"setuptools {installed} is older than the build system's {required}: install with "
            '`pip install -c constraints.txt -e ".[data,plot,test]"`'
        )
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "hscl_jax", source / "hscl_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["--no-index", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hscl_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
    assert re.search(r"^Version: (.+)$", metadata, re.M).group(1) == hscl_jax.__version__
    assert {
        "hscl_jax/py.typed",
        "hscl_jax/losses/__init__.py",
        "hscl_jax/data/__init__.py",
    } <= names
    core = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    core_names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in core}
    assert core_names == {
        "jax",
        "flax",
        "optax",
        "chex",
        "orbax-checkpoint",
        "ml-collections",
        "numpy",
        "absl-py",
    }
    assert all(">=" in r and "==" not in r for r in core), core


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    (command,) = re.findall(r"Run the tests[^\n]*\n\n```bash\n([^\n]+)\n```", readme)
    install, run_tests = command.split(" && ")
    assert "-c constraints.txt" in install
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci_lines.index(install) < ci_lines.index(run_tests)


def test_constraints_pin_every_requirement_exactly():
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    for requirement in requirements:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()
        assert name in pins, f"{name} is not in constraints.txt"
        lower = re.search(r">=\s*([0-9][^,;\s]*)", requirement)
        if lower:
            # The lock is inside the range: the lower bound is not above what CI tests.
            pinned = tuple(int(p) for p in re.findall(r"\d+", pins[name]))
            assert tuple(int(p) for p in re.findall(r"\d+", lower.group(1))) <= pinned, name
