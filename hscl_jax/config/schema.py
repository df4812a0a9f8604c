"""The config schema: one function per section (the ``Fields:`` block of its docstring is the help
of each field), :func:`base_config` built from them, the help of every field of a config, and
:class:`ConfigError`, what a config that cannot work raises."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import ml_collections
from ml_collections import config_dict

from hscl_jax import data


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training starts."""


def run_fields() -> ml_collections.ConfigDict:
    """The top-level fields of a run.

    Fields:
      seed: seeds the parameter init; the data order and augmentations follow data.seed.
      global_batch_size: images per step over all devices of all processes (2 views each).
      num_epochs: training length in epochs of the train split, used when num_steps is 0.
      num_steps: training length in steps; > 0 wins over num_epochs.
      num_devices: local devices to train on; None takes all of them.
      distributed: True joins a multi-process run (as HSCL_DISTRIBUTED=1 does).
      parallelism: how the step maps over the devices: mesh (jax.jit of jax.shard_map over a
        Mesh of every device) | pmap (jax.pmap).
      log_every_steps: steps between logged means of the step metrics.
      eval_every_steps: steps between kNN evaluations; 0 evaluates only at the end.
      checkpoint_every_steps: steps between checkpoints (the last step is always saved).
      keep_checkpoints: newest checkpoints kept; older ones are deleted.
      skip_nonfinite_steps: True skips a step whose loss or gradient is not finite; False stops.
    """
    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "global_batch_size": 256,
            "num_epochs": 200,
            "num_steps": 0,
            "num_devices": config_dict.placeholder(int),
            "distributed": False,
            "parallelism": "mesh",
            "log_every_steps": 50,
            "eval_every_steps": 0,
            "checkpoint_every_steps": 1000,
            "keep_checkpoints": 3,
            "skip_nonfinite_steps": False,
        }
    )


def model_config() -> ml_collections.ConfigDict:
    """config.model: the encoder and projection head (hscl_jax.models).

    Fields:
      name: the encoder: small_cnn | resnet18 | resnet50.
      width: channels of the first stage; None takes the named model's reference width.
      stage_sizes: blocks per ResNet stage; None takes the named depth's.
      stem: ResNet input stem: cifar (3x3 convolution) | imagenet (7x7 stride 2 + max-pool).
      head_hidden_dim: hidden width of the projection head.
      projection_dim: dimension of the projections the loss compares.
      dtype: compute dtype, float32 | bfloat16 (parameters stay float32).
    """
    return ml_collections.ConfigDict(
        {
            "name": "resnet50",
            "width": config_dict.placeholder(int),
            "stage_sizes": config_dict.placeholder(tuple),
            "stem": "cifar",
            "head_hidden_dim": 512,
            "projection_dim": 128,
            "dtype": "float32",
        }
    )


def loss_config() -> ml_collections.ConfigDict:
    """config.loss: the loss and the options of every loss; only those the named loss takes are
    passed to it (hscl_jax.losses), so a baseline is one --config.loss.name away.

    Fields:
      name: the loss: ucl | scl | hucl | hscl | supcon.
      temperature: the temperature t dividing the cosine similarities.
      beta: hardening concentration of hscl and hucl (not passed with hardening topk).
      positives: supervised losses' positives: all (every same-label view) | partner.
      detach_weights: True stops gradients through the hardening weights.
      tau_plus: hucl's class-prior correction (0: none).
      clamp: hucl: clamp the negatives' estimate at its theoretical minimum.
      block_size: anchors per block of the blocked computation; None computes it dense.
      hardening: the weight of a negative in hscl and hucl: exp | topk | poly.
      top_k: k of hardening topk (the hardest k negatives per anchor).
    """
    return ml_collections.ConfigDict(
        {
            "name": "hscl",
            "temperature": 0.5,
            "beta": 1.0,
            "positives": "all",
            "detach_weights": False,
            "tau_plus": 0.0,
            "clamp": False,
            "block_size": config_dict.placeholder(int),
            "hardening": "exp",
            "top_k": config_dict.placeholder(int),
        }
    )


def optim_config() -> ml_collections.ConfigDict:
    """config.optim: the optimiser and learning-rate schedule (hscl_jax.optim).

    Fields:
      name: adam (L2 decay added to the gradient, the reference) | adamw | sgd | lars.
      learning_rate: peak learning rate.
      weight_decay: decay rate (L2 added to the gradient for adam and sgd).
      weight_decay_on_bn_and_bias: False decays (and LARS-scales) kernels only.
      schedule: constant | warmup_cosine.
      warmup_steps: steps of linear warm-up from 0.
      final_lr_fraction: warmup_cosine's final learning rate as a fraction of the peak.
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      eps: Adam's epsilon.
      momentum: momentum of sgd and lars.
      nesterov: Nesterov momentum for sgd and lars.
      trust_coefficient: LARS's trust coefficient.
    """
    return ml_collections.ConfigDict(
        {
            "name": "adam",
            "learning_rate": 1e-3,
            "weight_decay": 1e-6,
            "weight_decay_on_bn_and_bias": True,
            "schedule": "constant",
            "warmup_steps": 0,
            "final_lr_fraction": 0.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "momentum": 0.9,
            "nesterov": False,
            "trust_coefficient": 0.001,
        }
    )


