"""The training loop: :func:`train_and_evaluate` (used by ``train.py``) trains per a config, writing
config.json, metrics.jsonl, TensorBoard events and checkpoints to a run directory, and resumes from
its latest checkpoint.

Its pieces: :func:`setup` (config checks, devices, the mapped step), :func:`open_batches` (the
training stream in the form the step takes), :func:`init_or_restore` (the initial or checkpointed
state, a host tree that either parallelism replicates), and :func:`due`, which decides when to
log, evaluate and save. The step metrics and the theory monitor's reference view live in
hscl_jax.monitors; the config, step, checkpoints, metrics and evaluation in their own modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
from absl import logging

from hscl_jax import (
    checkpoints,
    data,
    distributed,
    evaluate,
    features,
    locks,
    metrics,
    models,
    monitors,
    preemption,
)
from hscl_jax import config as config_lib
from hscl_jax import step as step_lib

if TYPE_CHECKING:
    import orbax.checkpoint as ocp


def due(step: int, every: int, total: int) -> bool:
    """Whether something done every ``every`` steps (0: never but at the end) is due at ``step``
    of a run of ``total`` steps: at multiples of ``every`` and at the last step."""
    return step == total or (every > 0 and step % every == 0)


@dataclasses.dataclass(frozen=True)
class Run:
    """A checked config and what it resolves to on this host."""

    config: ml_collections.ConfigDict
    workdir: str
    built: step_lib.BuiltStep
    steps_per_epoch: int  # epoch ends get a record of the epoch's theory means; 0: none
    config_json: dict[str, Any]
    is_chief: bool

    @property
    def parallel(self) -> distributed.Parallelism:
        """How the step maps over the devices of every process (config.parallelism)."""
        return self.built.parallel

    @property
    def local_devices(self) -> list[jax.Device]:
        """This process's share of the devices (the leading axis of its batches)."""
        return self.parallel.local_devices


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Checks ``config`` (ConfigError before anything is written) and ``workdir`` (WorkdirError;
    created when missing) and builds the step."""
    distributed.maybe_initialize(config)
    config_lib.validate_config(config)
    num_local_devices = config_lib.num_devices_for(config)
    check_data_opens(config, num_local_devices)
    devices = distributed.mapped_devices(num_local_devices)
    built = step_lib.build_step(config, devices)
    steps_per_epoch = 0
    if built.theory_options is not None:
        steps_per_epoch = data.steps_per_epoch(config.data, config.global_batch_size)
    metrics.prepare_workdir(workdir)
    return Run(
        config=config,
        workdir=workdir,
        built=built,
        steps_per_epoch=steps_per_epoch,
        config_json=config_lib.to_json_ready(config),
        is_chief=jax.process_index() == 0,
    )


def check_data_opens(config: ml_collections.ConfigDict, num_local_devices: int) -> None:
    """Opens and closes the training stream, so that what the data refuses (a dataset not
    prepared, a batch larger than the split, sampler settings) stops the run before anything is
    written (data.DataError, one line)."""
    data.train_iterator(
        config.data,
        global_batch_size=config.global_batch_size,
        seed=config.data.seed,
        num_local_devices=num_local_devices,
    ).close()


def open_batches(run: Run, start_step: int) -> Iterator[Any]:
    """The training stream from batch ``start_step`` on, in the form the mapped step takes."""
    config = run.config
    batches = data.train_iterator(
        config.data,
        global_batch_size=config.global_batch_size,
        seed=config.data.seed,
        start_step=start_step,
        num_local_devices=len(run.local_devices),
    )
    if run.parallel.kind == "pmap":
        return data.prefetch_to_device(batches, size=2)
    # No read-ahead queue: the step is dispatched asynchronously, so the transfer of the next
    # batch, issued when the loop asks for it, overlaps the step still running.
    return (run.parallel.put_batch(batch) for batch in batches)


def write_run_config(run: Run) -> None:
    """workdir/config.json: the config plus what it resolved to on this machine."""
    if not run.is_chief:
        return
    built = run.built
    num_local_devices = len(run.local_devices)
    resolved = {
        **run.config_json,
        "resolved": {
            "total_steps": built.total_steps,
            "num_processes": jax.process_count(),
            "num_local_devices": num_local_devices,
            "parallelism": run.parallel.kind,
            "per_device_batch_size": run.config.global_batch_size
            // (jax.process_count() * num_local_devices),
            "loss_options": built.loss_options,
            "theory_options": built.theory_options,
            "feature_dim": models.feature_dim(built.model),
            "jax_backend": jax.default_backend(),
        },
    }
    os.makedirs(run.workdir, exist_ok=True)
    metrics.write_json_atomic(os.path.join(run.workdir, metrics.CONFIG_JSON), resolved)


def init_or_restore(
    run: Run, manager: ocp.CheckpointManager
) -> tuple[int | None, step_lib.TrainState]:
    """(step, state) of the newest checkpoint that restores, or (None, the initial state) when
    there is none. Damaged checkpoints are skipped with a warning and set aside (renamed
    ``<step>.damaged``); ConfigError when the checkpoint's structure does not match the config's,
    DamagedCheckpointError when every checkpoint is damaged."""
    host_state = jax.device_get(run.built.init_state().to_dict())
    try:
        restored = checkpoints.restore_latest(manager, host_state, run.config_json)
    except checkpoints.CheckpointMismatchError as error:
        raise config_lib.ConfigError(str(error)) from None
    if restored is None:
        return None, step_lib.TrainState(**host_state)
    latest, host_state, meta = restored
    assert int(host_state["step"]) == latest, (host_state["step"], latest)
    checkpoints.set_aside(manager, [s for s in manager.all_steps() if s > latest])
    mismatched = config_lib.resume_mismatches(meta.get("config", {}), run.config_json)
    if mismatched:
        logging.warning(
            "Resuming from step %d with a config that differs in %s: the run will not "
            "reproduce an uninterrupted one.",
            latest,
            ", ".join(mismatched),
        )
    logging.info("Resumed from checkpoint at step %d", latest)
    return latest, step_lib.TrainState(**host_state)


def run_knn(
    run: Run,
    feature_fn: features.FeatureFn,
    state: step_lib.TrainState,
    writer: metrics.MetricWriter,
    step: int,
    *,
    write: bool = True,
) -> dict[str, float]:
    """The kNN monitor on the current (replicated) state, written as the record of ``step``
    (every process computes it: the features are gathered across processes)."""
    start = time.time()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    result = evaluate.knn_monitor(run.config, feature_fn, variables, run.local_devices)
    result["knn_seconds"] = time.time() - start
    if write:
        writer.write(step, result)
    logging.info(
        "step %d: knn_top1 %.4f knn_top5 %.4f (%.1fs)",
        step,
        result["knn_top1"],
        result["knn_top5"],
        result["knn_seconds"],
    )
    return result


def _log_start(run: Run) -> None:
    config = run.config
    logging.info(
        "Training %s on %s with loss %s %s: %d steps, global batch %d over %d process(es) x %d "
        "device(s)",
        config.model.name,
        config.data.name,
        config.loss.name,
        run.built.loss_options,
        run.built.total_steps,
        config.global_batch_size,
        jax.process_count(),
        len(run.local_devices),
    )
    if run.built.theory_options is not None:
        logging.info("Theory monitor on: %s", run.built.theory_options)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains per ``config``, writing checkpoints, metrics and events to ``workdir``.

    Resumes from the latest checkpoint in ``workdir/checkpoints`` when there is one. Returns the
    final metrics (the last logged training metrics and the final kNN accuracy).
    Raises ConfigError for bad config values and for a checkpoint that does not fit the config,
    metrics.WorkdirError for a workdir that is a file or not writable (all before anything in
    ``workdir`` changes), and FloatingPointError when a step is not finite and
    ``config.skip_nonfinite_steps`` is False.
    """
    run = setup(config, workdir)
    with contextlib.ExitStack() as held:
        _hold_workdir(held, run)
        # From here on SIGTERM / SIGINT stop the run at the end of a step, with a checkpoint.
        stop = held.enter_context(preemption.StopSignals())
        manager = checkpoints.checkpoint_manager(workdir, config.keep_checkpoints)
        held.callback(manager.close)
        # Saves still being written finish before the run returns (or dies of an exception).
        held.callback(manager.wait_until_finished)
        latest = manager.latest_step()
        start_step = 0 if latest is None else latest
        # Opened before anything is compiled, so that a bad data config stops the run at start.
        batches = open_batches(run, start_step)
        # A resume is checked against the checkpoint before anything in the workdir changes.
        restored_step, state = init_or_restore(run, manager)
        if restored_step != latest:  # the newest checkpoints were damaged
            start_step = 0 if restored_step is None else restored_step
            batches = open_batches(run, start_step)
        write_run_config(run)
        state = run.parallel.replicate(state)
        _log_start(run)
        writer = metrics.MetricWriter(workdir, enabled=run.is_chief, resumed_at=restored_step)
        held.callback(writer.close)
        step_metrics = monitors.StepMetrics(
            run.built,
            writer,
            workdir=workdir,
            steps_per_epoch=run.steps_per_epoch,
            skip_nonfinite_steps=config.skip_nonfinite_steps,
            last_checkpoint=manager.latest_step,
            start=start_step,
        )
        feature_fn = features.make_feature_fn(
            run.built.model, run.parallel.devices, run.parallel.kind
        )
        state, knn = _train_loop(
            run, manager, writer, step_metrics, feature_fn, state, batches, start_step, stop
        )
        if knn is None:  # nothing left to train (a finished run): still report the accuracy
            knn = _knn_of_finished_run(run, feature_fn, state, writer, start_step)
        step_metrics.final.update(knn)
        return step_metrics.final


