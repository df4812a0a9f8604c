"""What the training loop reports besides the kNN monitor: :class:`StepMetrics` (the step metrics of
a logging interval, their finiteness, and the theory means of an epoch) and
:class:`ReferenceMonitor` (the theory monitor's N -> infinity view of a fixed batch).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import logging

from hscl_jax import config as config_lib
from hscl_jax import data, losses, metrics, models, theory
from hscl_jax import step as step_lib

if TYPE_CHECKING:
    import ml_collections

# Metrics every step returns besides "finite": the loss, the gradient norm and the loss's aux
# figures; the logged record of an interval holds their means over its finite steps.
STEP_METRIC_KEYS = ("loss", "grad_norm", *losses.LossAux._fields)


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class StepMetrics:
    """The step metrics of the current logging interval, kept on the devices until :meth:`flush`
    checks their finiteness and writes their means; and the theory means of the current epoch.

    ``steps_per_epoch`` > 0 numbers the epoch records; ``skip_nonfinite_steps`` False makes a
    non-finite step stop the run (FloatingPointError naming ``last_checkpoint()`` in
    ``workdir``).
    """

    def __init__(
        self,
        built: step_lib.BuiltStep,
        writer: metrics.MetricWriter,
        *,
        workdir: str,
        steps_per_epoch: int,
        skip_nonfinite_steps: bool,
        last_checkpoint: Callable[[], int | None],
        start: int,
    ):
        self._built = built
        self._writer = writer
        self._workdir = workdir
        self._steps_per_epoch = steps_per_epoch
        self._skip_nonfinite_steps = skip_nonfinite_steps
        self._last_checkpoint = last_checkpoint
        self._keys: tuple[str, ...] = STEP_METRIC_KEYS
        if built.theory_options is not None:
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
        fetched = self._built.parallel.stack_to_host(self._pending)
        steps = np.asarray(self._pending_steps)
        self._pending, self._pending_steps = [], []
        finite = fetched["finite"] >= 1
        self._check_finite(steps, finite, fetched)
        if self._built.theory_options is not None:
            self._epoch_theory.append({k: fetched[k][finite] for k in theory.THEORY_KEYS})
        rows = finite if finite.any() else np.arange(len(steps)) == len(steps) - 1
        summary = {key: float(np.mean(fetched[key][rows])) for key in self._keys}
        steps_per_sec = (step - self._clock_step) / max(time.time() - self._clock, 1e-9)
        summary.update(
            learning_rate=float(self._built.schedule(step - 1)),
            steps_per_sec=steps_per_sec,
            skipped_steps=float(self.skipped_total),
        )
        self._writer.write(step, summary)
        self.final.update(summary)
        self._log(step, summary, steps_per_sec)
        self.restart_clock(step)

    def _check_finite(
        self, steps: np.ndarray, finite: np.ndarray, fetched: dict[str, np.ndarray]
    ) -> None:
        bad_steps = steps[~finite].tolist()
        if not bad_steps:
            return
        if not self._skip_nonfinite_steps:
            first = int(np.argmin(finite))
            kept = self._last_checkpoint()
            raise FloatingPointError(
                f"non-finite loss or gradient at step {bad_steps[0]} "
                f"(loss={fetched['loss'][first]}, grad_norm={fetched['grad_norm'][first]}); "
                f"stopping. Last good checkpoint: {'none' if kept is None else f'step {kept}'} "
                f"in {self._workdir}/checkpoints. "
                "Set config.skip_nonfinite_steps=True to skip such steps instead."
            )
        self.skipped_total += len(bad_steps)
        logging.warning("skipped non-finite steps %s", bad_steps)

    def _log(self, step: int, summary: dict[str, float], steps_per_sec: float) -> None:
        total = self._built.total_steps
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
        record: dict[str, float] = {"epoch": step // self._steps_per_epoch}
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
    the first local device.
    """

    def __init__(self, config: ml_collections.ConfigDict, built: step_lib.BuiltStep) -> None:
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

        def project(variables: dict[str, Any], images: np.ndarray) -> jax.Array:
            (_, projection), _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
            return projection.astype(np.float32)

        self._project = jax.jit(project)
        if built.theory_options is None:
            raise ValueError("the reference monitor needs the theory monitor's options")
        self._options = built.theory_options
        self._parallel = built.parallel

    def __call__(self, state: step_lib.TrainState) -> dict[str, float]:
        variables = self._parallel.to_host(
            {"params": state.params, "batch_stats": state.batch_stats}
        )
        views = self._project(variables, self._views)
        reference = self._project(variables, self._reference)
        queue: dict[str, Any] = {}
        if state.queue is not None:
            host_queue = self._parallel.to_host(state.queue)
            # Queue.push fills rows from the front, so the valid rows are the first ones.
            queue = {
                "queue_keys": host_queue.z,
                "queue_labels": host_queue.labels,
                "queue_count": int(host_queue.valid.sum()),
            }
        z1, z2 = views[: len(self._labels)], views[len(self._labels) :]
        return theory.negative_set_estimates(
            z1,
            z2,
            self._labels,
            reference,
            self._reference_labels,
            beta=self._options["beta"],
            temperature=self._options["temperature"],
            **queue,
        )
