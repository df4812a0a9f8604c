"""Benchmark of the H-SCL kernel: fwd+bwd time, dense and blocked, and peak memory of blocked.

    python bench/losses.py                 # the table of docs/benchmarks.md
    python bench/losses.py --sizes 512 2048 --no-memory
    python bench/losses.py --float32-limit  # float32 vs float64 gradient error over beta and t
    python bench/losses.py --sizes 2048 --no-memory          # with dense time per hardening
    python bench/losses.py --sizes 512 --hardening-views 0 --no-dense-memory --memory-views 512 \
        --queue-size 65536                 # the queue row: 2B = 512, K = 65,536, blocked
    git show main:hscl_jax/losses.py > /tmp/old_losses.py    # a one-file version, or the
    python bench/losses.py --sizes 2048 --repeats 15 --compare-losses /tmp/old_losses.py
    python bench/losses.py --sizes 2048 --compare-losses /path/to/other/hscl_jax/losses  # package

For each 2B (number of views) it prints the median fwd+bwd time of H-SCL (beta = 1, d = 128,
positives="all") dense and blocked, and the ratio to a bare ``z @ z.T`` forward and backward at the
same size. The memory rows run loss+grad at 2B = 65,536, blocked and then dense, each in a fresh
process, and report that process's peak resident memory (``VmHWM``), which includes the
~0.3 GB of the Python + JAX runtime itself. On CPU the dense path walks the anchors in chunks and
never holds the (2B x 2B) matrix either; on an accelerator it would need 16 GiB for it.
The queue row runs the blocked loss+grad at 2B = 512 (batch 256) with a full queue of 65,536
labelled rows, also in a fresh process. The hardening rows time the dense path per hardening;
the first two run the very same code (the "exp" path, with ``queue=None``).

``--float32-limit`` prints, per temperature and beta (as multiples of
``losses.float32_beta_limit``), the worst relative error of float32 H-SCL gradients against
float64 on the same inputs, dense and blocked, over random batches and over the worst case we
found: embeddings collapsed into a cone whose spread of s over the negatives is about 1/beta.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from hscl_jax import losses

DIM = 128


def _batch(num_views: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(num_views, DIM)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=num_views // 2).astype(np.int32)
    half = num_views // 2
    return jnp.asarray(z[:half]), jnp.asarray(z[half:]), jnp.asarray(labels)


def _median_time(fn, *args, repeats: int) -> float:
    for _ in range(3):  # compile, then let thread pools and the allocator settle
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _loss_and_grad(block_size, **options):
    """jit(value_and_grad) of H-SCL; options replace beta=1 (a hardening, a queue...)."""
    options = options or {"beta": 1.0}

    def loss(z1, z2, labels, queue=None):
        return losses.hscl(z1, z2, labels, block_size=block_size, queue=queue, **options)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _queue(size: int, seed: int = 2) -> losses.Queue:
    z, _, labels = _batch(2 * size, seed)
    return losses.Queue(z, labels, jnp.ones((size,), bool))


@jax.jit
def _bare_matmul_fwd_bwd(z1, z2, cotangent):
    """z @ z.T forward and its backward for a fixed cotangent: the floor any loss pays."""
    z = jnp.concatenate([z1, z2])
    return jax.value_and_grad(lambda x: jnp.vdot(cotangent, x @ x.T))(z)


def _time_table(sizes, block_size, repeats):
    print(f"{'2B':>6} {'dense ms':>10} {'blocked ms':>11} {'z@z.T ms':>9} {'dense/z@z.T':>12}")
    for num_views in sizes:
        z1, z2, labels = _batch(num_views)
        cotangent = jnp.asarray(
            np.random.default_rng(1).normal(size=(num_views, num_views)).astype(np.float32)
        )
        bare = _median_time(_bare_matmul_fwd_bwd, z1, z2, cotangent, repeats=repeats)
        del cotangent
        dense = _median_time(_loss_and_grad(None), z1, z2, labels, repeats=repeats)
        blocked = _median_time(_loss_and_grad(block_size), z1, z2, labels, repeats=repeats)
        print(
            f"{num_views:>6} {dense * 1e3:>10.1f} {blocked * 1e3:>11.1f} {bare * 1e3:>9.1f}"
            f" {dense / bare:>12.2f}",
            flush=True,
        )


def _peak_resident_mb() -> float:
    """This process's peak resident memory since its exec.

    Linux's ``ru_maxrss`` also counts the parent's resident memory at fork time (the high-water
    mark survives exec), which after the timing table is over 1 GB; ``VmHWM`` is the new
    program's own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux units: KiB


