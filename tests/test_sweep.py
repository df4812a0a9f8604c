"""Tests for hscl_jax.sweep: a two-run grid end to end, restart skips finished runs."""

import json

import ml_collections
import pytest

from hscl_jax import config as config_lib
from hscl_jax import sweep, trainer


def _two_run_config(tiny_digits_config):
    config = tiny_digits_config(num_steps=2)
    config.sweep = ml_collections.ConfigDict(
        {"methods": ("scl", "hscl"), "betas": (2.0,), "seeds": (3,)}
    )
    return config


@pytest.mark.slow
def test_two_run_grid_runs_then_skips_finished_runs(tmp_path, monkeypatch, tiny_digits_config):
    workdir = str(tmp_path)
    records = sweep.run_sweep(_two_run_config(tiny_digits_config), workdir)

    with open(f"{workdir}/study.json") as f:
        study = json.load(f)
    assert study == records
    assert [(r["method"], r["beta"], r["seed"]) for r in study] == [
        ("scl", 0.0, 3),
        ("hscl", 2.0, 3),
    ]
    for record in study:
        assert set(record) == {
            "method",
            "beta",
            "seed",
            "queue_size",
            "hardening",
            "knn_top1",
            "knn_top5",
            "linear_top1",
            "wall_s",
        }
        for key in ("knn_top1", "knn_top5", "linear_top1"):
            assert 0.0 <= record[key] <= 1.0
    # Each run trained with its own loss and seed.
    hscl_config = config_lib.load_config(f"{workdir}/runs/hscl_b2_s3")
    assert hscl_config.loss.name == "hscl" and hscl_config.loss.beta == 2.0
    assert hscl_config.seed == 3 and hscl_config.data.seed == 3
    with open(f"{workdir}/study.md") as f:
        markdown = f.read()
    assert "| scl | - | 0 | - | 1 |" in markdown and "| hscl | 2 | 0 | exp | 1 |" in markdown

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(trainer, "train_and_evaluate", must_not_train)
    assert sweep.run_sweep(_two_run_config(tiny_digits_config), workdir) == records


def test_grid_order_and_errors():
    runs = sweep.grid_runs({"methods": ("ucl", "hscl"), "betas": (0.5, 5), "seeds": (0, 1)})
    assert [r.name for r in runs] == [
        "ucl_b0_s0",
        "hscl_b0.5_s0",
        "hscl_b5_s0",
        "ucl_b0_s1",
        "hscl_b0.5_s1",
        "hscl_b5_s1",
    ]
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['nce'\]"):
        sweep.grid_runs({"methods": ("nce",), "betas": (1,), "seeds": (0,)})
    with pytest.raises(ValueError, match="betas must be >= 0"):
        sweep.grid_runs({"methods": ("hscl",), "betas": (-1,), "seeds": (0,)})
    with pytest.raises(ValueError, match=r"queue_sizes must be integers >= 0, got \(0, -4\)"):
        sweep.grid_runs({"methods": ("scl",), "betas": (1,), "seeds": (0,), "queue_sizes": (0, -4)})


def test_queue_and_hardening_grid_and_run_configs(tiny_digits_config):
    grid = {
        "methods": ("scl", "hscl"),
        "betas": (1.0,),
        "seeds": (0,),
        "queue_sizes": (0, 64),
        "hardenings": ("exp", "topk"),
    }
    runs = sweep.grid_runs(grid)
    assert [r.name for r in runs] == [
        "scl_b0_s0",
        "scl_b0_s0_q64",
        "hscl_b1_s0",
        "hscl_b1_s0_q64",
        "hscl_b1_s0_topk",
    ]
    base = tiny_digits_config()
    base.sweep = ml_collections.ConfigDict(
        {**grid, "hardening_options": {"topk": {"temperature": 0.25}}}
    )
    queued = sweep.run_config(base, runs[3])
    assert queued.queue.size == 64 and queued.loss.name == "hscl" and "sweep" not in queued
    assert sweep.run_config(base, runs[2]).queue.size == 0
    hardened = sweep.run_config(base, runs[4])
    assert hardened.loss.hardening == "topk" and hardened.loss.temperature == 0.25
    assert hardened.queue.size == 0


def test_paired_difference_and_markdown():
    records = [
        {
            "method": m,
            "beta": b,
            "seed": s,
            "knn_top1": v,
            "knn_top5": 1.0,
            "linear_top1": v,
            "wall_s": 1.0,
        }
        for m, b, s, v in [
            ("scl", 0.0, 0, 0.90),
            ("scl", 0.0, 1, 0.92),
            ("scl", 0.0, 2, 0.91),
            ("hscl", 1.0, 0, 0.91),
            ("hscl", 1.0, 1, 0.94),
            ("hscl", 1.0, 2, 0.93),
        ]
    ]
    d = sweep.paired_difference(
        records, ("hscl", 1.0, 0, "exp"), ("scl", 0.0, 0, "exp"), "knn_top1"
    )
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.05 / 3)
    assert 0.0 < d["p"] < 1.0
    assert "| hscl - scl (b1, q0) | knn_top1 | 3 | +1.67 |" in sweep.study_markdown(records)
    # Queue and hardening cells are compared with their own baselines, paired over seeds.
    more = [
        dict(r, queue_size=64, knn_top1=r["knn_top1"] + 0.01 * (1 + r["seed"]))
        for r in records
        if r["method"] == "scl"
    ]
    more += [
        dict(r, hardening="topk", knn_top1=r["knn_top1"] - 0.02)
        for r in records
        if r["method"] == "hscl"
    ]
    markdown = sweep.study_markdown(records + more)
    assert "| scl | - | 64 | - | 3 | 93.00 +- 1.73 |" in markdown
    assert "| scl: q64 - q0 | knn_top1 | 3 | +2.00 | 1.00 |" in markdown
    assert "| hscl b1: topk - exp | knn_top1 | 3 | -2.00 | 0.00 |" in markdown
    # H-SCL without a queue is not compared with SCL with one.
    assert "hscl - scl (b1, q64)" not in markdown
