"""Two processes x 4 devices (python -m hscl_jax.launch, gloo on CPU) against one process x 8
devices: the same run, read, evaluated and checkpointed as one, on a mesh (the default
parallelism) and once under pmap.

Every run goes through tests/multihost_runner.py, which records what each process read and wrote.
"""

import collections
import glob
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from hscl_jax import checkpoints, data, preemption
from hscl_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "tests", "multihost_runner.py")
NUM_STEPS = 16
GLOBAL_BATCH = 16

_TINY_FLAGS = [
    "--config=configs/default.py",
    "--config.model.width=4",
    "--config.model.head_hidden_dim=16",
    "--config.model.projection_dim=8",
    f"--config.global_batch_size={GLOBAL_BATCH}",
    f"--config.num_steps={NUM_STEPS}",
    "--config.checkpoint_every_steps=4",
    "--config.log_every_steps=4",
    "--config.eval_every_steps=0",
    "--config.knn.k=10",
    "--config.knn.eval_batch_size=256",
]

# One worker runs the whole module, so the two reference runs are made once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]


def _run(workdir, *, processes, env_extra=None, flags=()):
    """train.py through the recording runner on 1 process x 8 devices or 2 x 4 (the default
    parallelism, "mesh", unless ``flags`` say otherwise)."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=REPO,
        HSCL_TEST_RECORDS=f"{workdir}_records",
    )
    env.update(env_extra or {})
    command = [RUNNER, f"--workdir={workdir}", *_TINY_FLAGS, *flags]
    if processes > 1:
        command = [
            "-m",
            "hscl_jax.launch",
            f"--num_processes={processes}",
            f"--devices_per_process={8 // processes}",
            "--",
            *command,
        ]
    return subprocess.run(
        [sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _records(workdir):
    records = {}
    for path in glob.glob(f"{workdir}_records/process_*.json"):
        with open(path) as f:
            records[int(re.search(r"process_(\d+)", path).group(1))] = json.load(f)
    return records


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _restore(workdir, step):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"one": workdir of 1 process x 8 devices, "two": of 2 processes x 4 devices}."""
    root = tmp_path_factory.mktemp("multihost")
    workdirs = {"one": str(root / "one"), "two": str(root / "two")}
    for name, processes in (("one", 1), ("two", 2)):
        result = _run(workdirs[name], processes=processes)
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return workdirs


def test_two_processes_end_with_the_parameters_of_one(runs):
    one, two = _restore(runs["one"], NUM_STEPS), _restore(runs["two"], NUM_STEPS)
    assert int(two["step"]) == NUM_STEPS
    leaves = zip(
        jax.tree_util.tree_leaves_with_path(one),
        jax.tree_util.tree_leaves_with_path(two),
        strict=True,
    )
    for (path, expected), (_, actual) in leaves:
        np.testing.assert_allclose(
            actual, expected, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )


