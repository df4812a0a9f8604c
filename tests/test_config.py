"""Tests for hscl_jax.config: every bad value is one ConfigError line, the loss's and the theory
monitor's options, every field's help and the listing command, config files, a run's saved config
(and one written by an earlier version) and the resume-mismatch check."""

import glob
import json
import os
import re

import pytest

from hscl_jax import config as config_lib


def _set(config, dotted, value):
    *parents, leaf = dotted.split(".")
    for parent in parents:
        config = config[parent]
    with config.ignore_type():
        config[leaf] = value


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("loss.name", "triplet", "config.loss.name='triplet' is unknown"),
        ("model.name", "vgg", "config.model.name='vgg' is unknown"),
        ("model.dtype", "float16", "model.dtype='float16' is not supported"),
        ("model.width", 0, "model.width=0"),
        ("model.stem", "vit", "model.stem='vit' is unknown; allowed: cifar, imagenet"),
        ("global_batch_size", 12, "global_batch_size=12 is not divisible by the 8 devices"),
        ("global_batch_size", 0, "config.global_batch_size=0 must be a positive integer"),
        ("num_devices", 9, "config.num_devices=9 must be between 1 and the 8 local devices"),
        ("optim.name", "rmsprop", "config.optim.name='rmsprop' is unknown"),
        ("optim.schedule", "step", "config.optim.schedule='step' is unknown"),
        ("optim.learning_rate", 0.0, "config.optim.learning_rate=0.0 must be > 0"),
        ("optim.weight_decay", -1.0, "config.optim.weight_decay=-1.0 must be >= 0"),
        ("optim.warmup_steps", 1.5, "config.optim.warmup_steps=1.5 must be an integer >= 0"),
        ("queue.q", "often", "config.queue.q='often' is unknown; allowed: fixed, grows"),
        ("queue.momentum", 1.0, r"config.queue.momentum=1.0 must be a number in \[0, 1\)"),
        ("loss.beta", -1.0, "config.loss: .*beta"),
        ("loss.positives", "some", "config.loss: .*positives"),
        ("loss.temperature", 0.0, "config.loss: .*temperature"),
        ("num_steps", -5, "config.num_steps=-5 must be an integer >= 0"),
        ("log_every_steps", 0, "config.log_every_steps=0 must be a positive integer"),
        ("checkpoint_every_steps", 0, "config.checkpoint_every_steps=0"),
        ("keep_checkpoints", 0, "config.keep_checkpoints=0 must be a positive integer"),
        ("knn.k", 0, "config.knn.k=0 must be a positive integer"),
        ("knn.eval_batch_size", 100, "eval_batch_size=100 is not divisible by the 8 devices"),
        ("skip_nonfinite_steps", "yes", "skip_nonfinite_steps='yes' must be True or False"),
    ],
)
def test_bad_config_values_are_rejected_with_one_line(field, value, match, tiny_digits_config):
    config = tiny_digits_config(num_devices=None, global_batch_size=16)
    config_lib.validate_config(config)  # the unmodified config is fine on 8 devices
    _set(config, field, value)
    with pytest.raises(config_lib.ConfigError, match=match) as error:
        config_lib.validate_config(config)
    assert "\n" not in str(error.value)


def test_theory_settings_follow_the_loss_and_bad_values_are_rejected(tiny_digits_config):
    config = tiny_digits_config()
    assert config_lib.theory_monitor_options(config) is None
    assert config_lib.theory_hyperparameters(config) == {"beta": 1.0, "temperature": 0.5}
    config.theory.enabled = True
    config.loss.name = "ucl"
    config.loss.beta = 3.0  # ucl takes no beta: the monitor uses 1.0
    assert config_lib.theory_monitor_options(config) == {"beta": 1.0, "temperature": 0.5}
    config.theory.beta = 0.0
    config.theory.temperature = 0.2
    assert config_lib.theory_monitor_options(config) == {"beta": 0.0, "temperature": 0.2}
    config_lib.validate_config(config)
    for field, value, match in (
        ("theory.beta", -1.0, r"config.theory.beta=-1.0 must be None .* >= 0"),
        ("theory.temperature", 0.0, r"config.theory.temperature=0.0 must be None .* > 0"),
        ("theory.enabled", "yes", "config.theory.enabled='yes' must be True or False"),
        ("theory.reference_size", -1, "config.theory.reference_size=-1 must be an integer >= 0"),
    ):
        bad = tiny_digits_config()
        _set(bad, field, value)
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate_config(bad)