def knn_config() -> ml_collections.ConfigDict:
    """config.knn: the weighted-kNN monitor (hscl_jax.evaluate).

    Fields:
      k: neighbours that vote for a test example's class.
      temperature: a neighbour's vote is exp(cosine / temperature).
      eval_batch_size: global batch size of the feature passes.
      test_chunk_size: test examples compared with the bank at once (bounds memory).
    """
    return ml_collections.ConfigDict(
        {"k": 200, "temperature": 0.5, "eval_batch_size": 512, "test_chunk_size": 1024}
    )


def theory_config() -> ml_collections.ConfigDict:
    """config.theory: the train-time theory monitor (hscl_jax.theory.theory_metrics on every
    step's projections, logged with the step metrics and as epoch means).

    Fields:
      enabled: True compiles the monitor into the step; False leaves it out.
      beta: the monitor's beta; None follows config.loss.beta (1.0 for a loss without beta).
      temperature: the monitor's temperature; None follows config.loss.temperature.
      reference_size: > 0 (with enabled) logs the H-SCL loss of a fixed batch against this many
        training examples and growing parts of the queue at every logging step; 0 is off.
    """
    return ml_collections.ConfigDict(
        {
            "enabled": False,
            "beta": config_dict.placeholder(float),
            "temperature": config_dict.placeholder(float),
            "reference_size": 0,
        }
    )


def queue_config() -> ml_collections.ConfigDict:
    """config.queue: a labelled queue of negatives beyond the batch (keys of a momentum encoder).

    Fields:
      size: keys in the queue; 0 turns it off (step, state and checkpoints as without one).
      momentum: EMA rate of the momentum encoder's parameters and BatchNorm statistics, in [0, 1).
      as_positives: supervised losses: same-label queue keys are positives too.
      q: the tilted losses' Q: fixed (2B - 2, as without a queue) | grows (counts filled keys).
    """
    return ml_collections.ConfigDict(
        {"size": 0, "momentum": 0.99, "as_positives": False, "q": "fixed"}
    )


# The sections built here, by name; config.data is hscl_jax.data.default_data_config(dataset).
SECTIONS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "model": model_config,
    "loss": loss_config,
    "optim": optim_config,
    "knn": knn_config,
    "theory": theory_config,
    "queue": queue_config,
}


def base_config(dataset: str = "cifar10") -> ml_collections.ConfigDict:
    """The full config schema with the reference recipe's values (configs/ start from here):
    ResNet-50, Adam 1e-3 with L2 1e-6 added to the gradient, batch 256, t 0.5, 200 epochs, H-SCL
    beta 1. ``dataset`` picks ``config.data``. Every field can be overridden on the command line,
    e.g. ``--config.loss.beta=5``; ``python -m hscl_jax.config --list`` describes them all."""
    config = run_fields()
    for name, build in SECTIONS.items():
        config[name] = build()
    config.data = data.default_data_config(dataset)
    return config


# ----------------------------------------------------------------------------- field help


def _help_sources() -> dict[str, Callable[..., ml_collections.ConfigDict]]:
    """The function whose docstring documents each section ("" is the top level)."""
    return {
        "": run_fields,
        **SECTIONS,
        "data": data.default_data_config,
        "data.augmentation": data.augmentation_config,
    }


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?\.)(\s+[A-Z(\"]|$)", text)
    return match.group(1) if match else text


def documented_fields(function: Callable[..., object]) -> dict[str, str]:
    """``{field: help}`` from the ``Fields:`` block of ``function``'s docstring: an entry is
    ``name: text`` at the block's indentation, continued by more deeply indented lines."""
    lines = (inspect.getdoc(function) or "").splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"Fields\b.*:$", line)), None)
    entries: dict[str, str] = {}
    if start is None:
        return entries
    indent, name = None, None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent or depth == 0:
            break
        entry = re.match(r"(\w+): (.*)", line.strip())
        if depth == indent and entry:
            name = entry.group(1)
            entries[name] = entry.group(2)
        elif name is not None:
            entries[name] += " " + line.strip()
    return entries


def field_help(config: ml_collections.ConfigDict) -> dict[str, str]:
    """``{dotted field: one line of help}`` for every leaf field of ``config``.

    A field's help is its entry in its section's ``Fields:`` block; a field without one (e.g. an
    augmentation op's probability) gets the entry of the field whose text names it. A field no
    schema function documents (a section a config file adds, like ``sweep``) says so.
    """
    sources = _help_sources()
    helps = {}
    for path in _leaf_paths(config):
        section, _, field = path.rpartition(".")
        entries = documented_fields(sources[section]) if section in sources else {}
        if field in entries:
            helps[path] = _first_sentence(entries[field])
            continue
        naming = [k for k, text in entries.items() if re.search(rf"\b{field}\b", text)]
        if naming:
            helps[path] = f"see {naming[0]}: {_first_sentence(entries[naming[0]])}"
        else:
            helps[path] = "not in the schema: set by the config file for the tool it is made for"
    return helps


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            paths += _leaf_paths(value, f"{prefix}{key}.")
        else:
            paths.append(prefix + key)
    return paths


def list_fields(config: ml_collections.ConfigDict) -> list[str]:
    """One line per leaf field: ``config.<field> = <value>  # <help>``."""
    lines = []
    for path, text in field_help(config).items():
        value = config
        for part in path.split("."):
            value = value[part]
        lines.append(f"config.{path} = {value!r}  # {text}")
    return lines
