"""The check of a whole config (:func:`validate_config`): one call per section, to the check of
the module that consumes it where that module owns one, to the checks here for the rest and for
what spans sections."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from hscl_jax import data, distributed, losses, models, optim, theory
from hscl_jax.config.options import num_devices_for
from hscl_jax.config.schema import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(config: ml_collections.ConfigDict, key: str, prefix: str = "config") -> None:
    value = config[key]
    _require(_is_int(value) and value > 0, f"{prefix}.{key}={value!r} must be a positive integer")


def _non_negative_int(config: ml_collections.ConfigDict, key: str, prefix: str = "config") -> None:
    value = config[key]
    _require(_is_int(value) and value >= 0, f"{prefix}.{key}={value!r} must be an integer >= 0")


def _allowed(value: object, names: Sequence[str], field: str) -> None:
    _require(value in names, f"{field}={value!r} is unknown; allowed: {', '.join(names)}")


def check_run(config: ml_collections.ConfigDict) -> None:
    """Top-level fields: batch size, training length, logging/checkpoint intervals, seed."""
    for key in (
        "global_batch_size",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
    ):
        _positive_int(config, key)
    for key in ("num_steps", "num_epochs", "eval_every_steps", "seed"):
        _non_negative_int(config, key)
    _require(
        config.num_steps > 0 or config.num_epochs > 0,
        "config.num_steps and config.num_epochs are both 0: set one of them to train",
    )
    _allowed(config.parallelism, distributed.PARALLELISMS, "config.parallelism")
    _require(
        isinstance(config.skip_nonfinite_steps, bool),
        f"config.skip_nonfinite_steps={config.skip_nonfinite_steps!r} must be True or False",
    )


def check_knn(knn_config: ml_collections.ConfigDict) -> None:
    """config.knn: the kNN monitor's k, temperature and batch sizes."""
    _positive_int(knn_config, "k", "config.knn")
    _require(
        knn_config.temperature > 0,
        f"config.knn.temperature={knn_config.temperature!r} must be > 0",
    )
    _positive_int(knn_config, "eval_batch_size", "config.knn")
    _positive_int(knn_config, "test_chunk_size", "config.knn")


def check_queue(queue_config: ml_collections.ConfigDict) -> None:
    """config.queue: size, momentum, as_positives, q."""
    _non_negative_int(queue_config, "size", "config.queue")
    momentum = queue_config.momentum
    _require(
        isinstance(momentum, int | float) and not isinstance(momentum, bool) and 0 <= momentum < 1,
        f"config.queue.momentum={momentum!r} must be a number in [0, 1)",
    )
    _require(
        isinstance(queue_config.as_positives, bool),
        f"config.queue.as_positives={queue_config.as_positives!r} must be True or False",
    )
    _allowed(queue_config.q, losses.QUEUE_Q_MODES, "config.queue.q")


def check_across_sections(config: ml_collections.ConfigDict) -> None:
    """What no single section decides: both global batches split evenly over the devices, every
    anchor can have a negative, queue positives have labels, a remote data_dir resolves."""
    total_devices = jax.process_count() * num_devices_for(config)
    for field, size in (
        ("config.global_batch_size", config.global_batch_size),
        ("config.knn.eval_batch_size", config.knn.eval_batch_size),
    ):
        _require(
            size % total_devices == 0,
            f"{field}={size} is not divisible by the {total_devices} devices (processes x local "
            "devices)",
        )
    check_batch_has_negatives(config)
    _require(
        not config.queue.as_positives or config.loss.name in losses.SUPERVISED_LOSSES,
        f"config.queue.as_positives=True needs labels; config.loss.name={config.loss.name!r} is "
        f"not one of {', '.join(losses.SUPERVISED_LOSSES)}",
    )
    check_data_dir_reachable(config.data)


def check_batch_has_negatives(config: ml_collections.ConfigDict) -> None:
    """Refuses a batch in which no anchor can have a negative for the chosen loss: every loss
    contrasts an anchor with other images' views (supervised ones: of other classes only), so a
    batch needs >= 2 images, and a supervised loss a dataset of >= 2 classes."""
    name, batch = config.loss.name, config.global_batch_size
    supervised = losses.takes_labels(name)
    whose = "other images' views of other classes" if supervised else "other images' views"
    _require(
        batch >= 2,
        f"config.global_batch_size={batch} leaves no anchor a negative: loss {name!r} takes its "
        f"negatives from {whose}; use a global batch of >= 2 images",
    )
    if supervised:
        num_classes = data.dataset_info(config.data.name, config.data.data_dir).num_classes
        _require(
            num_classes >= 2,
            f"config.data.name={config.data.name!r} has {num_classes} class: supervised loss "
            f"{name!r} needs >= 2 classes for any anchor to have a negative; use ucl or hucl",
        )


# Hosts behind the remote file systems a TFDS data_dir may name.
_REMOTE_HOSTS = {"gs": "storage.googleapis.com", "s3": "s3.amazonaws.com"}


def check_data_dir_reachable(
    data_config: ml_collections.ConfigDict, timeout_s: float = 5.0
) -> None:
    """A remote config.data.data_dir (gs://, s3://, http(s)://...) must have a host that resolves:
    without a network, TFDS would retry for minutes and end in a long traceback. A local
    directory is left to the data pipeline (its own message says how to prepare the dataset)."""
    import concurrent.futures
    import socket
    import urllib.parse

    data_dir = data_config.data_dir
    scheme = urllib.parse.urlsplit(data_dir).scheme if data_dir else ""
    if len(scheme) < 2:  # none, or a Windows drive letter
        return
    host = _REMOTE_HOSTS.get(scheme) or urllib.parse.urlsplit(data_dir).hostname
    if not host:
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout_s)
    except (OSError, concurrent.futures.TimeoutError):
        raise ConfigError(
            f"config.data.data_dir={data_dir!r} cannot be reached: host {host} does not resolve "
            "(no network?); use a local directory holding the prepared dataset"
        ) from None
    finally:
        pool.shutdown(wait=False)


def _check_section(section: str, check: Callable[..., object], *args: Any) -> None:
    """Runs the check that the consumer of ``config.<section>`` owns; its ValueError (one line)
    becomes a ConfigError naming the section."""
    try:
        check(*args)
    except ConfigError:
        raise
    except ValueError as error:
        message = str(error)
        if message.startswith("config."):
            raise ConfigError(message) from None
        if message.startswith(f"{section}."):
            raise ConfigError(f"config.{message}") from None
        raise ConfigError(f"config.{section}: {message}") from None


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every value the run depends on; raises ConfigError (a ValueError) with one line.

    One call per section: the check of the module that consumes it where that module owns one
    (models, the losses, optim, data, theory), config's own for the rest.
    """
    check_run(config)
    _check_section("model", models.model_from_config, config.model)
    _check_section("loss", losses.check_config, config.loss)
    _check_section("optim", optim.check_config, config.optim)
    _check_section("data", data.check_config, config.data)
    _check_section("knn", check_knn, config.knn)
    _check_section("theory", theory.check_config, config.theory)
    _check_section("queue", check_queue, config.queue)
    check_across_sections(config)
