"""The loss over several devices: ``jax.pmap``, ``jax.jit`` over a mesh, and ``jax.shard_map``.

    python examples/sharded_loss.py               # 8 devices, global batch 512
    python examples/sharded_loss.py --batch=64    # a quick run

On a CPU the script asks XLA for 8 fake devices (``--devices``) before JAX starts. Each pattern
computes the H-SCL loss and its gradient with respect to both views' projections of one global
batch split over the devices, and prints the loss and the largest difference from one device's
gradient on the whole batch, relative to the largest gradient entry::

    one device: loss <value>
    pmap: loss <value> gradient difference <relative>
    jit over a mesh of Auto axes: loss <value> gradient difference <relative>
    shard_map, gradient inside (check_vma=False): loss <value> gradient difference <relative>

The three patterns:

* ``jax.pmap`` with ``axis_name``: the loss all-gathers the other devices' projections, every
  device returns the global loss, and its gradient is its own slice of the global gradient.
* ``jax.jit`` on arrays sharded over a mesh whose axes are ``AxisType.Auto``: the call is the
  one-device call, and XLA's partitioner spreads it over the devices.
* ``jax.shard_map`` with ``axis_name`` and the gradient taken inside the mapped function, as
  under ``pmap``. It runs with ``check_vma=False`` here: the losses' custom gradient does not yet
  type-check under the default ``check_vma=True``. Taking ``jax.grad`` outside a
  ``shard_map(..., check_vma=False)`` loss is wrong (the gradient comes out 1/n of the true
  one, silently): keep the gradient inside.
"""

from __future__ import annotations

import argparse
import os


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512, help="global batch (2 views each)")
    parser.add_argument("--dim", type=int, default=64, help="projection dimension")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices to ask for")
    return parser.parse_args()


args = parse_args()
# Before jax is imported: the number of CPU devices is fixed when the backend starts.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hscl_jax import losses  # noqa: E402


def hscl(z1: jax.Array, z2: jax.Array, labels: jax.Array, axis_name: str | None = None):
    return losses.hscl(z1, z2, labels, beta=1.0, axis_name=axis_name)


def loss_and_grads(z1: jax.Array, z2: jax.Array, labels: jax.Array, axis_name: str | None = None):
    """(loss, (dL/dz1, dL/dz2)); with ``axis_name``, this device's slice of the global gradient."""
    return jax.value_and_grad(hscl, argnums=(0, 1))(z1, z2, labels, axis_name)


def report(name: str, loss: jax.Array, grads: tuple, expected_grads: tuple) -> None:
    """Prints the loss and the largest gradient difference, relative to the largest gradient."""
    scale = max(float(jnp.max(jnp.abs(e))) for e in expected_grads)
    diff = max(
        float(jnp.max(jnp.abs(jnp.asarray(g).reshape(e.shape) - e)))
        for g, e in zip(grads, expected_grads, strict=True)
    )
    first = float(np.asarray(loss).reshape(-1)[0])
    print(f"{name}: loss {first:.6f} gradient difference {diff / scale:.1e}")


def main() -> None:
    n = jax.device_count()
    if args.batch % n:
        raise SystemExit(f"error: --batch={args.batch} is not a multiple of the {n} devices")
    rng = np.random.default_rng(0)
    z1, z2 = (rng.normal(size=(args.batch, args.dim)).astype(np.float32) for _ in range(2))
    z1, z2 = (z / np.linalg.norm(z, axis=1, keepdims=True) for z in (z1, z2))
    labels = (np.arange(args.batch) % 10).astype(np.int32)

    loss, grads = jax.jit(loss_and_grads)(z1, z2, labels)
    print(f"one device: loss {float(loss):.6f} ({n} devices below)")

    # jax.pmap: a leading device axis; every device returns the global loss.
    def per_device(x):
        return x.reshape(n, args.batch // n, *x.shape[1:])

    pmapped = jax.pmap(lambda a, b, c: loss_and_grads(a, b, c, "data"), axis_name="data")
    pmap_loss, pmap_grads = pmapped(per_device(z1), per_device(z2), per_device(labels))
    report("pmap", pmap_loss, pmap_grads, grads)

    # jax.jit over a mesh of Auto axes: shard the inputs, call the one-device function.
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    sharded = [jax.device_put(x, rows) for x in (z1, z2, labels)]
    jit_loss, jit_grads = jax.jit(loss_and_grads)(*sharded)
    report("jit over a mesh of Auto axes", jit_loss, jit_grads, grads)

    # jax.shard_map, the gradient inside (as under pmap); the loss comes out replicated.
    mapped = jax.shard_map(
        lambda a, b, c: loss_and_grads(a, b, c, "data"),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P("data")),
        out_specs=(P(), (P("data"), P("data"))),
        check_vma=False,
    )
    shard_loss, shard_grads = jax.jit(mapped)(*sharded)
    # On CPU, wait for each call to finish before the next (XLA:CPU all-gather rendezvous).
    jax.block_until_ready(shard_grads)
    report("shard_map, gradient inside (check_vma=False)", shard_loss, shard_grads, grads)


if __name__ == "__main__":
    main()
