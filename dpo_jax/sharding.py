"""The device mesh and the logical-axis rules that place params and batches on it.

Axis types: the mesh is made with `AxisType.Auto` on every axis, on purpose. The step is written
in the GSPMD style: params, optimizer state and batch are placed by `NamedSharding`s given to
`jax.jit` as in/out shardings, and XLA's partitioner propagates them through the model. Explicit
axes (jax 0.10's `make_mesh` default) would make sharding part of every array's type and require
each op in the models to be written for it (`out_sharding=` on einsums, explicit reshards); Auto
keeps the models almost free of sharding code (context parallelism's `shard_map`s and the
residual stream's constraint under a sequence axis are the exceptions) and makes plain
`with_sharding_constraint` work.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
# A batch row (one preference pair or one packed row of pairs) lives on one (data, fsdp) shard;
# its chosen/rejected axis is never split, so a pair's two rows stay on the same devices.
BATCH_AXES = ("data", "fsdp")
# Context parallelism: the token axis T of every row (and of every activation [N, T, ...]) is
# split over "sequence"; attention gathers keys and values along it (`models.context_parallel`).
SEQUENCE_AXIS = "sequence"
# The batch arrays whose last axis is the token axis T ([B, 2, T]), split over SEQUENCE_AXIS.
TOKEN_KEYS = ("tokens", "response_mask", "positions", "segment_ids")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Sizes of the mesh axes (MESH_AXES; an axis not given is 1), one -1 standing for "all
    remaining devices".

    Args:
      sizes: {axis name: size}, e.g. {"data": -1, "fsdp": 1, "tensor": 1}.
      num_devices: the devices the mesh must use.

    Returns:
      {axis: size} for every axis of MESH_AXES, in that order.

    Raises:
      ValueError: on an unknown axis, more than one -1, a size < 1 otherwise, or a product !=
        num_devices.
    """
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh {sizes}: unknown axes {unknown}; the axes are {MESH_AXES}")
    sizes = {name: sizes.get(name, 1) for name in MESH_AXES}
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
    return sizes


def make_mesh(
    data: int,
    fsdp: int,
    tensor: int,
    *,
    sequence: int = 1,
    num_devices: int = -1,
    devices: Sequence | None = None,
) -> Mesh:
    """A MESH_AXES mesh ("data", "fsdp", "sequence", "tensor") with Auto axis types (see the
    module docstring).

    Args:
      data: the "data" axis size; one of the four sizes may be -1 for "the remaining
        devices".
      fsdp: the "fsdp" axis size.
      tensor: the "tensor" axis size.
      sequence: the "sequence" axis size (context parallelism; 1: rows are not split).
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
    sizes = dict(data=data, fsdp=fsdp, sequence=sequence, tensor=tensor)
    shape = resolve_mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        tuple(shape.values()),
        MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def sequence_shards(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """The size of the mesh's SEQUENCE_AXIS (1 for a mesh without one or no mesh)."""
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[SEQUENCE_AXIS]


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


