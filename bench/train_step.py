"""Throughput of the pmapped train step, and the share of it spent in the contrastive loss.

    python bench/train_step.py                      # all cases, this machine
    python bench/train_step.py --cases=small_cnn --steps=50

Cases: the small CNN on 8x8x1 digit-shaped inputs, ResNet-18 and ResNet-50 (reference widths) at
32x32x3, all on random data (no input pipeline: this measures the step alone). Reported per case:
compile time, images/s (an image = one pair of views, so 2x that many views go through the
encoder), ms/step, and the loss's share of the step: the time of the loss forward+backward alone
on projections of the same shape (same pmap, same axis), divided by the step time.

A second table per case: the step-time hiccup of a checkpoint save in the middle of a run of steps
(the trainer's save: the state copied to the host, then orbax, asynchronous as in the trainer, and
synchronous for comparison): the median step, the step that saved (both timed to the end of the
step's result), and the time the training loop spent in the save call (host copy + orbax).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np

from hscl_jax import checkpoints, data, losses, models
from hscl_jax import config as config_lib
from hscl_jax import step as step_lib

CASES = {
    # name: (model, dataset giving the input shape (H, W, C), default batch on CPU)
    "small_cnn": ("small_cnn", "digits", 128),  # 8x8x1
    "resnet18": ("resnet18", "synthetic", 16),  # 32x32x3
    "resnet50": ("resnet50", "synthetic", 8),
}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    device = jax.devices()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} backend={jax.default_backend()} "
        f"device={device.device_kind}"
    )


def _time(fn, steps: int) -> float:
    """Seconds per call of ``fn`` (already compiled), blocking on its result."""
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def bench_case(name: str, batch: int, steps: int, dtype: str, loss_name: str, beta: float):
    model_name, dataset, _ = CASES[name]
    devices = jax.local_devices()[:1]
    config = config_lib.base_config(dataset)
    config.model.name = model_name
    config.model.dtype = dtype
    config.loss.name = loss_name
    config.loss.beta = beta
    config.num_steps = steps
    # The step augments its batch first (bench/pipeline.py --augment measures that part alone).
    built = step_lib.build_step(config, devices)
    step = built.train_step
    replicated = step_lib.replicate(built.init_state(), devices)
    rng = np.random.default_rng(0)
    aug = data.augmentation_for(config.data)
    images = rng.integers(0, 256, size=(batch, aug.image_size, aug.image_size, aug.channels))
    batch_arrays = data.train_batch(images.astype(np.uint8), rng.integers(0, 10, batch), aug)
    batch_arrays = jax.device_put(jax.tree.map(lambda x: x[None], batch_arrays), devices[0])
    loss_kwargs = built.loss_options

    start = time.perf_counter()
    replicated, metrics = step(replicated, batch_arrays)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start

    def run_step():
        nonlocal replicated
        replicated, out = step(replicated, batch_arrays)
        return out

    step_seconds = _time(run_step, steps)

    # The loss alone: value and gradient w.r.t. both views' projections, same pmap and axis.
    def loss_and_grad(z1, z2, labels):
        def objective(z1, z2):
            return losses.compute(
                loss_name, z1, z2, labels, axis_name=step_lib.AXIS_NAME, **loss_kwargs
            )

        return jax.value_and_grad(objective, argnums=(0, 1))(z1, z2)

    p_loss = jax.pmap(loss_and_grad, axis_name=step_lib.AXIS_NAME, devices=devices)
    z = rng.normal(size=(2, 1, batch, built.model.head.output_dim)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    z1, z2 = jax.device_put((z[0], z[1]), devices[0])
    jax.block_until_ready(p_loss(z1, z2, batch_arrays["label"]))
    loss_seconds = _time(lambda: p_loss(z1, z2, batch_arrays["label"]), steps)
    hiccups = {}
    for mode in ("async", "sync"):
        replicated, hiccups[mode] = save_hiccup(
            step, replicated, batch_arrays, steps, asynchronous=mode == "async"
        )
    return {
        "hiccups": hiccups,
        "case": name,
        "batch": batch,
        "dtype": dtype,
        "compile_s": compile_seconds,
        "ms_per_step": 1e3 * step_seconds,
        "images_per_s": batch / step_seconds,
        "loss_ms": 1e3 * loss_seconds,
        "loss_share": loss_seconds / step_seconds,
    }


def save_hiccup(step, replicated, batch_arrays, steps: int, *, asynchronous: bool):
    """(state, times in ms) of ``max(steps, 5)`` steps with a checkpoint saved after the middle
    one, each step timed until its metrics are ready, saved as the trainer saves (host copy, then
    orbax). ``replicated`` is donated to the steps: use the returned state."""
    import orbax.checkpoint as ocp

    num_steps = max(steps, 5)
    save_at = num_steps // 2
    times = []
    with tempfile.TemporaryDirectory() as directory:
        manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=asynchronous),
        )
        for i in range(num_steps):
            start = time.perf_counter()
            replicated, out = step(replicated, batch_arrays)
            if i == save_at:
                save_start = time.perf_counter()
                host = step_lib.first_replica_to_host(replicated.to_dict())
                checkpoints.save_checkpoint(manager, i, host, {"step": i})
                save_call = time.perf_counter() - save_start
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
        manager.wait_until_finished()
        manager.close()
    others = times[:save_at] + times[save_at + 1 :]
    return replicated, {
        "median_ms": 1e3 * statistics.median(others),
        "save_step_ms": 1e3 * times[save_at],
        "save_call_ms": 1e3 * save_call,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument(
        "--batch", type=int, default=0, help="images per step (0: per-case default)"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--dtype", default="float32", choices=models.DTYPE_NAMES)
    parser.add_argument("--loss", default="hscl", choices=losses.LOSS_NAMES)
    parser.add_argument("--beta", type=float, default=1.0)
    args = parser.parse_args()
    print(f"machine: {_machine()}")
    print(f"loss: {args.loss} (beta={args.beta} where used), dtype: {args.dtype}, 1 device")
    header = (
        f"{'case':<10} {'batch':>5} {'compile s':>9} {'ms/step':>9} {'images/s':>9} "
        f"{'loss ms':>8} {'loss share':>10}"
    )
    print(header)
    rows = []
    for name in args.cases.split(","):
        if name not in CASES:
            raise ValueError(f"unknown case {name!r}; allowed: {', '.join(CASES)}")
        batch = args.batch or CASES[name][2]
        result = bench_case(name, batch, args.steps, args.dtype, args.loss, args.beta)
        print(
            f"{result['case']:<10} {result['batch']:>5} {result['compile_s']:>9.1f} "
            f"{result['ms_per_step']:>9.1f} {result['images_per_s']:>9.1f} "
            f"{result['loss_ms']:>8.2f} {100 * result['loss_share']:>9.2f}%",
            flush=True,
        )
        rows.append(result)
    print(
        f"\ncheckpoint save hiccup\n{'case':<10} {'orbax':>5} {'median step ms':>14} "
        f"{'saving step ms':>14} {'hiccup ms':>9} {'save call ms':>12}"
    )
    for result in rows:
        for mode, hiccup in result["hiccups"].items():
            print(
                f"{result['case']:<10} {mode:>5} {hiccup['median_ms']:>14.1f} "
                f"{hiccup['save_step_ms']:>14.1f} "
                f"{hiccup['save_step_ms'] - hiccup['median_ms']:>9.1f} "
                f"{hiccup['save_call_ms']:>12.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
