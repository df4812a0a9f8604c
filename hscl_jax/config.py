"""The run configuration: the schema (:func:`base_config`), one checker per section
(:func:`validate_config`), the option helpers that turn a config into the loss's and the theory
monitor's keyword arguments, the config of a finished run (:func:`load_config`), configs/*.py
files (:func:`config_from_file`) and the resume-mismatch check.

Layer 2: imports losses, models, data (layer 0), optim and metrics (layer 1); imported by
configs/*.py, step.py, evaluate.py, analysis.py, trainer.py, sweep.py, train.py and bench/.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from ml_collections import config_dict

from hscl_jax import data, distributed, losses, metrics, models, optim


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training starts."""


# ----------------------------------------------------------------------------- the schema


def base_config(dataset: str = "cifar10") -> ml_collections.ConfigDict:
    """The full config schema with the reference recipe's values (configs/ start from here).

    Reference: ResNet-50, Adam 1e-3 with L2 1e-6 added to the gradient, batch 256, t 0.5, 200
    epochs, H-SCL beta 1. ``dataset`` picks ``config.data`` (hscl_jax.data.default_data_config).

    Schema (every field is overridable, e.g. ``--config.loss.beta=5``):

    - ``seed``: int; seeds the parameter init. The data order and augmentations are seeded by
      ``data.seed`` (batch n depends only on (data.seed, n, config.data)).
    - ``global_batch_size``: images per step over all devices of all processes (each gives 2 views).
    - ``num_steps`` (> 0 wins) or ``num_epochs`` (x steps per epoch of the train split).
    - ``num_devices``: local devices to use (None: all); ``distributed``: True to
      join a multi-process run (also when the environment sets HSCL_DISTRIBUTED=1; see
      hscl_jax.distributed); ``parallelism``: how the step maps over the devices, "mesh"
      (jax.jit of jax.shard_map over a Mesh) or "pmap" (hscl_jax.distributed.Parallelism).
    - ``model``: ``name`` (small_cnn | resnet18 | resnet50), ``width`` (None: reference width),
      ``stage_sizes`` (ResNets; None: the named depth), ``stem`` (ResNets: cifar | imagenet),
      ``head_hidden_dim`` (512),
      ``projection_dim`` (128), ``dtype`` (float32 | bfloat16 compute).
    - ``loss``: ``name`` (ucl | scl | hucl | hscl | supcon) and the options of all losses; only
      those the chosen loss takes are passed to it (see hscl_jax.losses): ``temperature``,
      ``beta``, ``positives`` (all | partner), ``detach_weights``, ``tau_plus``, ``clamp``,
      ``block_size``, ``hardening`` (hscl/hucl: exp | topk | poly, the weight of a negative; beta
      is not passed with topk, which takes none) and ``top_k`` (topk's k).
    - ``optim``: ``name`` (adam | adamw | sgd | lars), ``learning_rate``, ``weight_decay`` (L2
      added to the gradient for adam/sgd), ``weight_decay_on_bn_and_bias``, ``schedule``
      (constant | warmup_cosine), ``warmup_steps``, ``final_lr_fraction``, ``b1``, ``b2``,
      ``eps``, ``momentum``, ``nesterov``, ``trust_coefficient`` (lars).
    - ``data``: hscl_jax.data.default_data_config(name) (sampler, augmentation, data_dir, ...).
    - ``log_every_steps``, ``eval_every_steps`` (kNN monitor; 0: only at the end),
      ``checkpoint_every_steps``, ``keep_checkpoints``, ``skip_nonfinite_steps`` (False: stop the
      run).
    - ``knn``: ``k``, ``temperature``, ``eval_batch_size`` (global), ``test_chunk_size``.
    - ``theory``: the train-time theory monitor (hscl_jax.theory.theory_metrics on every step's
      projections: the four losses, Assumption 1, the inequality flags; logged with the step
      metrics and as epoch means). ``enabled`` (False: the step is compiled without it),
      ``beta`` (None: config.loss.beta when the loss takes a beta, else 1.0), ``temperature``
      (None: config.loss.temperature), ``reference_size`` (> 0, with ``enabled``: at every
      logging step the H-SCL loss of a fixed training batch is also computed against the first
      ``reference_size`` training examples as negatives, and against the batch plus growing
      parts of the queue: hscl_jax.theory.negative_set_estimates; 0: off).
    - ``queue``: a labelled queue of negatives beyond the batch (MoCo-style keys from a momentum
      encoder; hscl_jax.step). ``size`` (K keys; 0: off, the default, and then the step, state
      and checkpoints are exactly those without a queue), ``momentum`` (EMA rate of the momentum
      encoder's params and BatchNorm statistics, in [0, 1)), ``as_positives`` (supervised losses:
      same-label queue rows are also positives), ``q`` (the tilted family's Q: "fixed", 2B - 2
      as without a queue, the default, so that the queue only sharpens the estimate of the
      tilted mean; "grows": Q also counts the filled queue rows; hscl_jax.losses.hscl).
    """
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.global_batch_size = 256
    config.num_epochs = 200
    config.num_steps = 0
    config.num_devices = config_dict.placeholder(int)
    config.distributed = False
    config.parallelism = "mesh"

    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet50"
    config.model.width = config_dict.placeholder(int)
    config.model.stage_sizes = config_dict.placeholder(tuple)
    config.model.stem = "cifar"
    config.model.head_hidden_dim = 512
    config.model.projection_dim = 128
    config.model.dtype = "float32"

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "hscl"
    config.loss.temperature = 0.5
    config.loss.beta = 1.0
    config.loss.positives = "all"
    config.loss.detach_weights = False
    config.loss.tau_plus = 0.0
    config.loss.clamp = False
    config.loss.block_size = config_dict.placeholder(int)
    config.loss.hardening = "exp"
    config.loss.top_k = config_dict.placeholder(int)

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adam"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 1e-6
    config.optim.weight_decay_on_bn_and_bias = True
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.optim.final_lr_fraction = 0.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.momentum = 0.9
    config.optim.nesterov = False
    config.optim.trust_coefficient = 0.001

    config.data = data.default_data_config(dataset)

    config.log_every_steps = 50
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.skip_nonfinite_steps = False

    config.knn = ml_collections.ConfigDict()
    config.knn.k = 200
    config.knn.temperature = 0.5
    config.knn.eval_batch_size = 512
    config.knn.test_chunk_size = 1024

    config.theory = ml_collections.ConfigDict()
    config.theory.enabled = False
    config.theory.beta = config_dict.placeholder(float)
    config.theory.temperature = config_dict.placeholder(float)
    config.theory.reference_size = 0

    config.queue = ml_collections.ConfigDict()
    config.queue.size = 0
    config.queue.momentum = 0.99
    config.queue.as_positives = False
    config.queue.q = "fixed"
    return config