def batch_axes_of(mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[str, ...]:
    """The batch axes (BATCH_AXES) the mesh has, for the PartitionSpecs of `shard_map`s."""
    return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def split_rows_spec(mesh: Mesh | jax.sharding.AbstractMesh, ndim: int) -> PartitionSpec:
    """[N, T, ...] of `ndim` axes split as context parallelism splits rows: N over the batch
    axes, T over "sequence", the rest whole."""
    return PartitionSpec(batch_axes_of(mesh), SEQUENCE_AXIS, *([None] * (ndim - 2)))


def constrain_split_rows(x: jax.Array) -> jax.Array:
    """Under context parallelism (the mesh in context has "sequence" > 1), pins an activation
    [N, T, ...] to rows over the batch axes and T over "sequence"; else returns x as it is.

    XLA's propagation alone let the layers' activations drift to whole rows (it all-gathered
    [N, T, D] around the attention's shard_map); pinning the residual stream keeps them split.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if sequence_shards(mesh) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, split_rows_spec(mesh, x.ndim)))


def batch_spec(mesh: Mesh, ndim: int, *, token_axis: bool = False) -> PartitionSpec:
    """[B, ...] over (data, fsdp); with `token_axis`, the last axis (T) over "sequence" too."""
    spec = [BATCH_AXES, *([None] * (ndim - 1))]
    if token_axis and sequence_shards(mesh) > 1:
        spec[-1] = SEQUENCE_AXIS
    return PartitionSpec(*spec)


def batch_sharding(mesh: Mesh, ndim: int, *, token_axis: bool = False) -> NamedSharding:
    """Sharding of a batch array [B, ...]: see `batch_spec`."""
    return NamedSharding(mesh, batch_spec(mesh, ndim, token_axis=token_axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding (scalars, the rng key, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_shardings(batch: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """batch_sharding for each array of a batch dict (by its rank; TOKEN_KEYS split along T)."""
    return {
        key: batch_sharding(mesh, np.ndim(value), token_axis=key in TOKEN_KEYS)
        for key, value in batch.items()
    }


def check_row_length(
    length: int, mesh: Mesh, what: str = "config.data.max_length", block_size: int = 0
) -> None:
    """Raises ValueError unless a row of `length` tokens splits into 2 x "sequence" equal blocks
    (each shard holds two of them: `models.context_parallel`'s zigzag layout), and `block_size`
    (config.model.attention_block_size; 0: none) divides such a block.

    Raises:
      ValueError: naming both numbers.
    """
    shards = sequence_shards(mesh)
    if shards == 1:
        return
    if length % (2 * shards):
        raise ValueError(
            f"{what}={length} tokens a row must be divisible by 2 x the mesh's sequence axis "
            f"({2 * shards}): each shard holds two equal blocks of every row"
        )
    if block_size and (length // (2 * shards)) % block_size:
        raise ValueError(
            f"config.model.attention_block_size={block_size} must divide the "
            f"{length // (2 * shards)} tokens of each of a row's {2 * shards} zigzag blocks"
        )


def row_group(mesh: Mesh) -> tuple[int, int]:
    """(index, count): which of the batch's row blocks this process reads, and how many blocks.

    A process reads the rows its devices hold along the batch axes (data, fsdp). When the
    "sequence" (or "tensor") axis spans hosts, several processes hold the same rows, each
    device a slice of their tokens: those processes form one group and read the same rows
    (the whole rows; each device takes its slice in `put_batch`). Otherwise every process is
    its own group: (jax.process_index(), jax.process_count()).

    Raises:
      ValueError: if the processes' rows are not equal, disjoint, contiguous blocks (a device
        order `make_mesh` does not give).
    """
    if jax.process_count() == 1:
        return 0, 1
    data, fsdp = (mesh.axis_names.index(axis) for axis in BATCH_AXES)
    shards_of: dict[int, set[int]] = {}
    for coords in np.ndindex(mesh.devices.shape):
        shard = coords[data] * mesh.devices.shape[fsdp] + coords[fsdp]
        shards_of.setdefault(mesh.devices[coords].process_index, set()).add(shard)
    groups = sorted({tuple(sorted(shards)) for shards in shards_of.values()})
    size = len(groups[0])
    if any(group != tuple(range(i * size, (i + 1) * size)) for i, group in enumerate(groups)):
        raise ValueError(
            f"mesh {dict(mesh.shape)}: the processes' batch rows are not equal contiguous blocks "
            f"(batch shards of each process: {dict(sorted(shards_of.items()))})"
        )
    return groups.index(tuple(sorted(shards_of[jax.process_index()]))), len(groups)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch (the global batch on one process, this process's rows on several:
    its `row_group`'s block, whole rows).

    Token arrays (TOKEN_KEYS) are split along T over "sequence" as well: each process passes
    whole rows and each of its devices takes its slice of T.

    Raises:
      ValueError: if the batch size is not divisible by data × fsdp, or the row length by the
        sequence axis.
    """
    first = next(iter(batch.values()))
    _, num_groups = row_group(mesh)
    global_rows = np.shape(first)[0] * num_groups
    check_batch_size(global_rows, mesh)
    if "tokens" in batch:
        check_row_length(np.shape(batch["tokens"])[-1], mesh, what="batch['tokens'] length")
    shardings = batch_shardings(batch, mesh)
    return {
        key: jax.make_array_from_process_local_data(
            shardings[key], value, (global_rows, *np.shape(value)[1:])
        )
        for key, value in batch.items()
    }