def _hardening_rows(num_views: int, repeats: int) -> None:
    """Dense fwd+bwd per hardening; the first two rows run the very same code ("exp")."""
    z1, z2, labels = _batch(num_views)
    rows = (
        ("default (beta=1)", {}),
        ('hardening="exp", queue=None', {"beta": 1.0, "hardening": "exp", "queue": None}),
        ("callable lambda s: 1.0 * s", {"hardening": lambda s: 1.0 * s}),
        ('"poly", beta=1', {"hardening": "poly", "beta": 1.0}),
        ('"topk", top_k=64', {"hardening": "topk", "top_k": 64}),
    )
    print(f"dense fwd+bwd at 2B={num_views} per hardening (ms):")
    for name, options in rows:
        queue = options.pop("queue", None)
        fn = _loss_and_grad(None, **options)
        ms = _median_time(fn, z1, z2, labels, queue, repeats=repeats) * 1e3
        print(f"  {name:<30} {ms:>8.1f}", flush=True)


def _load_other_losses(path: str, copy_dir: str):
    """Another version of the losses as a module named ``other_losses``: a one-file losses.py,
    or a losses package folder, copied with its absolute imports renamed so that they do not
    resolve to this checkout's package."""
    if os.path.isdir(path):
        target = os.path.join(copy_dir, "other_losses")
        shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"))
        for name in os.listdir(target):
            if name.endswith(".py"):
                file = os.path.join(target, name)
                with open(file) as f:
                    source = f.read().replace("hscl_jax.losses", "other_losses")
                with open(file, "w") as f:
                    f.write(source)
        sys.path.insert(0, copy_dir)
        return importlib.import_module("other_losses")
    spec = importlib.util.spec_from_file_location("other_losses", path)
    other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = other  # dataclasses look their module up there
    spec.loader.exec_module(other)
    return other


def _compare_losses(other_path: str, num_views: int, block_size: int, repeats: int) -> None:
    """H-SCL fwd+bwd of another version of the losses (e.g. ``git show TAG:hscl_jax/losses.py``)
    and of this one, alternated in one process, so that load on a shared machine hits both
    alike."""
    with tempfile.TemporaryDirectory() as copy_dir:
        other = _load_other_losses(other_path, copy_dir)
    z1, z2, labels = _batch(num_views)
    fns = {}
    for name, module in (("other", other), ("this", losses)):
        for bs in (None, block_size):

            def loss(a, b, module=module, bs=bs):
                return module.hscl(a, b, labels, beta=1.0, block_size=bs)

            fns[name, bs] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    for fn in fns.values():
        for _ in range(3):
            jax.block_until_ready(fn(z1, z2))
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(z1, z2))
            times[key].append(time.perf_counter() - start)
    print(f"H-SCL beta=1 fwd+bwd at 2B={num_views}, {repeats} alternated calls each (ms):")
    for (name, bs), t in times.items():
        path = "dense" if bs is None else f"blocked ({bs})"
        low, mid = min(t) * 1e3, statistics.median(t) * 1e3
        print(f"  {name:<6} {path:<14} min {low:8.1f} median {mid:8.1f}")


def _memory_child(num_views: int, block_size: int, queue_size: int = 0) -> None:
    z1, z2, labels = _batch(num_views)
    queue = _queue(queue_size) if queue_size else None
    start = time.perf_counter()
    value, grads = _loss_and_grad(block_size or None)(z1, z2, labels, queue)
    jax.block_until_ready(grads)
    wall = time.perf_counter() - start
    peak_mb = _peak_resident_mb()
    print(f"{num_views} {block_size} {peak_mb:.0f} {wall:.1f} {float(value):.4f}")


