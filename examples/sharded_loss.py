"""The loss over several devices: ``jax.shard_map``, ``jax.jit`` over a mesh, and ``jax.pmap``.

    python examples/sharded_loss.py               # 8 devices, global batch 512
    python examples/sharded_loss.py --batch=64    # a quick run

On a CPU the script asks XLA for 8 fake devices (``--devices``) before JAX starts. A linear
embedding ``w`` (the parameters, replicated on every device) maps two views of a global batch of
features to unit-norm projections; each pattern computes the H-SCL loss of the batch split over
the devices and its gradient with respect to ``w``, and prints the loss and its relative error
and the gradient's (the largest difference from one device on the whole batch, relative to the
largest entry)::

    one device: loss <value> (<n> devices below)
    shard_map, gradient inside: loss <value> relative error: loss <e> gradient <e>
    grad of a shard_map loss: loss <value> relative error: loss <e> gradient <e>
    jit over a mesh of Auto axes: loss <value> relative error: loss <e> gradient <e>
    jit over a mesh of Explicit axes: loss <value> relative error: loss <e> gradient <e>
    pmap, gradient summed: loss <value> relative error: loss <e> gradient <e>

The patterns (docs/parallelism.md has them all, and why):

* ``jax.shard_map`` with its default ``check_vma=True``, gradient taken inside: JAX types ``w``
  as replicated and the batch as split, so the gradient of ``w`` comes back global (typed
  replicated: ``out_specs=P()`` is legal) with no ``psum`` of ours.
* ``jax.grad`` of a ``jax.shard_map(..., out_specs=P())`` loss: the loss is typed replicated,
  so the gradient taken from outside is the global one too.
* ``jax.jit`` on arrays sharded over a mesh, with no ``axis_name``: with ``AxisType.Auto`` XLA
  partitions the one-device program; with ``AxisType.Explicit`` (``jax.make_mesh``'s default on
  recent JAX) the loss reads the batch's sharding and runs itself inside ``shard_map``.
* ``jax.pmap`` with ``axis_name``: nothing is typed, each device's gradient of ``w`` is its own
  share, and the shares are summed with ``jax.lax.psum``.

Taking ``jax.grad`` outside a ``shard_map(..., check_vma=False)`` loss is wrong (the gradient
comes out 1/n of the true one, silently); without ``check_vma`` take it inside and ``psum`` it,
as under pmap.
"""

from __future__ import annotations

import argparse
import functools
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

AXIS = "data"


def embed(w: jax.Array, x: jax.Array) -> jax.Array:
    """Unit-norm projections ``x @ w``: the stand-in for a network with parameters ``w``."""
    z = x @ w
    return z / jnp.linalg.norm(z, axis=1, keepdims=True)


def hscl(w, x1, x2, labels, axis_name: str | None = None) -> jax.Array:
    """The H-SCL loss of the batch (this device's share of it, with ``axis_name``)."""
    return losses.hscl(embed(w, x1), embed(w, x2), labels, beta=1.0, axis_name=axis_name)


def report(name: str, loss: jax.Array, grad: jax.Array, expected: tuple) -> None:
    """Prints the loss and the relative errors of loss and gradient against ``expected``."""
    expected_loss, expected_grad = (np.asarray(x) for x in expected)
    loss = float(np.asarray(loss).reshape(-1)[0])  # pmap: one copy per device
    grad = np.asarray(grad).reshape(-1, *expected_grad.shape)[0]
    loss_error = abs(loss - expected_loss) / abs(expected_loss)
    grad_error = np.max(np.abs(grad - expected_grad)) / np.max(np.abs(expected_grad))
    print(
        f"{name}: loss {loss:.6f} relative error: loss {loss_error:.1e} gradient {grad_error:.1e}"
    )


def main() -> None:
    n = jax.device_count()
    if args.batch % n:
        raise SystemExit(f"error: --batch={args.batch} is not a multiple of the {n} devices")
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(2 * args.dim, args.dim)) / np.sqrt(2 * args.dim)).astype(np.float32)
    x1, x2 = (rng.normal(size=(args.batch, 2 * args.dim)).astype(np.float32) for _ in range(2))
    labels = (np.arange(args.batch) % 10).astype(np.int32)
    loss_and_grad = jax.value_and_grad(hscl)

    expected = jax.jit(loss_and_grad)(w, x1, x2, labels)
    print(f"one device: loss {float(expected[0]):.6f} ({n} devices below)")

    mesh = jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,))
    rows, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    sharded = (jax.device_put(w, replicated), *(jax.device_put(a, rows) for a in (x1, x2, labels)))
    specs = (P(), P(AXIS), P(AXIS), P(AXIS))

    # shard_map (check_vma=True, the default), the gradient inside. On CPU each call waits for
    # its results (XLA:CPU's all-gather rendezvous can hang when calls pile up).
    inside = jax.shard_map(
        functools.partial(loss_and_grad, axis_name=AXIS),
        mesh=mesh,
        in_specs=specs,
        out_specs=(P(), P()),  # loss and gradient of w: both global, typed replicated
    )
    report(
        "shard_map, gradient inside", *jax.block_until_ready(jax.jit(inside)(*sharded)), expected
    )

    # jax.grad of a shard_map loss whose out_specs say it is replicated.
    global_loss = jax.shard_map(
        functools.partial(hscl, axis_name=AXIS), mesh=mesh, in_specs=specs, out_specs=P()
    )
    outside = jax.jit(jax.value_and_grad(global_loss))(*sharded)
    report("grad of a shard_map loss", *jax.block_until_ready(outside), expected)

    # jax.jit over a mesh: the one-device function on sharded inputs, no axis_name.
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        typed_mesh = jax.make_mesh((n,), (AXIS,), axis_types=(axis_type,))
        on_mesh = [
            jax.device_put(a, NamedSharding(typed_mesh, spec))
            for a, spec in zip((w, x1, x2, labels), specs, strict=True)
        ]
        result = jax.jit(loss_and_grad)(*on_mesh)
        report(f"jit over a mesh of {axis_type.name} axes", *result, expected)

    # jax.pmap: a leading device axis; each device's gradient of w is its share: sum them.
    def per_device(w, a, b, y):
        loss, grad = loss_and_grad(w, a, b, y, axis_name=AXIS)
        return loss, jax.lax.psum(grad, AXIS)

    def split(x):
        return x.reshape(n, args.batch // n, *x.shape[1:])

    stacked_w = np.broadcast_to(w, (n, *w.shape))
    pmapped = jax.pmap(per_device, axis_name=AXIS)(stacked_w, split(x1), split(x2), split(labels))
    report("pmap, gradient summed", *pmapped, expected)


if __name__ == "__main__":
    main()