# ----------------------------------------------------------------------------- option helpers


def loss_options(loss_config) -> dict[str, Any]:
    """The options of ``loss_config`` that loss ``loss_config.name`` takes (others are ignored:
    the config carries every loss's options so baselines are one ``--config.loss.name`` away).
    ``None`` values (unset placeholders) are left to the loss's default."""
    allowed = set(losses.allowed_options(loss_config.name)) - {"return_aux"}
    options = {
        key: value for key, value in loss_config.items() if key in allowed and value is not None
    }
    if options.get("hardening") == "topk":
        options.pop("beta", None)  # the config always carries a beta; "topk" takes none
    return options


def theory_hyperparameters(config) -> dict[str, float]:
    """``{"beta", "temperature"}`` the theory checks use for ``config``, whether or not the
    train-time monitor is on (hscl_jax.analysis uses them on a finished run).

    Unset values follow the loss: beta is config.loss.beta when the loss takes a beta (else 1.0),
    the temperature config.loss.temperature. A config without a ``theory`` entry (a run written
    before it existed) follows the loss.
    """
    theory = config.get("theory") or {}
    beta = theory.get("beta")
    if beta is None:
        beta = loss_options(config.loss).get("beta", 1.0)
    temperature = theory.get("temperature")
    if temperature is None:
        temperature = config.loss.temperature
    return {"beta": float(beta), "temperature": float(temperature)}


