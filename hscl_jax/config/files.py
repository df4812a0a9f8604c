"""Configs on disk: configs/*.py files, command-line override paths, the JSON a run writes, and
:func:`load_config`, the one place where a run's config.json written by an earlier version is
brought up to the schema."""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import ml_collections
from absl import logging

from hscl_jax import data, metrics
from hscl_jax.config.schema import ConfigError, base_config


def config_from_file(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file such as configs/default.py."""
    name = "hscl_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_field_path(config: ml_collections.ConfigDict, dotted: str) -> None:
    """ConfigError naming the first part of ``dotted`` (e.g. "model.widht", from a command-line
    override ``--config.model.widht=8``) that ``config`` does not have, and the fields it has."""
    node, prefix = config, "config"
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"{prefix} is a value, not a section: it has no field {part!r}")
        if prefix == "config.data" and part in data.REMOVED_FIELDS:
            raise ConfigError(data.removed_field_message(part))
        if part not in node:
            raise ConfigError(
                f"unknown config field {prefix}.{part}; {prefix} has: {', '.join(sorted(node))}"
            )
        node, prefix = node[part], f"{prefix}.{part}"


def to_json_ready(config: ml_collections.ConfigDict | dict[str, Any]) -> dict[str, Any]:
    """``config`` as a dict that JSON can hold (tuples become lists, other objects strings)."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else config
    return json.loads(json.dumps(as_dict, default=str))


def _up_to_schema(
    saved: dict[str, Any], schema: dict[str, Any], prefix: str, dropped: list[str]
) -> dict[str, Any]:
    """``saved`` with the fields ``schema`` has and ``saved`` lacks (at their defaults) and without
    those ``schema`` lacks (listed in ``dropped``); a top-level section of the config file's own
    (e.g. ``sweep``) is kept."""
    merged: dict[str, Any] = {}
    for key, default in schema.items():
        value = saved.get(key, default)
        both_sections = isinstance(default, dict) and isinstance(value, dict)
        merged[key] = (
            _up_to_schema(value, default, f"{prefix}{key}.", dropped) if both_sections else value
        )
    for key in saved.keys() - schema.keys():
        if not prefix and isinstance(saved[key], dict):
            merged[key] = saved[key]
        else:
            dropped.append(prefix + key)
    return merged


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with, from ``workdir/config.json`` (without the ``resolved``
    entry the trainer adds there), brought up to this version's schema: sections and fields added
    since the run get their defaults (which keep the behaviour of the version that wrote it), and
    fields the schema no longer has are dropped with one logged line.

    Raises ConfigError (one line naming the file) when it is missing or not a config.
    """
    path = os.path.join(workdir, metrics.CONFIG_JSON)
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist: not a training run directory")
    with open(path) as f:
        text = f.read()
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path} is not valid JSON: {error.msg} (line {error.lineno} column {error.colno} of "
            f"{len(text.splitlines())} lines); the file is damaged or was cut short (a training "
            "run on this workdir writes it again when it starts)"
        ) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict):
        raise ConfigError(f"{path} is not a run's config: it has no 'data' section")
    saved.pop("resolved", None)
    try:
        schema = to_json_ready(base_config(saved["data"].get("name")))
    except ValueError as error:
        raise ConfigError(f"{path}: config.data: {error}") from None
    dropped: list[str] = []
    config = _up_to_schema(saved, schema, "", dropped)
    if dropped:
        why = {f"data.{field}": reason for field, reason in data.REMOVED_FIELDS.items()}
        logging.warning(
            "%s: dropped fields this version no longer has: %s",
            path,
            ", ".join(f"{f} ({why[f]})" if f in why else f for f in sorted(dropped)),
        )
    return ml_collections.ConfigDict(config)


# Config entries that change the sequence of batches or the optimisation; resuming with different
# values cannot reproduce the uninterrupted run, so the run says so.
RESUME_SENSITIVE = ("seed", "global_batch_size", "data", "loss", "optim", "model", "queue")


def resume_mismatches(saved_config: dict[str, Any], config_json: dict[str, Any]) -> list[str]:
    """The RESUME_SENSITIVE entries in which a checkpoint's saved config and this run's differ."""
    return [k for k in RESUME_SENSITIVE if saved_config.get(k) != config_json.get(k)]