def _memory_row(views: int, block_size: int, queue_size: int = 0) -> None:
    """Runs one loss+grad in a fresh process and prints its peak resident memory."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-child",
            f"--memory-views={views}",
            f"--memory-block-size={block_size}",
            f"--queue-size={queue_size}",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    views, block, peak_mb, wall, value = out[-5:]
    path = f"blocked (block_size={block})" if block_size else "dense"
    queue = f" with a queue of K={queue_size}" if queue_size else ""
    print(
        f"{path} loss+grad at 2B={views}{queue}: peak resident memory "
        f"{float(peak_mb) / 1024:.2f} GB, {wall} s, loss {value}",
        flush=True,
    )


def _flat_grads(z1, z2, labels, beta, temperature, block_size):
    def fn(a, b):
        return losses.hscl(a, b, labels, beta=beta, temperature=temperature, block_size=block_size)

    return jnp.concatenate([g.ravel() for g in jax.grad(fn, argnums=(0, 1))(z1, z2)])


_flat_grads_jit = jax.jit(_flat_grads, static_argnums=5)


def float32_relative_error(z1, z2, labels, beta, temperature, block_size=None) -> float:
    """||g32 - g64|| / ||g64|| of H-SCL's gradients (z1 and z2 together), g64 from the same
    float32 inputs in float64."""
    g32 = _flat_grads_jit(z1, z2, labels, np.float32(beta), np.float32(temperature), block_size)
    with jax.enable_x64(True):
        wide = (jnp.asarray(z, jnp.float64) for z in (z1, z2))
        g64 = np.asarray(
            _flat_grads_jit(*wide, labels, np.float64(beta), np.float64(temperature), block_size)
        )
    return float(np.linalg.norm(np.asarray(g32, np.float64) - g64) / np.linalg.norm(g64))


def collapsed_batch(seed, batch, dim, num_classes, temperature, beta, spread=1.0):
    """Two views of ``batch`` embeddings inside a cone around one axis, so narrow that the
    similarities over an anchor's negatives spread by about ``spread / beta``: the tilt weights
    are then neither uniform nor one-hot, and most sensitive to the rounding of s."""
    rng = np.random.default_rng(seed)
    radius = np.sqrt(spread * temperature / max(beta, 1e-9))
    axis = np.eye(dim)[0]

    def views():
        u = rng.normal(size=(batch, dim))
        u[:, 0] = 0.0
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        z = axis + radius * u * rng.uniform(0.5, 1.5, size=(batch, 1))
        return jnp.asarray(z / np.linalg.norm(z, axis=1, keepdims=True), jnp.float32)

    labels = jnp.asarray(np.arange(batch) % num_classes, jnp.int32)
    return views(), views(), labels


def _random_batch(seed, batch, dim, num_classes):
    rng = np.random.default_rng(seed)
    z1, z2 = (rng.normal(size=(batch, dim)) for _ in range(2))
    z1, z2 = (
        jnp.asarray(z / np.linalg.norm(z, axis=1, keepdims=True), jnp.float32) for z in (z1, z2)
    )
    return z1, z2, jnp.asarray(np.arange(batch) % num_classes, jnp.int32)


def _float32_limit_table(block_size: int = 16) -> None:
    shapes = ((16, 32, 4), (64, 16, 4), (128, 128, 10))
    print(f"float32 vs float64 H-SCL gradient error (worst over shapes {shapes}, 3 seeds)")
    print(
        f"{'t':>5} {'beta':>8} {'x limit':>8} {'random dense':>13} {'random blocked':>15}"
        f" {'collapsed dense':>16} {'collapsed blocked':>18}"
    )
    for t in (0.05, 0.2, 0.5, 1.0):
        limit = losses.float32_beta_limit(t)
        for factor in (0.5, 1.0, 2.0, 10.0):
            beta = factor * limit
            worst = np.zeros(4)
            for batch, dim, classes in shapes:
                for seed in range(3):
                    for kind, make in enumerate((_random_batch, collapsed_batch)):
                        args = (t, beta, 0.3 + seed) if kind else ()
                        batch_data = make(seed, batch, dim, classes, *args)
                        for j, bs in enumerate((None, block_size)):
                            err = float32_relative_error(*batch_data, beta, t, bs)
                            worst[2 * kind + j] = max(worst[2 * kind + j], err)
            print(
                f"{t:>5} {beta:>8.4g} {factor:>8} {worst[0]:>13.1e} {worst[1]:>15.1e}"
                f" {worst[2]:>16.1e} {worst[3]:>18.1e}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--memory-views", type=int, default=65536)
    parser.add_argument("--memory-block-size", type=int, default=1024)
    parser.add_argument("--no-dense-memory", action="store_true", help="skip the dense memory row")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--float32-limit", action="store_true", help="the float32 accuracy table")
    parser.add_argument(
        "--hardening-views", type=int, help="2B of the hardening rows (largest size; 0: none)"
    )
    parser.add_argument("--queue-size", type=int, default=0, help="K of the queue row (0: none)")
    parser.add_argument("--queue-views", type=int, default=512, help="2B of the queue row")
    parser.add_argument("--compare-losses", help="path of another losses.py to time against")
    args = parser.parse_args()
    if args.compare_losses:
        _compare_losses(args.compare_losses, max(args.sizes), args.block_size, args.repeats)
        return
    if args.float32_limit:
        _float32_limit_table()
        return
    if args.memory_child:
        _memory_child(args.memory_views, args.memory_block_size, args.queue_size)
        return

    print(
        f"H-SCL beta=1 fwd+bwd, d={DIM}, float32, jax {jax.__version__}, "
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
        f"blocked block_size={args.block_size}"
    )
    _time_table(args.sizes, args.block_size, args.repeats)
    hardening_views = max(args.sizes) if args.hardening_views is None else args.hardening_views
    if hardening_views:
        _hardening_rows(hardening_views, args.repeats)
    if args.no_memory:
        return
    for block_size in (args.memory_block_size, 0)[: 1 if args.no_dense_memory else 2]:
        _memory_row(args.memory_views, block_size)
    if args.queue_size:
        _memory_row(args.queue_views, args.memory_block_size, args.queue_size)


if __name__ == "__main__":
    main()
