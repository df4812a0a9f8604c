"""Contrastive pre-training entry point.

    python train.py --config=configs/default.py --workdir=/tmp/hscl_digits
    python train.py --config=configs/cifar10.py --workdir=DIR --config.loss.beta=5

Running the same command again on the same --workdir resumes from the latest checkpoint. A bad
flag, config value or workdir stops the run before training with one line on stderr and exit
status 1. SIGTERM or SIGINT stops the run after the current step with a checkpoint of it, and exit
status 75.
"""

import glob
import logging as std_logging
import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from hscl_jax import checkpoints, data, distributed, locks, metrics, preemption, trainer
from hscl_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and events.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax_info(record: std_logging.LogRecord) -> bool:
    """Keeps orbax's per-save INFO chatter out of the console (its warnings still show)."""
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


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


def _check_config_flags(argv: list[str]) -> None:
    """The config file exists and every --config.<field> override names a field it has."""
    files = [value for flag, value in _flag_values(argv, "config") if flag == "--config"]
    if not files:
        return  # absl reports the missing required flag
    path = files[-1]
    if not os.path.isfile(path):
        recipes = sorted(
            glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "*.py"))
        )
        allowed = ", ".join(os.path.relpath(r) for r in recipes)
        raise config_lib.ConfigError(f"--config={path} is not a file; the recipes are: {allowed}")
    config = config_lib.config_from_file(path)
    for flag, _ in _flag_values(argv, "config"):
        if flag != "--config":
            config_lib.check_field_path(config, flag[len("--config.") :])


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        _check_config_flags(argv)
    except config_lib.ConfigError as error:
        sys.exit(f"error: {error}")
    return app.parse_flags_with_usage(argv)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_orbax_info)
    try:
        trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except preemption.StopRequested as stopped:
        print(stopped, file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_STATUS)
    except (
        config_lib.ConfigError,
        data.DataError,
        metrics.WorkdirError,
        FloatingPointError,
        FileNotFoundError,
        checkpoints.DamagedCheckpointError,
        locks.WorkdirInUseError,
    ) as error:
        # Bad config or workdir, non-finite training, dataset not prepared, no usable checkpoint,
        # workdir in use by another run: the message says it all.
        sys.exit(f"error: {error}")
    except Exception:
        if jax.distributed.is_initialized():
            # Failing alone: stop now so that the other processes are stopped too.
            traceback.print_exc()
            distributed.exit_without_waiting(1)
        raise


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