def theory_monitor_options(config) -> dict[str, float] | None:
    """The train-time theory monitor's keyword arguments (:func:`theory_hyperparameters`) when
    config.theory.enabled, else None: the monitor is off and the step is compiled without it."""
    theory = config.get("theory")
    if theory is None or not theory.get("enabled"):
        return None
    return theory_hyperparameters(config)


# config.queue entries passed to the loss when the queue is on (to the losses that take them),
# and the loss's names for them.
QUEUE_LOSS_OPTIONS = {"as_positives": "queue_as_positives", "q": "queue_q"}
SUPERVISED_LOSSES = ("scl", "hscl", "supcon")


def queue_options(config) -> dict[str, Any] | None:
    """None when the queue is off (config.queue.size == 0, or a config without ``queue``), else
    ``{"size", "momentum", "loss_kwargs"}``: the step's queue size and EMA rate and the loss's
    queue keyword arguments."""
    queue = config.get("queue")
    if queue is None or not queue.get("size"):
        return None
    allowed = losses.allowed_options(config.loss.name)
    loss_kwargs = {
        name: queue[key]
        for key, name in QUEUE_LOSS_OPTIONS.items()
        if name in allowed and key in queue
    }
    return {
        "size": int(queue.size),
        "momentum": float(queue.momentum),
        "loss_kwargs": loss_kwargs,
    }


def reference_size_for(config) -> int:
    """Training examples in the theory monitor's fixed reference set; 0 when the monitor or the
    reference view is off."""
    if theory_monitor_options(config) is None:
        return 0
    return int(config.theory.get("reference_size") or 0)


def num_devices_for(config) -> int:
    """Local devices this process trains on: config.num_devices, or all local devices."""
    available = jax.local_device_count()
    requested = config.get("num_devices")
    if requested is None:
        return available
    _require(
        isinstance(requested, int) and 1 <= requested <= available,
        f"config.num_devices={requested!r} must be between 1 and the {available} local devices",
    )
    return requested


def config_errors_from(data_function: Callable, *args, **kwargs):
    """Calls a hscl_jax.data function; its ValueErrors (bad data config) become ConfigError."""
    try:
        return data_function(*args, **kwargs)
    except ValueError as error:
        raise ConfigError(f"config.data: {error}") from None


def total_steps_for(config) -> int:
    """config.num_steps if set, else num_epochs x steps per epoch of the training split."""
    if config.num_steps > 0:
        return config.num_steps
    return config.num_epochs * config_errors_from(
        data.steps_per_epoch, config.data, config.global_batch_size
    )


# ----------------------------------------------------------------------------- checks


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(config, key: str, prefix: str = "config") -> None:
    value = config[key]
    _require(_is_int(value) and value > 0, f"{prefix}.{key}={value!r} must be a positive integer")


def _non_negative_int(config, key: str, prefix: str = "config") -> None:
    value = config[key]
    _require(_is_int(value) and value >= 0, f"{prefix}.{key}={value!r} must be an integer >= 0")


def _allowed(value, names, field: str) -> None:
    _require(value in names, f"{field}={value!r} is unknown; allowed: {', '.join(names)}")


def check_run(config) -> None:
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


def check_model(model_config) -> None:
    """config.model: a known architecture that builds with these options."""
    _allowed(model_config.name, models.MODEL_NAMES, "config.model.name")
    try:
        models.model_from_config(model_config)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_loss(loss_config) -> None:
    """config.loss: the loss validates its own options; it runs once on a toy batch so that a bad
    option surfaces now rather than at the first step."""
    _allowed(loss_config.name, losses.LOSS_NAMES, "config.loss.name")
    toy = jnp.eye(4, 8)
    try:
        losses.compute(
            loss_config.name, toy, toy[::-1], jnp.array([0, 1, 0, 1]), **loss_options(loss_config)
        )
    except ValueError as error:
        raise ConfigError(f"config.loss: {error}") from None
    warn_above_float32_beta_limit(loss_config)


