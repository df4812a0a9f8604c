"""The command line of the tools that take a config file (train.py, ``python -m hscl_jax.sweep``):
absl's ``--config`` flag (ml_collections.config_flags) checked before absl reads it, so that a
missing file or an override of a field the config does not have is one line, and ``--help`` that
exits 0."""

from __future__ import annotations

import glob
import os
import sys

from absl import app

from hscl_jax.config.files import check_field_path, config_from_file
from hscl_jax.config.schema import ConfigError

# absl's help flags; absl exits with status 1 after printing the help they ask for.
_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
# The recipes of a checkout, named when --config is not a file.
_RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")

CONFIG_FLAG_HELP = (
    "Path to a config file (configs/*.py). Override any field with --config.<field>=<value>, "
    "e.g. --config.loss.beta=5; every field, its default and its help: python -m "
    "hscl_jax.config --list --config=FILE"
)


def _flag_values(argv: list[str], name: str) -> list[tuple[str, str]]:
    """(flag, value) of every ``--name...=value`` / ``--name... value`` in ``argv``."""
    found = []
    for i, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if flag == f"--{name}" or flag.startswith(f"--{name}."):
            if not equals:
                value = argv[i + 1] if i + 1 < len(argv) else ""
            found.append((flag, value))
    return found


def check_config_flags(argv: list[str]) -> None:
    """ConfigError (one line) unless the --config file exists and every --config.<field>
    override names a field it has; nothing to check without --config (absl reports it)."""
    files = [value for flag, value in _flag_values(argv, "config") if flag == "--config"]
    if not files:
        return
    path = files[-1]
    if not os.path.isfile(path):
        recipes = sorted(glob.glob(os.path.join(_RECIPES, "*.py")))
        allowed = ", ".join(os.path.relpath(r) for r in recipes) or "none found"
        raise ConfigError(f"--config={path} is not a file; the recipes are: {allowed}")
    config = config_from_file(path)
    for flag, _ in _flag_values(argv, "config"):
        if flag != "--config":
            check_field_path(config, flag[len("--config.") :])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run(main, flags_parser=parse_flags)``): a bad --config flag
    exits with ``error: <one line>`` and status 1; a help flag prints the help and exits 0."""
    if any(arg.partition("=")[0] in _HELP_FLAGS for arg in argv[1:]):
        try:
            app.parse_flags_with_usage(argv)
        except SystemExit:
            sys.exit(0)
    try:
        check_config_flags(argv)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    return app.parse_flags_with_usage(argv)
