"""The package as the docs present it: ``import hscl_jax`` is cheap and gives every module lazily,
``__all__`` names every public module, and each one has a page in the API reference."""

import ast
import pathlib
import subprocess
import sys

import pytest

import hscl_jax

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hscl_jax"
MODULES = [name for name in hscl_jax.__all__ if name != "__version__"]


def test_all_names_every_public_module_of_the_package():
    on_disk = {
        path.stem if path.is_file() else path.name
        for path in PACKAGE.iterdir()
        if (path.suffix == ".py" or (path / "__init__.py").is_file())
        and not path.name.startswith("_")
    }
    assert set(MODULES) == on_disk
    assert len(MODULES) == len(set(MODULES))


def test_type_checkers_see_the_modules_that_getattr_imports():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    (guard,) = [
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    ]
    imported = {alias.asname for node in guard.body for alias in node.names}
    assert imported == set(MODULES)


def test_import_is_lazy_and_a_module_loads_on_first_use():
    # A fresh interpreter: importing the package loads no numerical or input stack; touching
    # hscl_jax.losses imports it (and jax), still without TensorFlow.
    script = """
import sys
import hscl_jax
heavy = ("jax", "jaxlib", "numpy", "flax", "tensorflow", "hscl_jax.losses")
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in heavy))
assert callable(hscl_jax.losses.hscl)
print("hscl_jax.losses" in sys.modules, "jax" in sys.modules, "tensorflow" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["[]", "True True False"]


def test_an_unknown_attribute_names_the_modules():
    with pytest.raises(AttributeError, match=r"no attribute 'lossses'; its modules are: losses, "):
        hscl_jax.lossses  # noqa: B018
    assert not hasattr(hscl_jax, "lossses")
    assert set(MODULES) <= set(dir(hscl_jax))
    assert hscl_jax.losses is sys.modules["hscl_jax.losses"]


def test_every_module_has_a_page_in_the_api_reference():
    documented = set()
    for page in sorted((REPO / "docs" / "api").glob("*.md")):
        for line in page.read_text().splitlines():
            if line.startswith("::: hscl_jax."):
                documented.add(line.removeprefix("::: hscl_jax.").strip())
    assert documented == set(MODULES)
