"""End-to-end tests of hscl_jax.trainer and train.py: runs with checkpoints and metrics, the
theory monitor, exact resume after SIGKILL, non-finite steps, bad configs stopping the run at
start, and when the loop logs, evaluates and saves."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from hscl_jax import checkpoints, data, locks, losses, models, theory, trainer
from hscl_jax import config as config_lib
from hscl_jax import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_metrics(workdir):
    """Every record of metrics.jsonl; unlike metrics.read_metrics, a broken line fails the test."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _checkpoint_steps(workdir):
    steps = checkpoints.checkpoint_steps(workdir)
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert steps == sorted(int(n) for n in names if n.isdigit())  # what is on disk
    return steps


def _snapshot(workdir):
    """{path: (mtime, bytes)} of every file below ``workdir`` but the workdir lock (which every
    run takes, writing its own pid into it)."""
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            if path == os.path.join(workdir, locks.WORKDIR_LOCK_NAME):
                continue
            with open(path, "rb") as f:
                files[os.path.relpath(path, workdir)] = (os.stat(path).st_mtime_ns, f.read())
    return files


def _restore_params(workdir, step):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)["params"]


# ----------------------------------------------------------------------------- end to end


def _nan_at_batch(bad_index, monkeypatch):
    """Makes the training stream's batch ``bad_index`` (consumed by step bad_index + 1) NaN."""
    real_iterator = data.train_iterator

    def poisoned(*args, start_step=0, **kwargs):
        for index, batch in enumerate(real_iterator(*args, start_step=start_step, **kwargs)):
            if start_step + index == bad_index:  # NaN crop boxes
                boxes = np.full_like(batch["view1_params"]["boxes"], np.nan)
                batch = dict(batch, view1_params=dict(batch["view1_params"], boxes=boxes))
            yield batch

    monkeypatch.setattr(data, "train_iterator", poisoned)


