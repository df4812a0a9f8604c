"""The training loop: :func:`train_and_evaluate` (used by ``train.py``) trains per a config, writing
config.json, metrics.jsonl, TensorBoard events and checkpoints to a run directory, and resumes from
its latest checkpoint.

Its pieces: :func:`setup` (config checks, devices, the step), :func:`init_or_restore` (the
initial or checkpointed state), :class:`StepMetrics` (the step metrics of a logging interval and the
theory means of an epoch), and :func:`due`, which decides when to log, evaluate and save. The
config, step, checkpoints, metrics and evaluation live in their own modules (README, Layout).

Layer 5: imports every earlier layer; imported by sweep.py and train.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from hscl_jax import (
    checkpoints,
    data,
    distributed,
    evaluate,
    features,
    locks,
    losses,
    metrics,
    models,
    preemption,
    theory,
)
from hscl_jax import config as config_lib
from hscl_jax import step as step_lib

# Metrics every step returns besides "finite": the loss, the gradient norm and the loss's aux
# figures; the logged record of an interval holds their means over its finite steps.
STEP_METRIC_KEYS = ("loss", "grad_norm", *losses.LossAux._fields)


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
    def devices(self):
        """The devices the step maps over: this process's and every other process's."""
        return self.built.devices

    @property
    def local_devices(self):
        """This process's share of :attr:`devices` (the leading axis of its batches)."""
        return [d for d in self.built.devices if d.process_index == jax.process_index()]


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


def open_batches(run: Run, start_step: int):
    """The training stream from batch ``start_step`` on, prefetched to the devices."""
    config = run.config
    batches = data.train_iterator(
        config.data,
        global_batch_size=config.global_batch_size,
        seed=config.data.seed,
        start_step=start_step,
        num_local_devices=len(run.local_devices),
    )
    return data.prefetch_to_device(batches, size=2)


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


