"""Throughput of the trainer's train step on a mesh and under pmap, alternated in one process.

    python bench/train_step.py                      # every case, every local device, both ways
    python bench/train_step.py --cases=small_cnn --steps=20 --repeats=5
    python bench/train_step.py --cases=resnet50 --dtype=bfloat16 --batch=256   # on a GPU/TPU

On a CPU the process gets ``--cpu-devices`` fake devices (default 8; XLA_FLAGS, set before JAX
starts). Cases: the small CNN on 8x8x1 digit-shaped inputs, ResNet-18 and ResNet-50 (reference
widths) at 32x32x3, on random views (no input pipeline: this measures the step alone). The step
is hscl_jax.step.build_step's, over every local device, as the trainer runs it (on CPU each mesh
call is waited for: hscl_jax.distributed.Parallelism.paced). The two parallelisms are
compiled once each and then timed alternately, ``--repeats`` rounds of ``--steps`` steps, so that
load on the machine hits both alike. Reported per case and parallelism: compile time, the median
round's ms/step and images/s (an image = one pair of views), XLA's FLOP count of the compiled
per-device step (``compiled.cost_analysis()``), the achieved TFLOP/s per device and, on a GPU or
TPU, the utilisation of the chip's bf16 peak; then the mesh / pmap step-time ratio (the median
of the rounds' ratios).

``--augment`` adds the device-augmentation pipeline / step ratio (``bench_device_augmentation``).
``--save-hiccup`` adds the step-time hiccup of a checkpoint save in the middle of a run of steps
(the trainer's save: the state copied to the host, then orbax, asynchronous as in the trainer, and
synchronous for comparison), under the first parallelism listed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time


def _cpu_devices(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg.startswith("--cpu-devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--cpu-devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return 8


# Fake CPU devices must be requested before JAX starts (they do not affect GPU or TPU backends).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_cpu_devices(sys.argv)}"
    ).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from hscl_jax import checkpoints, data, distributed, losses, models  # noqa: E402
from hscl_jax import config as config_lib  # noqa: E402
from hscl_jax import step as step_lib  # noqa: E402

CASES = {
    # name: (model, dataset giving the input shape (H, W, C), default global batch on CPU)
    "small_cnn": ("small_cnn", "digits", 128),  # 8x8x1
    "resnet18": ("resnet18", "synthetic", 16),  # 32x32x3
    "resnet50": ("resnet50", "synthetic", 8),
}

# Dense bf16 peak TFLOP/s per chip (no sparsity), by a lower-case part of jax's device_kind,
# first match wins. Sources: NVIDIA's A100, H100 and H200 datasheets (SXM parts; H100 PCIe
# separately) and the Cloud TPU system-architecture pages for v4, v5e, v5p and v6e
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
BF16_PEAK_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("h200", 989.0),
    ("a100", 312.0),
    ("v6 lite", 918.0),  # TPU v6e
    ("v6e", 918.0),
    ("v5 lite", 197.0),  # TPU v5e
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("tpu v5", 459.0),  # v5p reports "TPU v5"
    ("tpu v4", 275.0),
)


def bf16_peak_tflops(device) -> float | None:
    """The chip's dense bf16 peak from BF16_PEAK_TFLOPS, or None (CPUs and unknown chips)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    return next((peak for part, peak in BF16_PEAK_TFLOPS if part in kind), None)


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
        f"device={device.device_kind} x {jax.local_device_count()}"
    )


def _flops(lowered) -> float:
    """FLOPs of one device's step, from the lowered (not yet compiled) program: XLA's count is
    platform-independent there, while a compiled GPU program hides its convolutions in library
    calls that the count leaves out."""
    analysis = lowered.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per program
        analysis = analysis[0]
    return float((analysis or {}).get("flops", float("nan")))