def test_digits_run_outputs_nonfinite_handling_and_resume(
    tmp_path, monkeypatch, tiny_digits_config
):
    workdir = str(tmp_path / "run")
    # Run 1: 4 steps, kNN every 2, a NaN batch at step 3 that the config says to skip.
    _nan_at_batch(2, monkeypatch)
    config = tiny_digits_config(eval_every_steps=2, skip_nonfinite_steps=True)
    final = trainer.train_and_evaluate(config, workdir)

    records = _read_metrics(workdir)
    train_records = [r for r in records if "loss" in r]
    knn_records = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in train_records] == [2, 4]
    assert [r["step"] for r in knn_records] == [2, 4]
    for key in (
        "loss",
        "num_anchors",
        "mean_pos_cos",
        "mean_neg_cos",
        "effective_negatives",
        "learning_rate",
        "steps_per_sec",
        "grad_norm",
    ):
        assert np.isfinite(train_records[-1][key]), key
    assert train_records[-1]["num_anchors"] == 32  # 16 images x 2 views, all valid
    assert not set(theory.THEORY_KEYS) & set(train_records[-1])  # the monitor is off by default
    assert not any("epoch" in r for r in records)
    assert train_records[-1]["learning_rate"] == pytest.approx(1e-3)
    assert [r["skipped_steps"] for r in train_records] == [0, 1]
    for record in knn_records:
        assert 0.0 <= record["knn_top1"] <= record["knn_top5"] <= 1.0
    assert final["knn_top1"] == knn_records[-1]["knn_top1"]
    assert _checkpoint_steps(workdir) == [2, 4]
    params = _restore_params(workdir, 4)
    assert params["encoder"]["conv1"]["kernel"].shape == (3, 3, 1, 4)
    variables = checkpoints.restore_variables(workdir)  # the latest: step 4
    chex.assert_trees_all_equal(variables["params"], params)
    assert variables["batch_stats"]["encoder"]["bn1"]["mean"].shape == (4,)
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))

    with open(os.path.join(workdir, "config.json")) as f:
        resolved = json.load(f)
    assert resolved["loss"]["name"] == "hscl" and resolved["resolved"]["total_steps"] == 4
    assert resolved["resolved"]["per_device_batch_size"] == 16
    assert resolved["resolved"]["theory_options"] is None
    saved = config_lib.load_config(workdir)
    assert "resolved" not in saved and saved.loss.name == "hscl" and saved.num_steps == 4

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (events_file,) = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    tags = {
        value.tag for event in EventFileLoader(events_file).Load() for value in event.summary.value
    }
    assert {"loss", "knn_top1", "effective_negatives", "learning_rate"} <= tags

    # Rerunning the finished run trains nothing, reports the final accuracy again and adds no
    # record to metrics.jsonl: a second record would duplicate it.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = f.read()
    again = trainer.train_and_evaluate(config, workdir)
    assert again["knn_top1"] == final["knn_top1"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert f.read() == logged

    # Run 2, same workdir, longer budget: resumes at step 4; a NaN at step 6 now stops the run
    # before the step-6 checkpoint, keeping step 4's.
    _nan_at_batch(5, monkeypatch)
    config = tiny_digits_config(num_steps=8)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 6.*step 4"):
        trainer.train_and_evaluate(config, workdir)
    assert [r["step"] for r in _read_metrics(workdir) if "loss" in r] == [2, 4]
    assert _checkpoint_steps(workdir) == [2, 4]

    # Run 3: a config whose model does not match the checkpoint stops with one clear line, and
    # leaves every file of the run as it was; config.json is not rewritten.
    before = _snapshot(workdir)
    config.model.width = 8
    with pytest.raises(
        config_lib.ConfigError,
        match=r"checkpoint step 4 .* has shape \(4,\) but this config needs \(8,\)",
    ):
        trainer.train_and_evaluate(config, workdir)
    assert _snapshot(workdir) == before
    assert config_lib.load_config(workdir).model.width == 4


@pytest.mark.slow
def test_checkpoints_restore_under_the_other_parallelism(tmp_path, tiny_digits_config):
    """A pmap run's checkpoint resumed on a mesh ends where the pmap run ended (to float32
    rounding: the two compile different programs); the mesh's final checkpoint, restored under
    pmap, gives the mesh run's kNN accuracy. Two devices each; the kNN monitor runs under both."""

    def config(parallelism):
        c = tiny_digits_config(num_devices=2, eval_every_steps=2)
        c.parallelism = parallelism
        return c

    pmap_dir, mesh_dir = str(tmp_path / "pmap"), str(tmp_path / "mesh")
    pmap_final = trainer.train_and_evaluate(config("pmap"), pmap_dir)
    assert _checkpoint_steps(pmap_dir) == [2, 4]
    shutil.copytree(pmap_dir, mesh_dir)
    shutil.rmtree(os.path.join(mesh_dir, "checkpoints", "4"))
    mesh_final = trainer.train_and_evaluate(config("mesh"), mesh_dir)  # resumes from step 2
    assert [r["step"] for r in _read_metrics(mesh_dir) if "knn_top1" in r] == [2, 4]
    chex.assert_trees_all_close(
        _restore_params(mesh_dir, 4), _restore_params(pmap_dir, 4), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(mesh_final["loss"], pmap_final["loss"], rtol=1e-4)
    # Nothing left to train: the pmap trainer restores the mesh's step 4 and reports its kNN.
    again = trainer.train_and_evaluate(config("pmap"), mesh_dir)
    assert again["knn_top1"] == mesh_final["knn_top1"]
    assert again["knn_top5"] == mesh_final["knn_top5"]


@pytest.mark.slow
def test_theory_monitor_logs_the_four_losses_per_step_and_per_epoch(
    tmp_path, monkeypatch, tiny_digits_config
):
    workdir = str(tmp_path / "theory")
    # Keep the initial state and the first training batch the run itself uses.
    seen = {}
    real_iterator, real_create = data.train_iterator, step_lib.create_train_state

    def recording_iterator(*args, **kwargs):
        for batch in real_iterator(*args, **kwargs):
            seen.setdefault("batch", jax.tree.map(np.array, batch))
            yield batch

    def recording_create(*args, **kwargs):
        state = real_create(*args, **kwargs)
        seen["state"] = jax.device_get(state)
        return state

    monkeypatch.setattr(data, "train_iterator", recording_iterator)
    monkeypatch.setattr(step_lib, "create_train_state", recording_create)
    config = tiny_digits_config(global_batch_size=256, log_every_steps=1)
    steps_per_epoch = data.steps_per_epoch(config.data, 256)
    assert steps_per_epoch == 5
    config.num_steps = steps_per_epoch + 1
    config.checkpoint_every_steps = 100
    config.theory.enabled = True
    config.loss.beta = 2.0  # the monitor follows the loss's beta and temperature
    config.loss.temperature = 0.4
    trainer.train_and_evaluate(config, workdir)

    records = _read_metrics(workdir)
    step_records = [r for r in records if "loss" in r]
    epoch_records = [r for r in records if "epoch" in r]
    assert [r["step"] for r in step_records] == [1, 2, 3, 4, 5, 6]
    for record in step_records:
        assert set(theory.THEORY_KEYS) <= set(record)
        assert 0.0 <= record["assumption_fraction"] <= 1.0
        assert record["assumption_num_anchors"] > 0
    assert [(r["step"], r["epoch"]) for r in epoch_records] == [(5, 1.0)]
    assert set(epoch_records[0]) == {"step", "epoch", *theory.THEORY_KEYS}
    for key in theory.THEORY_KEYS:
        values = [r[key] for r in step_records[:steps_per_epoch]]
        np.testing.assert_allclose(epoch_records[0][key], np.mean(values), rtol=1e-6, err_msg=key)
    assert len({r["hscl"] for r in step_records}) == 6  # a value per batch, not a constant
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["resolved"]["theory_options"] == {"beta": 2.0, "temperature": 0.4}

    # Step 1's values equal direct calls on the projections, under the initial parameters, of
    # the run's first batch.
    first = step_records[0]
    state, batch = seen["state"], seen["batch"]
    model = models.model_from_config(config.model)
    views = data.augment_views(batch, data.augmentation_for(config.data))
    images = np.concatenate([np.asarray(view[0]) for view in views])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    project = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0][1])
    z = project(variables, images)
    z1, z2, labels = z[:256], z[256:], batch["label"][0]
    options = {"temperature": 0.4}
    direct = {
        "hscl": losses.hscl(z1, z2, labels, beta=2.0, positives="partner", **options),
        "hucl": losses.hucl(z1, z2, beta=2.0, tau_plus=0.0, clamp=False, **options),
        "scl": losses.scl(z1, z2, labels, positives="partner", **options),
        "ucl": losses.ucl(z1, z2, **options),
    }
    direct.update(theory.assumption1(z1, z2, labels, beta=2.0, **options))
    for key, value in direct.items():
        np.testing.assert_allclose(first[key], value, rtol=2e-5, err_msg=key)
    assert first["hscl_le_hucl"] == float(direct["hscl"] <= direct["hucl"])
    assert first["ucl_lt_hscl"] == float(direct["ucl"] < direct["hscl"])
    # The training loss (all same-label positives) is not the monitor's partner-positive H-SCL.
    training_loss = losses.hscl(z1, z2, labels, beta=2.0, **options)
    np.testing.assert_allclose(first["loss"], training_loss, rtol=2e-5)
    assert abs(first["loss"] - first["hscl"]) > 1e-3


