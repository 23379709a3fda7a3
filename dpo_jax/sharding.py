"""The device mesh and the logical-axis rules that place params and batches on it.

Axis types: the mesh is made with `AxisType.Auto` on every axis, on purpose. The step is written
in the GSPMD style: params, optimizer state and batch are placed by `NamedSharding`s given to
`jax.jit` as in/out shardings, and XLA's partitioner propagates them through the model. Explicit
axes (jax 0.10's `make_mesh` default) would make sharding part of every array's type and require
each op in the models to be written for it (`out_sharding=` on einsums, explicit reshards); Auto
keeps the models free of sharding code and makes plain `with_sharding_constraint` work.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# A batch row (one preference pair or one packed row of pairs) lives on one (data, fsdp) shard;
# its chosen/rejected axis and its tokens are never split, so a pair never crosses devices.
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Sizes of the (data, fsdp, tensor) axes, one -1 standing for "all remaining devices".

    Raises:
      ValueError: on more than one -1, a size < 1 otherwise, or a product != num_devices.
    """
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {sizes}: at most one axis may be -1 (found {free})")
    bad = {name: size for name, size in sizes.items() if size != -1 and size < 1}
    if bad:
        raise ValueError(f"mesh {sizes}: axis sizes must be >= 1 or -1, got {bad}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {sizes}: {num_devices} devices are not divisible by the fixed axes' "
                f"product {fixed}, so '{free[0]}'=-1 has no integer size"
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are used"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(
    data: int, fsdp: int, tensor: int, *, num_devices: int = -1, devices: Sequence | None = None
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types (see the module docstring).

    Args:
      data: the "data" axis size; one of the three sizes may be -1 for "the remaining
        devices".
      fsdp: the "fsdp" axis size.
      tensor: the "tensor" axis size.
      num_devices: use the first `num_devices` devices (-1: all of them).
      devices: the devices to choose from (default `jax.devices()`).

    Raises:
      ValueError: if the sizes do not multiply to the number of devices used.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices != -1:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"mesh.num_devices={num_devices} must be -1 or in [1, {len(devices)}]")
        devices = devices[:num_devices]
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def _mesh_axes_of(logical: str | None, rules: dict, where: str):
    if logical is None:
        return None
    if logical not in rules:
        raise ValueError(
            f"{where}: no sharding rule for logical axis {logical!r} "
            f"(rules cover: {sorted(rules)}); add one to config.mesh.rules"
        )
    return rules[logical]


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules, name: str
) -> PartitionSpec:
    """The PartitionSpec of one array from the logical names of its dimensions.

    Args:
      logical_axes: one logical name (or None: replicated) per dimension.
      shape: the array's shape.
      mesh: the mesh whose axes the rules name.
      rules: (logical name, mesh axis | tuple of mesh axes | None) pairs.
      name: the array's path, for error messages.

    Raises:
      ValueError: a logical name no rule matches, a rank mismatch, a mesh axis used twice, or a
        dimension not divisible by the product of its mesh axes' sizes.
    """
    where = f"param {name} with shape {tuple(shape)} and logical axes {tuple(logical_axes)}"
    if len(logical_axes) != len(shape):
        raise ValueError(f"{where}: {len(logical_axes)} logical axes for {len(shape)} dimensions")
    rules = dict(rules)
    spec, used = [], []
    for dim, logical in zip(shape, logical_axes, strict=True):
        mesh_axes = _mesh_axes_of(logical, rules, where)
        axes = (
            () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
        )
        unknown = [axis for axis in axes if axis not in mesh.shape]
        if unknown:
            raise ValueError(f"{where}: rule {logical!r} -> {mesh_axes} names unknown mesh axes")
        # A mesh axis may shard only one dimension of an array; a later dimension that would reuse
        # it stays replicated along it (e.g. heads and kv_heads both -> tensor in one array).
        axes = tuple(axis for axis in axes if axis not in used)
        size = math.prod(mesh.shape[axis] for axis in axes)
        if dim % size:
            raise ValueError(
                f"{where}: dimension {logical!r} of size {dim} is not divisible by mesh axes "
                f"{axes} of total size {size}"
            )
        used.extend(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_to_sharding(logical_axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding tree for a param tree, from its tree of logical axis names.

    Args:
      logical_axes_tree: a pytree like the params whose leaves are tuples of logical names
        (tuples are leaves here, not nodes).
      shapes_tree: the params (arrays or `jax.ShapeDtypeStruct`s), same structure.
      mesh: the device mesh.
      rules: (logical name, mesh axes) pairs, e.g. config.mesh.rules.

    Returns:
      A pytree of NamedSharding with the structure of shapes_tree.

    Raises:
      ValueError: as `logical_to_spec`, naming the param by its path.
    """
    flat_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes_tree)
    flat_axes = treedef.flatten_up_to(_tuples_as_leaves(logical_axes_tree))
    shardings = [
        NamedSharding(
            mesh, logical_to_spec(axes, leaf.shape, mesh, rules, jax.tree_util.keystr(path))
        )
        for (path, leaf), axes in zip(flat_shapes, flat_axes, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, shardings)


def _tuples_as_leaves(tree: Any) -> Any:
    """Wraps each tuple of logical names so tree utilities treat it as one leaf."""
    return jax.tree.map(
        lambda axes: _Axes(axes),
        tree,
        is_leaf=lambda node: (
            isinstance(node, tuple) and all(axis is None or isinstance(axis, str) for axis in node)
        ),
    )


class _Axes(tuple):
    """A tuple of logical axis names; an unregistered tuple subclass, so a pytree leaf."""


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises ValueError unless `batch_size` is divisible by data × fsdp.

    Raises:
      ValueError: naming both numbers.
    """
    shards = num_batch_shards(mesh)
    if batch_size % shards:
        raise ValueError(
            f"{what}={batch_size} must be divisible by the batch shards data × fsdp = "
            f"{mesh.shape['data']} × {mesh.shape['fsdp']} = {shards}"
        )


def num_batch_shards(mesh: Mesh) -> int:
    """data × fsdp: how many ways the batch axis is split."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch array [B, ...]: B over (data, fsdp), every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding (scalars, the rng key, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_shardings(batch: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """batch_sharding for each array of a batch dict (by its rank)."""
    return {key: batch_sharding(mesh, np.ndim(value)) for key, value in batch.items()}


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch (the global batch on one process, this host's rows on several).

    Raises:
      ValueError: if the batch size is not divisible by data × fsdp.
    """
    first = next(iter(batch.values()))
    check_batch_size(np.shape(first)[0] * jax.process_count(), mesh)
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), value)
        for key, value in batch.items()
    }
