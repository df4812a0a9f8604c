"""The package's import graph runs one way: a module imports only from modules of earlier layers
(README, Layout). Imports are read with ``ast``, including those inside functions, so a
function-level import cannot hide a cycle."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "hscl_jax")

# module (relative to hscl_jax, "data" = the whole subpackage) -> layer
LAYERS = {
    # Process-level utilities, below everything (the data package builds datasets under a lock).
    "locks": -1,
    "distributed": 0,
    "preemption": 0,
    "losses": 0,
    "models": 0,
    "data": 0,
    "theory": 1,
    "optim": 1,
    "metrics": 1,
    "checkpoints": 1,
    "config": 2,
    "features": 2,
    "plot": 2,
    "step": 3,
    "evaluate": 4,
    "monitors": 4,
    "analysis": 4,
    "trainer": 5,
    "sweep": 6,
    "launch": 6,
}


def _module_files():
    """Every .py file of the package but its own __init__.py (which imports nothing)."""
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.endswith(".py") and path != os.path.join(PACKAGE, "__init__.py"):
                yield path


def _layer_key(path: str) -> str:
    relative = os.path.relpath(path, PACKAGE)
    top = relative.split(os.sep)[0]
    return os.path.splitext(top)[0]


def hscl_imports(source: str) -> set[str]:
    """Top-level hscl_jax modules named by every import statement of ``source``, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # Relative imports would escape this reading; the package uses absolute ones only.
            assert node.level == 0, f"relative import at line {node.lineno}: use hscl_jax.<module>"
            names = [node.module or ""]
            if node.module == "hscl_jax":
                names = [f"hscl_jax.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "hscl_jax" and len(parts) > 1 and parts[1]:
                found.add(parts[1])
    return found


def test_every_module_has_a_layer():
    modules = {_layer_key(path) for path in _module_files()}
    assert modules == set(LAYERS), (
        f"add {modules - set(LAYERS)} to LAYERS; drop {set(LAYERS) - modules}"
    )


def later_layer_imports(importer: str, source: str) -> dict[str, int]:
    """The hscl_jax modules ``source`` (module ``importer``) imports from its own or a later layer;
    a subpackage (config, data, losses) may import its own modules."""
    imported = hscl_imports(source) - {importer}
    return {m: LAYERS[m] for m in imported if LAYERS[m] >= LAYERS[importer]}


@pytest.mark.parametrize("path", sorted(_module_files()), ids=lambda p: os.path.relpath(p, REPO))
def test_module_imports_only_earlier_layers(path):
    importer = _layer_key(path)
    with open(path) as f:
        later = later_layer_imports(importer, f.read())
    assert not later, (
        f"hscl_jax/{os.path.relpath(path, PACKAGE)} (layer {LAYERS[importer]}) imports {later}, "
        "which are not in an earlier layer"
    )


def test_config_files_import_the_config_module_not_the_trainer():
    configs = os.path.join(REPO, "configs")
    for name in sorted(os.listdir(configs)):
        if name.endswith(".py"):
            with open(os.path.join(configs, name)) as f:
                assert hscl_imports(f.read()) <= {"config"}, name


def test_the_import_reader_sees_every_form():
    source = """
import hscl_jax.trainer
from hscl_jax import step as step_lib, models
from hscl_jax.config import base_config
def f():
    from hscl_jax import evaluate
    import numpy
"""
    assert hscl_imports(source) == {"trainer", "step", "models", "config", "evaluate"}
    # What analysis.py used to do: a function-level import of a later layer is caught.
    assert later_layer_imports("theory", source) == {
        "trainer": 5,
        "step": 3,
        "config": 2,
        "evaluate": 4,
    }
    assert later_layer_imports("sweep", source) == {}


# The package stays readable in pieces: the longest module and function a maintainer must hold in
# their head, and the two files every batch goes through on its way to the update.
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
MAX_LINES_OF = {"step.py": 300, "trainer.py": 400}


def _long_functions(source: str, limit: int) -> list[str]:
    """``name (N lines)`` of every function or method of ``source`` longer than ``limit`` lines."""
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > limit
    ]


@pytest.mark.parametrize("path", list(_module_files()), ids=lambda p: os.path.relpath(p, PACKAGE))
def test_modules_and_functions_stay_short(path):
    with open(path) as f:
        source = f.read()
    limit = MAX_LINES_OF.get(os.path.relpath(path, PACKAGE), MAX_MODULE_LINES)
    assert len(source.splitlines()) <= limit
    assert _long_functions(source, MAX_FUNCTION_LINES) == []


def test_the_length_reader_counts_every_line_of_a_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    short = f"def short():\n{body[: body.rindex(chr(10))]}\n"  # the limit exactly
    assert _long_functions(short, MAX_FUNCTION_LINES) == []
    long = f"class C:\n  def long():\n{body}\n"  # one line more, as a method
    assert _long_functions(long, MAX_FUNCTION_LINES) == [f"long ({MAX_FUNCTION_LINES + 1} lines)"]
