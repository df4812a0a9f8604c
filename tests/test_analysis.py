"""Tests for hscl_jax.analysis: theory_train.csv from train-time records, theory.csv, the beta
sweep and embeddings over a run's checkpoints, the plots, the CLI's exit status."""

import csv
import json
import os

import chex
import jax
import numpy as np
import pytest

from hscl_jax import analysis, metrics, theory

# ----------------------------------------------------------------------------- command line


def _theory_record(step, **overrides):
    record = {
        "step": step,
        "hscl": 3.0,
        "hucl": 3.1,
        "scl": 2.5,
        "ucl": 2.6,
        "assumption_fraction": 0.75,
        "assumption_log_ratio": 0.2,
        "assumption_num_anchors": 16.0,
        "hscl_le_hucl": 1.0,
        "scl_le_ucl": 1.0,
        "ucl_lt_hscl": 0.0,
    }
    record.update(overrides)
    return record


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_cli_turns_train_time_metrics_into_csv_and_plots(tmp_path, capsys):
    records = [
        {"step": 1, "loss": 3.6, "grad_norm": 1.0},
        _theory_record(2),
        {"step": 2, "knn_top1": 0.2, "knn_top5": 0.6},
        _theory_record(4, hscl=2.8, assumption_fraction=0.5),
        # The trainer's epoch-mean record repeats the steps above: not a row of its own.
        _theory_record(4, epoch=1.0, hscl=2.9),
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    assert analysis.main([f"--workdir={tmp_path}", "--beta=1.0", "--temperature=0.5"]) == 0
    rows = _read_csv(tmp_path / metrics.THEORY_TRAIN_CSV)
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert list(rows[0]) == list(analysis.THEORY_COLUMNS)
    assert float(rows[1]["hscl"]) == 2.8 and float(rows[1]["assumption_fraction"]) == 0.5
    assert float(rows[0]["beta"]) == 1.0 and rows[0]["epoch"] == ""
    for name in ("training_curves", "theory_train_losses", "theory_train_assumption"):
        assert _is_png(tmp_path / f"{name}.png"), name
    assert not (tmp_path / metrics.THEORY_CSV).exists()
    # A directory with nothing to analyse: exit status 1 and one line saying why.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert analysis.main([f"--workdir={empty}"]) == 1
    assert "nothing to analyse" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_over_checkpoints_of_a_tiny_run(tmp_path):
    import optax

    from hscl_jax import checkpoints, data, models
    from hscl_jax import config as config_lib
    from hscl_jax import step as step_lib

    config = config_lib.base_config("synthetic")
    config.model.name = "small_cnn"
    config.model.width = 2
    config.model.head_hidden_dim = 8
    config.model.projection_dim = 4
    config.global_batch_size = 8
    config.loss.beta = 2.0
    config.knn.eval_batch_size = 32
    workdir = str(tmp_path)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(json.loads(json.dumps(config.to_dict(), default=str)), f)
    model = models.model_from_config(config.model)
    state = step_lib.create_train_state(jax.random.key(0), model, optax.sgd(0.1), (32, 32, 3))
    # Checkpoints written by the trainer's own writer, so the layout read is the one it writes.
    manager = checkpoints.checkpoint_manager(workdir, 3)
    for step, scale in ((2, 1.0), (4, 1.5)):
        host = jax.device_get(state.to_dict())
        host["params"] = jax.tree.map(lambda p, s=scale: p * s, host["params"])
        host["step"] = np.int32(step)
        checkpoints.save_checkpoint(manager, step, host, {"step": step, "config": {}})
    manager.wait_until_finished()
    manager.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 4, "loss": 3.0}) + "\n")

    argv = [f"--workdir={workdir}", "--num_batches=1", "--betas=0,1,10", "--max_embeddings=40"]
    assert analysis.main(argv) == 0

    rows = _read_csv(os.path.join(workdir, metrics.THEORY_CSV))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert list(rows[0]) == list(analysis.THEORY_COLUMNS)
    assert float(rows[0]["beta"]) == 2.0 and int(rows[0]["num_batches"]) == 1
    assert float(rows[0]["epoch"]) == 2 / data.steps_per_epoch(config.data, 8)
    assert rows[0]["hscl"] != rows[1]["hscl"]
    # The step-2 row is the monitor on the run's first training batch, embedded as in training.
    batch = next(data.train_iterator(config.data, global_batch_size=8, seed=0, num_local_devices=1))
    views = data.augment_views(batch, data.augmentation_for(config.data))
    variables = checkpoints.restore_variables(workdir, 2)
    images = np.concatenate([np.asarray(view[0]) for view in views])
    (_, z), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    expected = theory.theory_metrics(z[:8], z[8:], batch["label"][0], beta=2.0)
    for key in theory.THEORY_KEYS:
        np.testing.assert_allclose(
            float(rows[0][key]), expected[key], rtol=1e-4, atol=1e-6, err_msg=key
        )

    sweep = _read_csv(os.path.join(workdir, metrics.BETA_SWEEP_CSV))
    assert [float(r["beta"]) for r in sweep] == [0.0, 1.0, 10.0]
    assert {int(r["step"]) for r in sweep} == {4}
    with np.load(os.path.join(workdir, metrics.EMBEDDINGS_NPZ)) as arrays:
        chex.assert_shape(arrays["features"], (40, 8))
        chex.assert_shape(arrays["labels"], (40,))
    for name in ("training_curves", "theory_losses", "theory_assumption", "beta_sweep"):
        assert _is_png(os.path.join(workdir, f"{name}.png")), name
    assert _is_png(os.path.join(workdir, "embeddings_pca.png"))
    assert not os.path.exists(os.path.join(workdir, metrics.THEORY_TRAIN_CSV))
