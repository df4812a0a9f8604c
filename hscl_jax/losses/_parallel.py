"""The batch split over devices: typing of values that vary over mesh axes, the global mean, and
the losses on inputs sharded over a mesh of Explicit axes (``docs/parallelism.md``).

Inside ``jax.shard_map`` with ``check_vma=True`` every value carries the set of mesh axes it
varies over, and JAX checks it: a ``psum`` is typed invariant (replicated) and transposes
correctly, a scan carry must keep its type, and a custom VJP must return a cotangent of its
primal's type. Under ``jax.pmap`` and ``check_vma=False`` that set is empty: nothing is typed, and
``psum`` transposes into another ``psum``.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from hscl_jax.losses._spec import Array


def varying_axes(x: Any) -> frozenset[Any]:
    """The mesh axes ``x`` is typed as varying over; empty outside a typed ``shard_map``."""
    aval = jax.typeof(x)
    manual = getattr(aval, "mat", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def tree_varying_axes(tree: Any) -> frozenset[Any]:
    """The union of the varying axes of every leaf of ``tree``."""
    axes: frozenset[Any] = frozenset()
    for leaf in jax.tree.leaves(tree):
        axes |= varying_axes(leaf)
    return axes


def vary(tree: Any, axes: frozenset[Any]) -> Any:
    """``tree`` typed as varying over ``axes`` (a scan carry that its body makes varying)."""

    def cast(leaf: Any) -> Any:
        missing = tuple(sorted(axes - varying_axes(leaf), key=str))
        return lax.pcast(leaf, missing, to="varying") if missing else leaf

    return jax.tree.map(cast, tree) if axes else tree


def sum_to_primal_type(cotangent: Array, primal: Any) -> Array:
    """A cotangent summed over the axes it varies over and its primal does not: the gradient of a
    replicated input (beta, the temperature) used on every device is the sum of their parts."""
    extra = tuple(sorted(varying_axes(cotangent) - varying_axes(primal), key=str))
    return lax.psum(cotangent, extra) if extra else cotangent


def axis_names(axis_name: Any) -> tuple[Any, ...]:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def check_split(z: Any, axis_name: Any) -> None:
    """Refuses a batch that a typed ``shard_map`` holds whole on every device of ``axis_name``:
    contrasting it with its own all-gathered copies would count every image once per device."""
    names = set(axis_names(axis_name))
    typed = names <= varying_axes(lax.axis_index(axis_name))
    if typed and not names <= varying_axes(z):
        raise ValueError(
            f"the embeddings are replicated over axis_name={axis_name!r} (shard_map in_specs "
            f"without it): split the batch over it, e.g. in_specs=P({axis_name!r}), or call the "
            "loss without axis_name"
        )


def global_mean(total: Array, count: Array, axis_name: Any) -> Array:
    """The mean over every device's anchors of the loss, from this device's total and count.

    Typed (inside ``shard_map`` with ``check_vma=True``): ``psum(total) / psum(count)``, typed
    replicated; its transpose hands each device the cotangent of its own total, and the
    ``all_gather`` of the views transposes into the sum over devices of their parts, so each
    device holds its slice of the global gradient, and a ``shard_map`` with ``out_specs=P()`` is
    legal and differentiable from outside. Untyped (``pmap``, ``check_vma=False``): ``psum``
    would transpose into another ``psum`` and count every gradient once per device, so the
    gradient flows through this device's own share only and the global value is added as a
    constant.
    """
    if axis_name is None:
        return total / lax.stop_gradient(jnp.maximum(count, 1.0))
    global_total, global_count = cast(tuple[Array, Array], lax.psum((total, count), axis_name))
    denom = lax.stop_gradient(jnp.maximum(global_count, 1.0))
    if set(axis_names(axis_name)) & varying_axes(total):
        return global_total / denom
    local_loss = total / denom
    return local_loss + lax.stop_gradient(global_total / denom - local_loss)


def explicit_batch_axes(z: Any) -> tuple[Any, ...]:
    """The Explicit mesh axes that shard axis 0 (the batch) of ``z``; () when there are none."""
    sharding = getattr(jax.typeof(z), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or mesh is None or not mesh.axis_names or not len(sharding.spec):
        return ()
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    entry = sharding.spec[0]
    names = entry if isinstance(entry, tuple) else () if entry is None else (entry,)
    return tuple(name for name in names if types[name] == AxisType.Explicit)


def on_explicit_mesh(
    fn: Any, batch_axes: tuple[Any, ...], batch_args: tuple[Any, ...], replicated_args: Any
) -> Any:
    """``fn(axis_name, *batch_args, replicated_args)`` run per device by ``jax.shard_map`` over
    the mesh that shards the first of ``batch_args``, with ``batch_axes`` as its axis_name.

    The batch arguments are resharded to be split over ``batch_axes`` along axis 0 and
    replicated along their other axes and over the mesh's other axes; the other arguments to be
    replicated. ``fn`` returns values typed replicated (the global loss), so the output needs no
    gathering.
    """
    mesh = jax.typeof(batch_args[0]).sharding.mesh
    batch_spec = PartitionSpec(batch_axes)

    def reshard(x: Any, spec: PartitionSpec) -> Any:
        if x is None:
            return None
        return jax.sharding.reshard(jnp.asarray(x), NamedSharding(mesh, spec))

    batch_args = tuple(reshard(x, batch_spec) for x in batch_args)
    replicated_args = jax.tree.map(lambda x: reshard(x, PartitionSpec()), replicated_args)
    axis_name = batch_axes[0] if len(batch_axes) == 1 else batch_axes

    def per_device(*args: Any) -> Any:
        return fn(axis_name, *args)

    mapped = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(*(batch_spec for _ in batch_args), PartitionSpec()),
        out_specs=PartitionSpec(),
    )
    return mapped(*batch_args, replicated_args)