def _hold_workdir(held: contextlib.ExitStack, run: Run) -> None:
    """Process 0 takes the workdir lock (locks.hold_workdir) for the rest of ``held``; every
    process stops with WorkdirLockError when it cannot."""
    error = None
    if run.is_chief:
        try:
            held.enter_context(locks.hold_workdir(run.workdir))
        except locks.WorkdirLockError as refused:
            error = refused
    if not distributed.all_processes_agree(error is None):
        raise error or locks.WorkdirInUseError(
            f"workdir {run.workdir} is in use by another run (process 0 could not lock it)"
        )


def _knn_of_finished_run(
    run: Run,
    feature_fn: features.FeatureFn,
    state: step_lib.TrainState,
    writer: metrics.MetricWriter,
    step: int,
) -> dict[str, float]:
    """The kNN monitor at ``step`` of a run with nothing left to train; written only when the run
    has no kNN record of that step yet (it was killed between the last save and the kNN), so a
    rerun adds no duplicate record."""
    recorded = any(
        r.get("step") == step and "knn_top1" in r for r in metrics.read_metrics(run.workdir)
    )
    return run_knn(run, feature_fn, state, writer, step, write=not recorded)


def _train_loop(
    run: Run,
    manager: ocp.CheckpointManager,
    writer: metrics.MetricWriter,
    step_metrics: monitors.StepMetrics,
    feature_fn: features.FeatureFn,
    state: step_lib.TrainState,
    batches: Iterator[Any],
    start_step: int,
    stop: preemption.StopSignals,
) -> tuple[step_lib.TrainState, dict[str, float] | None]:
    """Steps ``start_step + 1 .. total``; returns the state and the last kNN result (or None).

    Raises preemption.StopRequested after saving the step at which ``stop`` (a
    preemption.StopSignals) asks to stop."""
    config, total = run.config, run.built.total_steps
    reference = None
    if config_lib.reference_size_for(config):
        reference = monitors.ReferenceMonitor(config, run.built)
    knn = None
    loop_start = time.time()
    for step in range(start_step + 1, total + 1):
        state, device_metrics = run.built.train_step(state, next(batches))
        step_metrics.add(step, device_metrics)
        if step == start_step + 1:
            jax.block_until_ready(device_metrics)
            logging.info("first step (with compilation): %.1fs", time.time() - loop_start)
            step_metrics.restart_clock(step)
        checkpoint_due = due(step, config.checkpoint_every_steps, total)
        eval_due = due(step, config.eval_every_steps, total)
        epoch_due = run.steps_per_epoch > 0 and step % run.steps_per_epoch == 0
        if due(step, config.log_every_steps, total) or checkpoint_due or eval_due or epoch_due:
            step_metrics.flush(step)
        if reference is not None and due(step, config.log_every_steps, total):
            writer.write(step, reference(state), tensorboard_prefix="reference/")
            step_metrics.restart_clock()
        if epoch_due:
            step_metrics.write_epoch_theory(step)
        stopping = step < total and stop.should_stop(step)
        if stopping and not checkpoint_due:
            step_metrics.flush(step)
        if checkpoint_due or stopping:
            host = run.parallel.to_host(state.to_dict())
            meta = {"step": step, "config": run.config_json}
            checkpoints.save_checkpoint(manager, step, host, meta)
        if stopping:
            raise preemption.StopRequested(
                step, stop.received or "a stop request", str(manager.directory)
            )
        if eval_due:
            knn = run_knn(run, feature_fn, state, writer, step)
            step_metrics.restart_clock()  # keep evaluation out of steps/s
    return state, knn