def warn_above_float32_beta_limit(loss_config) -> bool:
    """Logs a warning (and returns True) when the loss's beta exceeds the largest beta at which
    its float32 gradients were measured within FLOAT32_GRADIENT_TOLERANCE of float64
    (losses.float32_beta_limit); the run still trains: typical batches stay far more accurate."""
    options = loss_options(loss_config)
    if "beta" not in options:
        return False
    temperature = options.get("temperature", 0.5)
    limit = losses.float32_beta_limit(temperature)
    if options["beta"] <= limit:
        return False
    logging.warning(
        "config.loss.beta=%r is above %g, the largest beta at which float32 gradients of %r were "
        "measured within %g of float64 at temperature %g (losses.float32_beta_limit: "
        "min(%g * t, %g)); gradients may be inexact",
        options["beta"],
        limit,
        loss_config.name,
        losses.FLOAT32_GRADIENT_TOLERANCE,
        temperature,
        losses.FLOAT32_BETA_LIMIT_PER_INVERSE_TEMPERATURE,
        losses.FLOAT32_BETA_LIMIT_CAP,
    )
    return True


def check_optim(optim_config) -> None:
    """config.optim: a known optimiser and schedule, a positive learning rate."""
    _allowed(optim_config.name, optim.OPTIMIZER_NAMES, "config.optim.name")
    _allowed(optim_config.schedule, optim.SCHEDULE_NAMES, "config.optim.schedule")
    _require(
        optim_config.learning_rate > 0,
        f"config.optim.learning_rate={optim_config.learning_rate!r} must be > 0",
    )
    _require(
        optim_config.weight_decay >= 0,
        f"config.optim.weight_decay={optim_config.weight_decay!r} must be >= 0",
    )
    _non_negative_int(optim_config, "warmup_steps", "config.optim")


def check_data(config, total_devices: int) -> None:
    """config.data names a known dataset; the global batch splits evenly over the devices."""
    try:
        data.dataset_info(config.data.name)
    except (ValueError, KeyError) as error:
        raise ConfigError(f"config.data.name={config.data.name!r}: {error}") from None
    _require(
        config.data.augment_on in data.AUGMENT_ON,
        f"config.data.augment_on={config.data.augment_on!r} is unknown; allowed: "
        f"{', '.join(data.AUGMENT_ON)}",
    )
    _require(
        config.global_batch_size % total_devices == 0,
        f"config.global_batch_size={config.global_batch_size} is not divisible by the "
        f"{total_devices} devices (processes x local devices)",
    )


def check_batch_has_negatives(config) -> None:
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
        num_classes = data.dataset_info(config.data.name).num_classes
        _require(
            num_classes >= 2,
            f"config.data.name={config.data.name!r} has {num_classes} class: supervised loss "
            f"{name!r} needs >= 2 classes for any anchor to have a negative; use ucl or hucl",
        )


# Hosts behind the remote file systems a TFDS data_dir may name.
_REMOTE_HOSTS = {"gs": "storage.googleapis.com", "s3": "s3.amazonaws.com"}


def check_data_dir_reachable(data_config, timeout_s: float = 5.0) -> None:
    """A remote config.data.data_dir (gs://, s3://, http(s)://...) must have a host that resolves:
    without a network, TFDS would retry for minutes and end in a long traceback. A local
    directory is left to the data pipeline (its own message says how to prepare the dataset)."""
    import concurrent.futures
    import socket
    import urllib.parse

    data_dir = data_config.get("data_dir")
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


def check_knn(knn_config, total_devices: int) -> None:
    """config.knn: the kNN monitor's k, temperature and batch sizes."""
    _positive_int(knn_config, "k", "config.knn")
    _require(
        knn_config.temperature > 0,
        f"config.knn.temperature={knn_config.temperature!r} must be > 0",
    )
    _positive_int(knn_config, "eval_batch_size", "config.knn")
    _positive_int(knn_config, "test_chunk_size", "config.knn")
    _require(
        knn_config.eval_batch_size % total_devices == 0,
        f"config.knn.eval_batch_size={knn_config.eval_batch_size} is not divisible by the "
        f"{total_devices} devices",
    )