@pytest.mark.slow
def test_mock_cifar10_tiny_resnet_run(tmp_path):
    import tensorflow_datasets as tfds

    config = config_lib.base_config("cifar10")
    config.model.name = "resnet18"
    config.model.width = 2
    config.model.stage_sizes = (1, 1)
    config.model.head_hidden_dim = 8
    config.model.projection_dim = 4
    config.global_batch_size = 8
    config.num_steps = 2
    config.num_devices = 1
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.knn.k = 5
    config.knn.eval_batch_size = 16
    workdir = str(tmp_path / "cifar")
    with tfds.testing.mock_data(num_examples=24):
        final = trainer.train_and_evaluate(config, workdir)
    records = _read_metrics(workdir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert 0.0 <= final["knn_top1"] <= 1.0
    assert _checkpoint_steps(workdir) == [2]
    params = _restore_params(workdir, 2)
    assert params["encoder"]["stem_conv"]["kernel"].shape == (3, 3, 3, 2)


@pytest.mark.slow
def test_mock_imagenette_tiny_resnet_run(tmp_path, monkeypatch, repo_root):
    """configs/imagenette.py end to end on mock data: images of varying size decoded on the host,
    ImageNet stem, LARS + warm-up cosine. Only the sizes shrink (256 -> 32 px stored, 224 -> 24 px
    crops) so that it runs in seconds."""
    import dataclasses

    import tensorflow_datasets as tfds

    from hscl_jax.data import info as info_lib

    tiny = dataclasses.replace(info_lib.dataset_info("imagenette"), image_size=32, crop_size=24)
    monkeypatch.setitem(info_lib._DATASETS, "imagenette", tiny)
    config = config_lib.config_from_file(os.path.join(repo_root, "configs", "imagenette.py"))
    assert (config.model.stem, config.optim.name) == ("imagenet", "lars")
    config.model.name = "resnet18"
    config.model.width = 2
    config.model.stage_sizes = (1, 1)
    config.model.head_hidden_dim = 8
    config.model.projection_dim = 4
    config.model.dtype = "float32"
    config.global_batch_size = 8
    config.num_epochs = 0
    config.num_steps = 2
    config.num_devices = 1
    config.optim.warmup_steps = 1
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 2
    config.data.eval_image_size = 24
    config.knn.k = 5
    config.knn.eval_batch_size = 16
    workdir = str(tmp_path / "imagenette")
    with tfds.testing.mock_data(num_examples=24):
        final = trainer.train_and_evaluate(config, workdir)
    records = _read_metrics(workdir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert 0.0 <= final["knn_top1"] <= 1.0
    params = _restore_params(workdir, 2)
    assert params["encoder"]["stem_conv"]["kernel"].shape == (7, 7, 3, 2)


def test_imagenet_not_prepared_names_the_manual_download(tmp_path):
    from hscl_jax.data import dataset_info
    from hscl_jax.data.tfds_source import DatasetNotPreparedError, open_split

    with pytest.raises(DatasetNotPreparedError) as error:
        open_split(dataset_info("imagenet2012"), str(tmp_path), "train")
    message = str(error.value)
    assert "\n" not in message
    assert f"{tmp_path}/downloads/manual/" in message and "ILSVRC2012_img_train.tar" in message
    assert f"tfds build imagenet2012 --data_dir={tmp_path} --file_format=array_record" in message


# ----------------------------------------------------------------------------- train.py


_TINY_FLAGS = [
    "--config.num_devices=2",
    "--config.model.width=4",
    "--config.model.head_hidden_dim=16",
    "--config.model.projection_dim=8",
    "--config.global_batch_size=16",
    "--config.num_steps=8",
    "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=2",
    "--config.knn.k=10",
]

# Runs train.py in this process but SIGKILLs it right after the checkpoint save of step
# HSCL_TEST_KILL_AT_STEP has been started (orbax saves asynchronously, so it may be half-written).
_KILLING_RUNNER = """
import os, runpy, signal, sys
from hscl_jax import checkpoints
kill_at = int(os.environ["HSCL_TEST_KILL_AT_STEP"])
save = checkpoints.save_checkpoint
def save_then_die(manager, step, host_state, meta):
    save(manager, step, host_state, meta)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
checkpoints.save_checkpoint = save_then_die
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def _train(workdir, *, kill_at=None, flags=()):
    """train.py on the default config (on a mesh) on 2 devices, with ``flags`` added."""
    command = [sys.executable, "train.py", "--config=configs/default.py", f"--workdir={workdir}"]
    env = dict(os.environ)
    if kill_at is not None:
        command[1:2] = ["-c", _KILLING_RUNNER]
        env["HSCL_TEST_KILL_AT_STEP"] = str(kill_at)
    return subprocess.run(
        command + _TINY_FLAGS + list(flags),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def prepared_folder_flags(tmp_path_factory):
    """configs/default.py's flags for an image folder prepared with hscl_jax.data.prepare."""
    from image_folders import write_image_folder

    from hscl_jax.data import prepare

    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, ("ant", "bee", "cow"), per_class=10, side=12)
    data_dir = tmp_path_factory.mktemp("tfds")
    args = [f"--image_folder={root}", "--name=farm", f"--data_dir={data_dir}", "--workers=1"]
    assert prepare.main(args) == 0
    return ["--config.data.name=farm", f"--config.data.data_dir={data_dir}"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["digits", "prepared image folder"])
def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path, dataset, request):
    flags = [] if dataset == "digits" else request.getfixturevalue("prepared_folder_flags")
    reference_dir = str(tmp_path / "uninterrupted")
    killed_dir = str(tmp_path / "killed")
    result = _train(reference_dir, flags=flags)
    assert result.returncode == 0, result.stderr[-3000:]

    result = _train(killed_dir, kill_at=6, flags=flags)
    assert result.returncode == -9, result.stderr[-3000:]
    checkpoints = os.path.join(killed_dir, "checkpoints")
    # Orbax writes "<step>.orbax-checkpoint-tmp" and renames it to "<step>" once complete; the kill
    # right after the step-6 save started normally leaves step 6 unfinished.
    unfinished = os.path.exists(os.path.join(checkpoints, "6.orbax-checkpoint-tmp"))
    assert _checkpoint_steps(killed_dir) == ([2, 4] if unfinished else [2, 4, 6])
    # Also plant an unfinished checkpoint of a later step, whatever the kill left.
    partial = os.path.join(checkpoints, "7.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(checkpoints, "4"), partial)
    shutil.rmtree(os.path.join(partial, "state"))

    result = _train(killed_dir, flags=flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from checkpoint at step {4 if unfinished else 6}" in result.stderr
    # Steps logged by the killed run after its last complete checkpoint are logged once, again.
    assert [r["step"] for r in _read_metrics(killed_dir) if "loss" in r] == [2, 4, 6, 8]

    assert [r["step"] for r in _read_metrics(reference_dir) if "knn_top1" in r] == [8]
    reference = _restore_params(reference_dir, 8)
    resumed = _restore_params(killed_dir, 8)
    for expected, actual in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(actual, expected)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory in which nothing can be created, even by root (chattr +i), else by this user
    (chmod 555); the test is skipped where neither holds."""
    path = tmp_path / "read_only"
    path.mkdir()
    undo = []
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(path)]
    else:
        path.chmod(0o555)
    try:
        (path / "probe").touch()
    except OSError:
        yield path
    else:
        pytest.skip("cannot make a directory read-only here")
    finally:
        if undo:
            subprocess.run(undo, check=True)
        path.chmod(0o755)


def _no_network():
    import socket

    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
    except OSError:
        return True
    return False


_BAD_INPUTS = {
    # case: (flags, what the one line says)
    "unknown loss": (
        ["--config.loss.name=nope"],
        r"config\.loss\.name='nope' is unknown; allowed: ucl, scl, hucl, hscl, supcon$",
    ),
    "unknown key": (["--config.foo=1"], r"unknown config field config\.foo; config has: .*seed"),
    "unknown nested key": (
        ["--config.model.widht=8"],
        r"unknown config field config\.model\.widht; config\.model has: .*width",
    ),
    "no config file": (
        ["--config=configs/nope.py"],
        r"--config=configs/nope\.py is not a file; the recipes are: .*configs/default\.py",
    ),
    "batch of one": (
        ["--config.global_batch_size=1"],
        r"config\.global_batch_size=1 leaves no anchor a negative: loss 'hscl' .* >= 2 images",
    ),
    "remote data_dir": (
        ["--config.data.data_dir=gs://bucket/tensorflow_datasets"],
        r"config\.data\.data_dir='gs://bucket/tensorflow_datasets' cannot be reached: host "
        r"storage\.googleapis\.com does not resolve",
    ),
    "removed field": (
        ["--config.data.augment_on=host"],
        r"config\.data\.augment_on was removed: augmentation always runs in the train step",
    ),
    "workdir is a file": ([], r"workdir '.*' is a file, not a directory"),
    "workdir is a URL": ([], r"workdir 'gs://bucket/run' is a URL; give a local or mounted"),
    "read-only workdir": ([], r"workdir '.*' is not writable \(.*\)"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_train_py_refuses_bad_input_in_one_line(case, tmp_path, request):
    flags, message = _BAD_INPUTS[case]
    workdir = tmp_path / "run"
    if case == "workdir is a file":
        workdir.write_text("not a run")
    if case == "read-only workdir":
        workdir = request.getfixturevalue("read_only_dir") / "run"
    if case == "workdir is a URL":
        workdir = "gs://bucket/run"
    if case == "remote data_dir" and not _no_network():
        pytest.skip("storage.googleapis.com resolves here: the check would pass")
    command = [sys.executable, "train.py", "--config=configs/default.py", f"--workdir={workdir}"]
    command.append("--config.num_devices=1")
    result = subprocess.run(
        command + flags,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert re.match("error: " + message, lines[0]), lines[0]
    if case == "workdir is a URL":
        assert not os.path.exists(os.path.join(REPO, "gs:"))  # no local "gs:" folder either
    elif case not in ("workdir is a file", "read-only workdir"):
        assert not workdir.exists()  # refused before anything was written


def _run_train_py_through(runner: str, flags: list[str]):
    """train.py with ``flags`` on one CPU device, run by the Python source ``runner``."""
    return subprocess.run(
        [sys.executable, "-c", runner, *flags, "--config.num_devices=1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


_WITHOUT_TENSORFLOW = """
import runpy, sys
# Make every TensorFlow import fail, as on a GPU host without TensorFlow installed.
for name in ("tensorflow", "tensorflow_datasets"):
    sys.modules[name] = None
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
assert "tensorflow" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
"""


@pytest.mark.slow
def test_synthetic_config_trains_without_tensorflow(tmp_path):
    workdir = tmp_path / "synthetic"
    flags = [
        "--config=configs/synthetic.py",
        f"--workdir={workdir}",
        "--config.model.name=resnet18",
        "--config.model.width=2",
        "--config.model.stage_sizes=(1,)",
        "--config.model.head_hidden_dim=8",
        "--config.model.projection_dim=4",
        "--config.global_batch_size=8",
        "--config.num_steps=2",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=2",
        "--config.knn.k=5",
    ]
    result = _run_train_py_through(_WITHOUT_TENSORFLOW, flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in _read_metrics(workdir) if "loss" in r] == [1, 2]
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert _checkpoint_steps(workdir) == [2]


_REPORTING_TENSORFLOW = """
import runpy, sys
sys.argv = ["train.py"] + sys.argv[1:]
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    print("tensorflow imported:", "tensorflow" in sys.modules)
"""


@pytest.mark.slow
def test_prepared_digits_never_imports_tensorflow(tmp_path):
    from hscl_jax.data import digits_builder

    data_dir = str(tmp_path / "tfds")
    digits_builder.prepare_digits(data_dir)  # preparing a dataset may use TensorFlow; training not
    workdir = tmp_path / "run"
    flags = [
        "--config=configs/default.py",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *_TINY_FLAGS[:4],
        "--config.num_steps=2",
        "--config.eval_every_steps=2",
    ]
    result = _run_train_py_through(_REPORTING_TENSORFLOW, flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorflow imported: False" in result.stdout, result.stdout[-3000:]
    # TensorBoard events and the kNN monitor were written all the same.
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert [r["step"] for r in _read_metrics(workdir) if "knn_top1" in r] == [2]


# ----------------------------------------------------------------------------- bad configs


def test_no_training_length_is_rejected(tmp_path, tiny_digits_config):
    config = tiny_digits_config(num_steps=0, num_epochs=0)
    with pytest.raises(config_lib.ConfigError, match="num_steps and config.num_epochs are both 0"):
        trainer.train_and_evaluate(config, str(tmp_path / "none"))
    assert not os.path.exists(tmp_path / "none")


def test_bad_data_config_stops_the_run_at_start(tmp_path, tiny_digits_config):
    config = tiny_digits_config()
    config.data.sampler = "round_robin"
    with pytest.raises(config_lib.ConfigError, match="^config.data: Unknown sampler 'round_robin'"):
        trainer.train_and_evaluate(config, str(tmp_path / "bad_data"))
    assert not os.path.exists(tmp_path / "bad_data" / "config.json")


def test_due_at_multiples_and_at_the_last_step():
    assert [s for s in range(1, 11) if trainer.due(s, 3, 10)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if trainer.due(s, 0, 10)] == [10]
    assert [s for s in range(1, 5) if trainer.due(s, 1, 4)] == [1, 2, 3, 4]