def test_every_config_file_loads_and_validates(repo_root):
    paths = sorted(glob.glob(os.path.join(repo_root, "configs", "*.py")))
    assert len(paths) >= 6
    for path in paths:
        config = config_lib.config_from_file(path)
        config.num_devices = 1
        config.global_batch_size = 16
        config.knn.eval_batch_size = 16
        config_lib.validate_config(config)


def test_load_config_and_resume_mismatches(tmp_path, tiny_digits_config):
    config = tiny_digits_config()
    saved = config_lib.to_json_ready(config)
    with pytest.raises(ValueError, match="config.json does not exist: not a training run"):
        config_lib.load_config(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**saved, "resolved": {"total_steps": 4}}, f)
    loaded = config_lib.load_config(str(tmp_path))
    assert "resolved" not in loaded and loaded.to_dict() == config_lib.to_json_ready(config)
    assert config_lib.resume_mismatches(saved, saved) == []
    changed = config_lib.to_json_ready(tiny_digits_config(seed=3))
    changed["model"]["width"] = 8
    changed["log_every_steps"] = 1  # not resume-sensitive
    assert config_lib.resume_mismatches(saved, changed) == ["seed", "model"]


def test_a_batch_without_negatives_is_refused(tiny_digits_config, monkeypatch):
    import dataclasses

    from hscl_jax import data

    for loss, whose in (("ucl", "other images' views;"), ("supcon", "views of other classes")):
        config = tiny_digits_config(global_batch_size=1)
        config.loss.name = loss
        with pytest.raises(
            config_lib.ConfigError, match=f"global_batch_size=1 .*'{loss}'.*{whose}"
        ):
            config_lib.validate_config(config)
    config = tiny_digits_config(global_batch_size=2)
    config_lib.validate_config(config)  # two images may be of two classes
    real_info = data.dataset_info
    monkeypatch.setattr(
        data,
        "dataset_info",
        lambda *args: dataclasses.replace(real_info(*args), num_classes=1),
    )
    with pytest.raises(config_lib.ConfigError, match="has 1 class: supervised loss 'hscl'"):
        config_lib.validate_config(config)
    config.loss.name = "hucl"  # unsupervised: any other image is a negative
    config_lib.validate_config(config)


def test_an_unreachable_remote_data_dir_is_refused_at_once(tiny_digits_config):
    import time

    config = tiny_digits_config()
    # ".invalid" never resolves (RFC 2606), with or without a network.
    config.data.data_dir = "https://tfds.invalid/tensorflow_datasets"
    start = time.time()
    with pytest.raises(
        config_lib.ConfigError,
        match=r"data_dir='https://tfds.invalid/tensorflow_datasets' cannot be reached: host "
        r"tfds.invalid does not resolve",
    ):
        config_lib.validate_config(config)
    assert time.time() - start < 30
    config.data.data_dir = "/a/local/dir"  # left to the pipeline's own message
    config_lib.validate_config(config)


def test_override_paths_name_the_missing_field():
    config = config_lib.base_config("digits")
    config_lib.check_field_path(config, "model.width")
    for dotted, match in (
        ("foo", r"unknown config field config.foo; config has: checkpoint_every_steps, data,"),
        ("model.widht", r"unknown config field config.model.widht; config.model has: dtype,"),
        ("seed.x", r"config.seed is a value, not a section: it has no field 'x'"),
    ):
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.check_field_path(config, dotted)


