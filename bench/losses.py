"""Benchmark of the H-SCL kernel: fwd+bwd time, dense and blocked, and peak memory of blocked.

    python bench/losses.py                 # the table of the README (a few minutes on 2 CPU cores)
    python bench/losses.py --sizes 512 2048 --no-memory

For each 2B (number of views) it prints the median fwd+bwd time of H-SCL (beta = 1, d = 128,
positives="all") dense and blocked, and the ratio to a bare ``z @ z.T`` forward and backward at the
same size. The memory rows run loss+grad at 2B = 65,536, blocked and then dense, each in a fresh
process, and report that process's peak resident memory (``VmHWM``), which includes the
~0.3 GB of the Python + JAX runtime itself. On CPU the dense path walks the anchors in chunks and
never holds the (2B x 2B) matrix either; on an accelerator it would need 16 GiB for it.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
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


def _loss_and_grad(block_size):
    def loss(z1, z2, labels):
        return losses.hscl(z1, z2, labels, beta=1.0, block_size=block_size)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


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


def _memory_child(num_views: int, block_size: int) -> None:
    z1, z2, labels = _batch(num_views)
    start = time.perf_counter()
    value, grads = _loss_and_grad(block_size or None)(z1, z2, labels)
    jax.block_until_ready(grads)
    wall = time.perf_counter() - start
    peak_mb = _peak_resident_mb()
    print(f"{num_views} {block_size} {peak_mb:.0f} {wall:.1f} {float(value):.4f}")


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
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_views, args.memory_block_size)
        return

    print(
        f"H-SCL beta=1 fwd+bwd, d={DIM}, float32, jax {jax.__version__}, "
        f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
        f"blocked block_size={args.block_size}"
    )
    _time_table(args.sizes, args.block_size, args.repeats)
    if args.no_memory:
        return
    for block_size in (args.memory_block_size, 0)[: 1 if args.no_dense_memory else 2]:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                f"--memory-views={args.memory_views}",
                f"--memory-block-size={block_size}",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        views, block, peak_mb, wall, value = out[-5:]
        path = f"blocked (block_size={block})" if block_size else "dense"
        print(
            f"{path} loss+grad at 2B={views}: peak resident memory "
            f"{float(peak_mb) / 1024:.2f} GB, {wall} s, loss {value}",
            flush=True,
        )


if __name__ == "__main__":
    main()
