"""Contrastive pre-training entry point.

    python train.py --config=configs/default.py --workdir=/tmp/hscl_digits
    python train.py --config=configs/cifar10.py --workdir=DIR --config.loss.beta=5

Every config field, with its default and a line of help:

    python -m hscl_jax.config --list [--config=configs/default.py]

Running the same command again on the same --workdir resumes from the latest checkpoint. A bad
flag, config value or workdir stops the run before training with one line on stderr and exit
status 1. SIGTERM or SIGINT stops the run after the current step with a checkpoint of it, and exit
status 75.
"""

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
    "config", None, config_lib.CONFIG_FLAG_HELP, lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and events.")
flags.mark_flags_as_required(["config", "workdir"])


# Packages whose INFO chatter (orbax's per save, TFDS's per dataset opened) stays out of the
# console; their warnings still show.
_QUIET_PACKAGES = ("orbax", "tensorflow_datasets")


def _quiet_library_info(record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        f"{os.sep}{package}{os.sep}" in record.pathname for package in _QUIET_PACKAGES
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_library_info)
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
        checkpoints.CheckpointSaveError,
        locks.WorkdirLockError,
    ) as error:
        # Bad config or workdir, non-finite training, dataset not prepared, no usable checkpoint,
        # a checkpoint that cannot be written (a full disk), workdir in use by another run or
        # not lockable: the message says it all.
        sys.exit(f"error: {error}")
    except Exception:
        if jax.distributed.is_initialized():
            # Failing alone: stop now so that the other processes are stopped too.
            traceback.print_exc()
            distributed.exit_without_waiting(1)
        raise


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags)