class Prepared:
    """One parallelism's compiled step, its state and its batch, ready to be timed."""

    def __init__(self, config, parallelism: str, devices, batch_arrays):
        config = config.copy_and_resolve_references()
        config.parallelism = parallelism
        built = step_lib.build_step(config, devices)
        self.parallel = built.parallel
        self.state = self.parallel.replicate(built.init_state())
        batch = self.parallel.put_batch(batch_arrays)
        if parallelism == "pmap":  # on the devices up front, as the mesh's put_batch leaves it
            mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
            batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("devices")))
        self.batch = batch
        start = time.perf_counter()
        lowered = built.train_step.lower(self.state, self.batch)
        self.flops = _flops(lowered)
        compiled = lowered.compile()
        self.step = self.parallel.paced(compiled)
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)
        self.compile_seconds = time.perf_counter() - start
        self.seconds: list[float] = []

    def run(self, steps: int) -> None:
        """Times ``steps`` steps (blocking on the last one's results)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.seconds.append((time.perf_counter() - start) / steps)


def bench_case(name: str, args) -> list[dict]:
    model_name, dataset, default_batch = CASES[name]
    devices = jax.local_devices()
    batch = args.batch or default_batch
    config = config_lib.base_config(dataset)
    config.model.name = model_name
    config.model.dtype = args.dtype
    config.loss.name = args.loss
    config.loss.beta = args.beta
    config.num_steps = args.steps
    # The step's input layout: uint8 images plus both views' parameters; the step augments them
    # first (bench/pipeline.py --augment times that part alone).
    aug = data.augmentation_for(config.data)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch, aug.image_size, aug.image_size, aug.channels))
    flat = data.train_batch(images.astype(np.uint8), rng.integers(0, 10, batch), aug)
    batch_arrays = jax.tree.map(lambda x: x.reshape(len(devices), -1, *x.shape[1:]), flat)
    if args.flops_only:  # the count of the lowered step; nothing compiled or run
        built = step_lib.build_step(config, devices)
        state = built.parallel.replicate(built.init_state())
        lowered = built.train_step.lower(state, built.parallel.put_batch(batch_arrays))
        print(f"{name}: {_flops(lowered) / 1e9:.3f} GFLOP per device and step, batch {batch}")
        return []
    prepared = {p: Prepared(config, p, devices, batch_arrays) for p in args.parallelisms}
    for _ in range(args.repeats):
        for runner in prepared.values():
            runner.run(args.steps)
    peak = bf16_peak_tflops(devices[0])
    rows = []
    for parallelism, runner in prepared.items():
        seconds = statistics.median(runner.seconds)
        tflops = runner.flops / seconds / 1e12
        rows.append(
            {
                "case": name,
                "batch": batch,
                "parallelism": parallelism,
                "compile_s": runner.compile_seconds,
                "ms_per_step": 1e3 * seconds,
                "images_per_s": batch / seconds,
                "gflop_per_step": runner.flops / 1e9,
                "tflops_per_device": tflops,
                "utilisation": None if peak is None else tflops / peak,
                "rounds": runner.seconds,
            }
        )
    if args.save_hiccup:
        first = prepared[args.parallelisms[0]]
        rows[0]["hiccups"] = {
            mode: save_hiccup(first, args.steps, asynchronous=mode == "async")
            for mode in ("async", "sync")
        }
    return rows


def bench_device_augmentation(args) -> None:
    """The device-augmentation pipeline against the step that consumes it, on random uint8
    images of CIFAR-10's shape: pairs/s of the host side of the pipeline (a batch of images
    gathered from a pool, and both views' augmentation parameters drawn, as data.train_iterator
    ships them), pairs/s of the train step (``--augment-model``, the
    CIFAR-10 augmentation inside the step), and their ratio (>= 1: the pipeline keeps up)."""
    devices = jax.local_devices()
    config = config_lib.base_config("cifar10")
    config.model.name = args.augment_model
    config.model.dtype = args.dtype
    config.num_steps = args.steps
    config.parallelism = args.parallelisms[0]
    info = data.dataset_info("cifar10")
    aug = data.augmentation_for(config.data)
    batch = args.augment_batch
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=(4096, *(info.image_size, info.image_size, 3)), dtype=np.uint8)
    pool_labels = rng.integers(0, info.num_classes, size=len(pool)).astype(np.int32)

    def shipped(step: int) -> dict:
        indices = np.random.default_rng([1, step]).integers(0, len(pool), size=batch)
        flat = data.train_batch(pool[indices], pool_labels[indices], aug, step=step)
        return jax.tree.map(lambda x: x.reshape(len(devices), -1, *x.shape[1:]), flat)

    start = time.perf_counter()
    for step in range(args.steps * args.repeats):
        shipped(step)
    pipeline = args.steps * args.repeats * batch / (time.perf_counter() - start)
    built = step_lib.build_step(config, devices)
    parallel = built.parallel
    state = parallel.replicate(built.init_state())
    placed = parallel.put_batch(shipped(0))
    state, metrics = built.train_step(state, placed)
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = built.train_step(state, placed)
        jax.block_until_ready((state, metrics))
        seconds.append((time.perf_counter() - start) / args.steps)
    step_rate = batch / statistics.median(seconds)
    print(
        f"device augmentation, cifar10 32x32x3 uint8, batch {batch}, {args.augment_model} "
        f"({config.parallelism}): pipeline {pipeline:.0f} pairs/s (host, one process), "
        f"step {step_rate:.0f} pairs/s; ratio pipeline/step: {pipeline / step_rate:.2f}",
        flush=True,
    )


def save_hiccup(runner: Prepared, steps: int, *, asynchronous: bool) -> dict[str, float]:
    """Times in ms of ``max(steps, 5)`` steps with a checkpoint saved after the middle one, each
    step timed until its metrics are ready, saved as the trainer saves (host copy, then orbax)."""
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
            runner.state, out = runner.step(runner.state, runner.batch)
            if i == save_at:
                save_start = time.perf_counter()
                host = runner.parallel.to_host(runner.state.to_dict())
                checkpoints.save_checkpoint(manager, i, host, {"step": i})
                save_call = time.perf_counter() - save_start
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
        manager.wait_until_finished()
        manager.close()
    others = times[:save_at] + times[save_at + 1 :]
    return {
        "median_ms": 1e3 * statistics.median(others),
        "save_step_ms": 1e3 * times[save_at],
        "save_call_ms": 1e3 * save_call,
    }


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        utilisation = "-" if r["utilisation"] is None else f"{100 * r['utilisation']:.1f}%"
        print(
            f"{r['case']:<10} {r['batch']:>6} {r['parallelism']:>5} {r['compile_s']:>9.1f} "
            f"{r['ms_per_step']:>9.2f} {r['images_per_s']:>9.1f} {r['gflop_per_step']:>12.3f} "
            f"{r['tflops_per_device']:>11.4f} {utilisation:>11}",
            flush=True,
        )
    by_mode = {r["parallelism"]: r["rounds"] for r in rows}
    if {"mesh", "pmap"} <= set(by_mode):
        ratios = [m / p for m, p in zip(by_mode["mesh"], by_mode["pmap"], strict=True)]
        print(
            f"{rows[0]['case']}: mesh/pmap step time {statistics.median(ratios):.3f} (median of "
            f"{len(ratios)} alternating rounds; rounds {min(ratios):.3f}..{max(ratios):.3f}; "
            "<= 1: the mesh is no slower)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--batch", type=int, default=0, help="global images per step (0: default)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    parser.add_argument("--parallelisms", default="mesh,pmap", help="comma-separated")
    parser.add_argument("--cpu-devices", type=int, default=8, help="fake devices on a CPU")
    parser.add_argument("--dtype", default="float32", choices=models.DTYPE_NAMES)
    parser.add_argument("--loss", default="hscl", choices=losses.LOSS_NAMES)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--save-hiccup", action="store_true", help="also time a checkpoint save")
    parser.add_argument(
        "--flops-only",
        action="store_true",
        help="print each case's FLOPs per device and step without compiling or timing it",
    )
    parser.add_argument(
        "--augment", action="store_true", help="also the device-augmentation pipeline/step ratio"
    )
    parser.add_argument("--augment-model", default="resnet50", help="the --augment step's model")
    parser.add_argument("--augment-batch", type=int, default=256, help="the --augment batch")
    args = parser.parse_args()
    args.parallelisms = args.parallelisms.split(",")
    for parallelism in args.parallelisms:
        if parallelism not in distributed.PARALLELISMS:
            allowed = ", ".join(distributed.PARALLELISMS)
            raise SystemExit(
                f"error: --parallelisms: {parallelism!r} is unknown; allowed: {allowed}"
            )
    print(f"machine: {_machine()}", flush=True)
    print(
        f"loss: {args.loss} (beta={args.beta} where used), dtype: {args.dtype}, "
        f"{jax.local_device_count()} devices, {args.repeats} rounds of {args.steps} steps"
    )
    print(
        f"{'case':<10} {'batch':>6} {'mode':>5} {'compile s':>9} {'ms/step':>9} {'images/s':>9} "
        f"{'GFLOP/step':>12} {'TFLOP/s/dev':>11} {'bf16 util':>11}"
    )
    rows = []
    for name in filter(None, args.cases.split(",")):
        if name not in CASES:
            raise SystemExit(f"error: unknown case {name!r}; allowed: {', '.join(CASES)}")
        case_rows = bench_case(name, args)
        _print_rows(case_rows)
        rows.extend(case_rows)
    hiccups = [r for r in rows if "hiccups" in r]
    if hiccups:
        print(
            f"\ncheckpoint save hiccup\n{'case':<10} {'orbax':>5} {'median step ms':>14} "
            f"{'saving step ms':>14} {'hiccup ms':>9} {'save call ms':>12}"
        )
    for result in hiccups:
        for mode, hiccup in result["hiccups"].items():
            print(
                f"{result['case']:<10} {mode:>5} {hiccup['median_ms']:>14.1f} "
                f"{hiccup['save_step_ms']:>14.1f} "
                f"{hiccup['save_step_ms'] - hiccup['median_ms']:>9.1f} "
                f"{hiccup['save_call_ms']:>12.1f}",
                flush=True,
            )
    if args.augment:
        bench_device_augmentation(args)


if __name__ == "__main__":
    main()
