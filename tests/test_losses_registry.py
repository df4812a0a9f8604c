"""Tests of the losses by name: dispatch, options, and the loss section of a training config."""

import logging

import ml_collections
import pytest

from hscl_jax import losses


def _loss_config(**fields):
    config = ml_collections.ConfigDict(
        {
            "name": "hscl",
            "temperature": 0.5,
            "beta": 1.0,
            "positives": "all",
            "detach_weights": False,
            "tau_plus": 0.0,
            "clamp": False,
            "block_size": None,
            "hardening": "exp",
            "top_k": None,
        }
    )
    config.update(fields)
    return config


def test_supervised_losses_are_the_label_taking_losses():
    assert losses.SUPERVISED_LOSSES == tuple(n for n in losses.LOSS_NAMES if losses.takes_labels(n))
    assert set(losses.SUPERVISED_LOSSES) == {"scl", "hscl", "supcon"}


def test_options_from_config_pass_only_what_the_loss_takes():
    assert losses.options_from_config(_loss_config(name="ucl")) == {"temperature": 0.5}
    assert losses.options_from_config(_loss_config(name="hucl", block_size=64)) == {
        "temperature": 0.5,
        "beta": 1.0,
        "tau_plus": 0.0,
        "clamp": False,
        "block_size": 64,
        "hardening": "exp",
    }
    # "topk" takes no beta: the config's beta is not passed with it.
    options = losses.options_from_config(_loss_config(hardening="topk", top_k=8))
    assert options["top_k"] == 8 and "beta" not in options
    losses.check_config(_loss_config(hardening="topk", top_k=8))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"name": "nce"}, r"^config.loss.name='nce' is unknown; allowed: ucl, scl, hucl, hscl"),
        ({"beta": -1.0}, r"^config.loss: beta must be .*>= 0.*-1.0"),
        ({"hardening": "topk"}, r"^config.loss: top_k must be a positive integer"),
        ({"positives": "some"}, r"^config.loss: positives must be one of"),
    ],
)
def test_check_config_raises_one_line(fields, match):
    with pytest.raises(ValueError, match=match) as error:
        losses.check_config(_loss_config(**fields))
    assert "\n" not in str(error.value)


def test_check_config_warns_above_the_float32_beta_limit(caplog):
    with caplog.at_level(logging.WARNING):
        losses.check_config(_loss_config(temperature=0.1, beta=1.0))
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        losses.check_config(_loss_config(temperature=0.1, beta=1e4))  # a warning, not a refusal
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "config.loss.beta=10000.0 is above 300, the largest beta at which float32 gradients of "
        "'hscl' were measured within 0.001 of float64 at temperature 0.1"
    )
    assert not losses.warn_above_float32_beta_limit(_loss_config(name="scl", beta=1e4))