def test_a_beta_above_the_float32_limit_warns_with_the_measured_limit(tiny_digits_config, caplog):
    import logging

    from hscl_jax import losses

    config = tiny_digits_config()
    config.loss.temperature = 0.1
    limit = losses.float32_beta_limit(0.1)
    assert limit == pytest.approx(300.0)
    config.loss.beta = limit
    with caplog.at_level(logging.WARNING):
        config_lib.validate_config(config)
    assert not caplog.records
    config.loss.beta = 1e4
    with caplog.at_level(logging.WARNING):
        config_lib.validate_config(config)  # a warning, not a refusal
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "config.loss.beta=10000.0 is above 300, the largest beta at which float32 gradients of "
        "'hscl' were measured within 0.001 of float64 at temperature 0.1"
    )
    config.loss.name = "scl"  # takes no beta: nothing to warn about
    assert not losses.warn_above_float32_beta_limit(config.loss)


def _leaf_paths(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_paths(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def test_every_field_has_help_from_its_section_function():
    config = config_lib.base_config()
    helps = config_lib.field_help(config)
    assert sorted(helps) == sorted(_leaf_paths(config.to_dict()))
    for path, text in helps.items():
        assert text and not text.startswith("not in the schema"), path
        if not path.startswith("data."):
            assert not text.startswith("see "), f"{path} has no entry of its own"
    # The sections' docstrings document exactly their fields: no entry outlives its field.
    for build in (config_lib.run_fields, *config_lib.SECTIONS.values()):
        assert set(config_lib.documented_fields(build)) == set(build()), build.__name__
    assert helps["model.width"] == (
        "channels of the first stage; None takes the named model's reference width."
    )


def test_the_list_command_prints_every_field_with_its_value_and_help(repo_root, capsys):
    from hscl_jax.config import __main__ as config_command

    path = os.path.join(repo_root, "configs", "study.py")
    assert config_command.main(["--list", f"--config={path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    config = config_lib.config_from_file(path)
    assert len(lines) == len(config_lib.field_help(config))
    assert (
        "config.model.name = 'small_cnn'  # the encoder: small_cnn | resnet18 | resnet50." in lines
    )
    assert "config.num_steps = 100  # training length in steps; > 0 wins over num_epochs." in lines
    assert any(
        line.startswith("config.sweep.betas = (0.5, 1.0, 5.0)  # not in the schema")
        for line in lines
    )
    assert config_command.main(["--list", "--config=configs/none.py"]) == 1
    assert "error: --config=configs/none.py is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["hscl_jax.evaluate", "hscl_jax.analysis", "hscl_jax.launch"])
def test_every_flag_of_the_argparse_tools_has_help_and_help_exits_0(module, capsys):
    import importlib

    if module == "hscl_jax.analysis":
        pytest.importorskip("matplotlib")  # analysis draws its plots: the [plot] extra
    tool = importlib.import_module(module)
    for action in tool._parser()._actions:
        assert action.help, f"{module}: {action.option_strings} has no help"
    with pytest.raises(SystemExit) as raised:
        tool.main(["--help"])
    assert raised.value.code == 0
    assert "--workdir" in capsys.readouterr().out or module == "hscl_jax.launch"


@pytest.mark.parametrize("command", [["train.py"], ["-m", "hscl_jax.sweep"]])
def test_the_absl_tools_help_exits_0_and_describes_every_flag(repo_root, command):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=repo_root,
        env=dict(os.environ, PYTHONPATH=repo_root),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--config", "--workdir"):
        assert re.search(rf"{flag}: \w", result.stdout), (flag, result.stdout)
    assert "python -m hscl_jax.config --list" in result.stdout


def test_a_config_json_of_an_earlier_version_is_brought_up_to_the_schema(
    tmp_path, tiny_digits_config, caplog
):
    import logging

    config = config_lib.to_json_ready(tiny_digits_config())
    config["sweep"] = {"seeds": [0, 1]}  # a config file's own section is kept
    del config["theory"], config["queue"], config["loss"]["hardening"]  # added since
    config["data"]["shuffle_buffer"] = 1000  # removed since
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**config, "resolved": {"total_steps": 4}}, f)
    with caplog.at_level(logging.WARNING):
        loaded = config_lib.load_config(str(tmp_path))
    expected = config_lib.to_json_ready(tiny_digits_config())
    assert loaded.to_dict() == {**expected, "sweep": {"seeds": [0, 1]}}
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}/config.json: dropped fields this version no longer has: data.shuffle_buffer"
    ]
    assert config_lib.theory_monitor_options(loaded) is None
    assert config_lib.queue_options(loaded) is None