def init_or_restore(run: Run, manager) -> tuple[int | None, step_lib.TrainState]:
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


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class StepMetrics:
    """The step metrics of the current logging interval, kept on the devices until :meth:`flush`
    checks their finiteness and writes their means; and the theory means of the current epoch."""

    def __init__(self, run: Run, writer: metrics.MetricWriter, last_checkpoint: Callable, start):
        self._run = run
        self._writer = writer
        self._last_checkpoint = last_checkpoint
        self._keys = STEP_METRIC_KEYS
        if run.built.theory_options is not None:
            self._keys += theory.THEORY_KEYS
        self._pending: list[dict[str, jax.Array]] = []
        self._pending_steps: list[int] = []
        self._epoch_theory: list[dict[str, np.ndarray]] = []  # finite steps' values, per flush
        self.skipped_total = 0
        self.final: dict[str, float] = {}
        self.restart_clock(start)

    def restart_clock(self, step: int | None = None) -> None:
        """Starts timing steps/s anew (from ``step`` when given): compilation and evaluation
        stay out of it."""
        self._clock = time.time()
        if step is not None:
            self._clock_step = step

    def add(self, step: int, device_metrics: dict[str, jax.Array]) -> None:
        self._pending.append(device_metrics)
        self._pending_steps.append(step)

    def flush(self, step: int) -> None:
        """Checks finiteness of the steps run since the last flush and logs their mean metrics."""
        if not self._pending:
            return
        fetched = step_lib.stack_first_replicas_to_host(self._pending)
        steps = np.asarray(self._pending_steps)
        self._pending, self._pending_steps = [], []
        finite = fetched["finite"] >= 1
        self._check_finite(steps, finite, fetched)
        if self._run.built.theory_options is not None:
            self._epoch_theory.append({k: fetched[k][finite] for k in theory.THEORY_KEYS})
        rows = finite if finite.any() else np.arange(len(steps)) == len(steps) - 1
        summary = {key: float(np.mean(fetched[key][rows])) for key in self._keys}
        steps_per_sec = (step - self._clock_step) / max(time.time() - self._clock, 1e-9)
        summary.update(
            learning_rate=float(self._run.built.schedule(step - 1)),
            steps_per_sec=steps_per_sec,
            skipped_steps=float(self.skipped_total),
        )
        self._writer.write(step, summary)
        self.final.update(summary)
        self._log(step, summary, steps_per_sec)
        self.restart_clock(step)

    def _check_finite(self, steps: np.ndarray, finite: np.ndarray, fetched) -> None:
        bad_steps = steps[~finite].tolist()
        if not bad_steps:
            return
        if not self._run.config.skip_nonfinite_steps:
            first = int(np.argmin(finite))
            kept = self._last_checkpoint()
            raise FloatingPointError(
                f"non-finite loss or gradient at step {bad_steps[0]} "
                f"(loss={fetched['loss'][first]}, grad_norm={fetched['grad_norm'][first]}); "
                f"stopping. Last good checkpoint: {'none' if kept is None else f'step {kept}'} "
                f"in {self._run.workdir}/checkpoints. "
                "Set config.skip_nonfinite_steps=True to skip such steps instead."
            )
        self.skipped_total += len(bad_steps)
        logging.warning("skipped non-finite steps %s", bad_steps)

    def _log(self, step: int, summary: dict[str, float], steps_per_sec: float) -> None:
        total = self._run.built.total_steps
        eta = (total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
        logging.info(
            "step %d/%d | loss %.4f | anchors %.0f | pos %.3f neg %.3f | eff_neg %.1f | lr %.2e | "
            "%.2f steps/s | ETA %s",
            step,
            total,
            summary["loss"],
            summary["num_anchors"],
            summary["mean_pos_cos"],
            summary["mean_neg_cos"],
            summary["effective_negatives"],
            summary["learning_rate"],
            steps_per_sec,
            _format_duration(eta),
        )

    def write_epoch_theory(self, step: int) -> None:
        """Record {"step", "epoch", THEORY_KEYS} of the epoch ending at ``step``: means over its
        finite steps (after a resume mid-epoch, over the steps run since the resume)."""
        parts, self._epoch_theory = self._epoch_theory, []
        if not sum(len(p[theory.THEORY_KEYS[0]]) for p in parts):
            logging.warning("epoch ending at step %d had no finite step: no theory record", step)
            return
        record = {"epoch": step // self._run.steps_per_epoch}
        for key in theory.THEORY_KEYS:
            record[key] = float(np.mean(np.concatenate([p[key] for p in parts])))
        self._writer.write(step, record, tensorboard_prefix="epoch/")
        logging.info(
            "epoch %d: hscl %.4f hucl %.4f scl %.4f ucl %.4f | assumption holds for %.3f",
            record["epoch"],
            record["hscl"],
            record["hucl"],
            record["scl"],
            record["ucl"],
            record["assumption_fraction"],
        )


class ReferenceMonitor:
    """The theory monitor's N -> infinity view (config.theory.reference_size > 0): at a logging
    step, the H-SCL loss of a fixed training batch against its own views, against its views plus
    the queue's newest k keys, and against a fixed reference set of training examples, all
    embedded by the current online model (hscl_jax.theory.negative_set_estimates).

    The batch is the run's first (augmented) training batch and the reference set the first
    ``reference_size`` unaugmented training examples, both fixed for the whole run. They are
    embedded as the step embeds its batch (BatchNorm with the pass's own statistics, not kept), on
    the first device.
    """

    def __init__(self, run: Run):
        config = run.config
        size = config_lib.reference_size_for(config)
        batch = next(
            data.train_iterator(
                config.data,
                global_batch_size=config.global_batch_size,
                seed=config.data.seed,
                num_local_devices=1,
            )
        )
        views = data.augment_views(batch, data.augmentation_for(config.data))
        self._views = np.concatenate([np.asarray(view[0]) for view in views])
        self._labels = batch["label"][0]
        preprocess = data.eval_preprocessing(config.data)
        images, labels = [], []
        for eval_batch in data.eval_iterator(
            config.data, split="train", batch_size=min(size, 1024), num_local_devices=1
        ):
            mask = eval_batch["mask"][0]
            images.append(np.asarray(preprocess(eval_batch["image"][0]))[mask])
            labels.append(eval_batch["label"][0][mask])
            if sum(len(x) for x in labels) >= size:
                break
        self._reference = np.concatenate(images)[:size]
        self._reference_labels = np.concatenate(labels)[:size]
        model = models.model_from_config(config.model)  # no cross-device BatchNorm

        def project(variables, images):
            (_, projection), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
            return projection.astype(np.float32)

        self._project = jax.jit(project)
        self._options = run.built.theory_options

    def __call__(self, state) -> dict[str, float]:
        variables = step_lib.first_replica_to_host(
            {"params": state.params, "batch_stats": state.batch_stats}
        )
        views = self._project(variables, self._views)
        reference = self._project(variables, self._reference)
        queue = {}
        if state.queue is not None:
            host_queue = step_lib.first_replica_to_host(
                {k: state.queue[k] for k in ("keys", "labels", "count")}
            )
            queue = {
                "queue_keys": host_queue["keys"],
                "queue_labels": host_queue["labels"],
                "queue_count": int(host_queue["count"]),
            }
        z1, z2 = views[: len(self._labels)], views[len(self._labels) :]
        return theory.negative_set_estimates(
            z1, z2, self._labels, reference, self._reference_labels, **self._options, **queue
        )


def run_knn(run: Run, feature_fn, state, writer, step: int, *, write: bool = True) -> dict:
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
        state = step_lib.replicate(state, run.devices)
        _log_start(run)
        writer = metrics.MetricWriter(workdir, enabled=run.is_chief, resumed_at=restored_step)
        held.callback(writer.close)
        step_metrics = StepMetrics(run, writer, manager.latest_step, start_step)
        feature_fn = features.make_feature_fn(run.built.model, run.devices)
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


def _knn_of_finished_run(run: Run, feature_fn, state, writer, step: int) -> dict[str, float]:
    """The kNN monitor at ``step`` of a run with nothing left to train; written only when the run
    has no kNN record of that step yet (it was killed between the last save and the kNN), so a
    rerun adds no duplicate record."""
    recorded = any(
        r.get("step") == step and "knn_top1" in r for r in metrics.read_metrics(run.workdir)
    )
    return run_knn(run, feature_fn, state, writer, step, write=not recorded)


def _train_loop(run, manager, writer, step_metrics, feature_fn, state, batches, start_step, stop):
    """Steps ``start_step + 1 .. total``; returns the state and the last kNN result (or None).

    Raises preemption.StopRequested after saving the step at which ``stop`` (a
    preemption.StopSignals) asks to stop."""
    config, total = run.config, run.built.total_steps
    reference = ReferenceMonitor(run) if config_lib.reference_size_for(config) else None
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
            host = step_lib.first_replica_to_host(state.to_dict())
            meta = {"step": step, "config": run.config_json}
            checkpoints.save_checkpoint(manager, step, host, meta)
        if stopping:
            raise preemption.StopRequested(step, stop.received, str(manager.directory))
        if eval_due:
            knn = run_knn(run, feature_fn, state, writer, step)
            step_metrics.restart_clock()  # keep evaluation out of steps/s
    return state, knn