def check_theory(theory_config) -> None:
    """config.theory (absent in runs written before it existed): enabled, beta, temperature."""
    if theory_config is None:
        return
    _require(
        isinstance(theory_config.enabled, bool),
        f"config.theory.enabled={theory_config.enabled!r} must be True or False",
    )
    if "reference_size" in theory_config:
        _non_negative_int(theory_config, "reference_size", "config.theory")
    for key, check, allowed in (
        ("beta", losses.check_beta, ">= 0"),
        ("temperature", losses.check_temperature, "> 0"),
    ):
        value = theory_config.get(key)
        try:
            if value is not None:
                check(value)
        except ValueError:
            raise ConfigError(
                f"config.theory.{key}={value!r} must be None (follow config.loss) or a finite "
                f"number {allowed}"
            ) from None


def check_queue(config) -> None:
    """config.queue (absent in runs written before it existed): size, momentum, as_positives."""
    queue = config.get("queue")
    if queue is None:
        return
    _non_negative_int(queue, "size", "config.queue")
    momentum = queue.momentum
    _require(
        isinstance(momentum, int | float)
        and not isinstance(momentum, bool)
        and 0.0 <= momentum < 1.0,
        f"config.queue.momentum={momentum!r} must be a number in [0, 1)",
    )
    _require(
        isinstance(queue.as_positives, bool),
        f"config.queue.as_positives={queue.as_positives!r} must be True or False",
    )
    if "q" in queue:
        _allowed(queue.q, losses.QUEUE_Q_MODES, "config.queue.q")
    _require(
        not queue.as_positives or config.loss.name in SUPERVISED_LOSSES,
        f"config.queue.as_positives=True needs labels; config.loss.name={config.loss.name!r} is "
        f"not one of {', '.join(SUPERVISED_LOSSES)}",
    )


def validate_config(config) -> None:
    """Checks every value the run depends on; raises ConfigError (a ValueError) with one line."""
    check_run(config)
    check_model(config.model)
    check_loss(config.loss)
    check_optim(config.optim)
    total_devices = jax.process_count() * num_devices_for(config)
    check_data(config, total_devices)
    check_batch_has_negatives(config)
    check_data_dir_reachable(config.data)
    check_knn(config.knn, total_devices)
    check_theory(config.get("theory"))
    check_queue(config)


# ----------------------------------------------------------------------------- files


def config_from_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file such as configs/default.py."""
    name = "hscl_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_field_path(config, dotted: str) -> None:
    """ConfigError naming the first part of ``dotted`` (e.g. "model.widht", from a command-line
    override ``--config.model.widht=8``) that ``config`` does not have, and the fields it has."""
    node, prefix = config, "config"
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"{prefix} is a value, not a section: it has no field {part!r}")
        if part not in node:
            raise ConfigError(
                f"unknown config field {prefix}.{part}; {prefix} has: {', '.join(sorted(node))}"
            )
        node, prefix = node[part], f"{prefix}.{part}"


def to_json_ready(config) -> dict:
    """``config`` as a dict that JSON can hold (tuples become lists, other objects strings)."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else config
    return json.loads(json.dumps(as_dict, default=str))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with, from ``workdir/config.json`` (without the
    ``resolved`` entry the trainer adds there)."""
    path = os.path.join(workdir, metrics.CONFIG_JSON)
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: not a training run directory")
    with open(path) as f:
        saved = json.load(f)
    saved.pop("resolved", None)
    return ml_collections.ConfigDict(saved)


# Config entries that change the sequence of batches or the optimisation; resuming with different
# values cannot reproduce the uninterrupted run, so the run says so.
RESUME_SENSITIVE = ("seed", "global_batch_size", "data", "loss", "optim", "model", "queue")


def resume_mismatches(saved_config: dict, config_json: dict) -> list[str]:
    """The RESUME_SENSITIVE entries in which a checkpoint's saved config and this run's differ."""
    return [k for k in RESUME_SENSITIVE if saved_config.get(k) != config_json.get(k)]
