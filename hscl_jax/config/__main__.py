"""``python -m hscl_jax.config --list [--config=FILE]``: every field of a run's config, with its
default (or the file's value) and a line of help."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from hscl_jax.config.files import config_from_file
from hscl_jax.config.schema import base_config, list_fields


def main(argv: Sequence[str] | None = None) -> int:
    """Prints one line per field; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m hscl_jax.config",
        description="Every field of a run's config, with its value and a line of help.",
    )
    parser.add_argument(
        "--list", action="store_true", required=True, help="print every field (required)"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a config file (configs/*.py) whose values to show; default: the schema's defaults",
    )
    args = parser.parse_args(argv)
    if args.config is not None and not os.path.isfile(args.config):
        print(f"error: --config={args.config} is not a file", file=sys.stderr)
        return 1
    config = base_config() if args.config is None else config_from_file(args.config)
    print("\n".join(list_fields(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