def test_two_processes_under_pmap_end_with_the_parameters_of_one_on_a_mesh(runs, tmp_path):
    workdir = str(tmp_path / "pmap")
    result = _run(workdir, processes=2, flags=["--config.parallelism=pmap"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    one, two = _restore(runs["one"], NUM_STEPS), _restore(workdir, NUM_STEPS)
    for expected, actual in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)
    assert _metrics(workdir)[-1]["knn_top1"] == _metrics(runs["one"])[-1]["knn_top1"]


def test_the_logged_metrics_and_knn_accuracy_match_one_process(runs):
    one, two = _metrics(runs["one"]), _metrics(runs["two"])
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for expected, actual in zip(one, two, strict=True):
        for key in ("loss", "num_anchors", "knn_top1", "knn_top5"):
            if key in expected:
                np.testing.assert_allclose(actual[key], expected[key], rtol=1e-4, err_msg=key)
    # The kNN monitor saw every train and test example once, from both processes.
    assert two[-1]["knn_top1"] == one[-1]["knn_top1"]


def test_each_process_reads_only_its_slice_of_every_global_batch(runs):
    records = _records(runs["two"])
    assert sorted(records) == [0, 1]
    config = config_lib.load_config(runs["two"])
    info = data.dataset_info("digits")
    assert config.data.sampler == "shuffle"  # the plan needs no labels
    num_train = len(data.pipeline._open_split(info, config.data, "train")[0])
    indexer = data.samplers.BatchIndexer(
        num_examples=num_train, sampler="shuffle", batch_size=GLOBAL_BATCH, seed=config.data.seed
    )
    half = GLOBAL_BATCH // 2
    for process, record in records.items():
        reads = record["reads"]["train_iterator:train"]
        # Every read is this process's half of one step's global batch (the pipeline reads
        # ahead, so a few steps past the last one are read too), and every step was read.
        steps_read = set()
        for indices in reads:
            step = next(
                s
                for s in range(NUM_STEPS + 64)
                if indexer(s)[process * half : (process + 1) * half].tolist() == indices
            )
            steps_read.add(step)
        assert len(reads) == len(steps_read)
        assert steps_read >= set(range(NUM_STEPS))
    # The kNN monitor's reads: each test example by exactly one process (a process whose slice
    # of the last batch is all padding reads record 0 once more, for the image shape).
    test_reads = [np.concatenate(r["reads"]["eval_iterator:test"]) for r in records.values()]
    num_test = len(data.pipeline._open_split(info, config.data, "test")[0])
    read_once = np.concatenate(test_reads)
    counts = collections.Counter(read_once.tolist())
    assert sorted(counts) == list(range(num_test))
    assert all(count == 1 for index, count in counts.items() if index != 0), counts
    assert counts[0] <= 2


def test_only_process_0_writes_metrics_tensorboard_and_config(runs):
    workdir = os.path.abspath(runs["two"])
    records = _records(runs["two"])

    def written(process):
        return {
            os.path.relpath(p, workdir)
            for p in records[process]["writes"]
            if p.startswith(workdir + os.sep)
        }

    assert {"metrics.jsonl", "config.json", "run.lock"} <= written(0)
    # Every process checks that the workdir is writable (metrics.prepare_workdir) with a file it
    # removes at once, so that a bad workdir stops all of them alike; nothing else.
    assert {name for name in written(1) if not name.startswith(".write_probe_")} == set()
    # TensorBoard event files carry the writer's pid in their name.
    (events,) = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert events.endswith(f".{records[0]['pid']}.0")


def test_a_kill_then_sigterm_to_one_process_stop_both_and_each_resume_is_exact(runs, tmp_path):
    """SIGKILL to both processes right after the step-8 save started, then a run resumed from
    its last checkpoint that gets SIGTERM in process 1 only, then the rest: both processes save,
    restore and stop at the same step, and the run ends bit-identical to an uninterrupted one."""
    workdir = str(tmp_path / "interrupted")
    kill_at = 8  # a checkpoint step (every 4)
    result = _run(workdir, processes=2, env_extra={"HSCL_TEST_KILL_AT_STEP": str(kill_at)})
    output = result.stdout + result.stderr
    assert result.returncode == 128 + 9, output[-5000:]
    killed_at = checkpoints.checkpoint_steps(workdir)
    assert killed_at in ([4], [4, 8]), killed_at  # the step-8 save may be unfinished

    signal_at = 9
    result = _run(
        workdir,
        processes=2,
        env_extra={"HSCL_TEST_SIGTERM_AT_STEP": str(signal_at), "HSCL_TEST_ONLY_PROCESS": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == preemption.EXIT_STATUS, output[-5000:]
    for process in (0, 1):
        resumed = rf"\[{process}\] .*Resumed from checkpoint at step {killed_at[-1]}"
        assert re.search(resumed, output), output[-5000:]
    # JAX's preemption sync picks the first step both can still stop after: the same for both.
    stops = {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(r"\[(\d)\] stopped by SIGTERM after step (\d+): checkpoint", output)
    }
    assert sorted(stops) == [0, 1], output[-5000:]
    assert stops[0] == stops[1] and signal_at <= stops[0] < NUM_STEPS, stops
    assert checkpoints.checkpoint_steps(workdir)[-1] == stops[0]

    result = _run(workdir, processes=2)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert f"Resumed from checkpoint at step {stops[0]}" in output
    expected, actual = _restore(runs["two"], NUM_STEPS), _restore(workdir, NUM_STEPS)
    for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
        np.testing.assert_array_equal(a, e)
