"""The mesh from config sizes, logical-axis rules to NamedShardings, and batch placement."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from dpo_jax import sharding

RULES = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
)


@pytest.mark.parametrize(
    "sizes, devices, expected",
    [
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((2, -1, 1), 8, (2, 4, 1)),
        ((1, 2, -1), 8, (1, 2, 4)),
        ((2, 2, 2), 8, (2, 2, 2)),
        ((1, 1, 1), 1, (1, 1, 1)),
    ],
)
def test_resolve_mesh_shape(sizes, devices, expected):
    names = ("data", "fsdp", "tensor")
    resolved = sharding.resolve_mesh_shape(dict(zip(names, sizes, strict=True)), devices)
    assert tuple(resolved[name] for name in names) == expected
    assert resolved["sequence"] == 1


@pytest.mark.parametrize(
    "sizes, devices, message",
    [
        ((-1, -1, 1), 8, "at most one axis may be -1"),
        ((0, 1, 1), 8, "must be >= 1 or -1"),
        ((3, -1, 1), 8, "not divisible by the fixed axes' product 3"),
        ((2, 2, 1), 8, "needs 4 devices but 8 are used"),
    ],
)
def test_resolve_mesh_shape_errors(sizes, devices, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(
            dict(zip(("data", "fsdp", "tensor"), sizes, strict=True)), devices
        )


def test_mesh_axes_are_auto_and_named():
    mesh = sharding.make_mesh(2, 4, 1)
    assert mesh.axis_names == ("data", "fsdp", "sequence", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert dict(sharding.make_mesh(2, 1, 1, sequence=-1).shape)["sequence"] == 4
    assert sharding.make_mesh(1, 1, 1, num_devices=1).devices.size == 1
    with pytest.raises(ValueError, match="num_devices=9"):
        sharding.make_mesh(-1, 1, 1, num_devices=9)


def test_logical_to_sharding_follows_the_rules():
    mesh = sharding.make_mesh(1, 2, 4)
    params = {
        "embedding": jnp.zeros((16, 8)),  # vocab, embed
        "layer": {"q_kernel": jnp.zeros((8, 4, 2)), "scale": jnp.zeros((8,))},
    }
    axes = {
        "embedding": ("vocab", "embed"),
        "layer": {"q_kernel": ("embed", "heads", "head_dim"), "scale": ("norm",)},
    }
    shardings = sharding.logical_to_sharding(axes, params, mesh, RULES)
    assert shardings["embedding"].spec == PartitionSpec("tensor", "fsdp")
    assert shardings["layer"]["q_kernel"].spec == PartitionSpec("fsdp", "tensor", None)
    assert shardings["layer"]["scale"].spec == PartitionSpec(None)
    placed = jax.device_put(params, shardings)
    # Each device holds a 16/4 x 8/2 block of the embedding.
    assert placed["embedding"].addressable_shards[0].data.shape == (4, 4)


def test_a_mesh_axis_shards_only_one_dimension():
    mesh = sharding.make_mesh(1, 1, 8)
    spec = sharding.logical_to_spec(("heads", "kv_heads"), (8, 8), mesh, RULES, "p")
    assert spec == PartitionSpec("tensor", None)


def test_param_without_a_rule_is_an_error_naming_it():
    mesh = sharding.make_mesh(1, 8, 1)
    params = {"block": {"experts": jnp.zeros((4, 8))}}
    axes = {"block": {"experts": ("expert", "embed")}}
    with pytest.raises(
        ValueError, match=r"param \['block'\]\['experts'\] with shape \(4, 8\).*'expert'"
    ):
        sharding.logical_to_sharding(axes, params, mesh, RULES)


def test_indivisible_dimension_is_an_error_naming_the_param():
    mesh = sharding.make_mesh(1, 1, 8)
    params = {"embedding": jnp.zeros((18, 8))}
    axes = {"embedding": ("vocab", "embed")}
    with pytest.raises(
        ValueError,
        match=r"param \['embedding'\] with shape \(18, 8\).*'vocab' of size 18 is not divisible "
        r"by mesh axes \('tensor',\) of total size 8",
    ):
        sharding.logical_to_sharding(axes, params, mesh, RULES)


def test_rank_mismatch_is_an_error():
    mesh = sharding.make_mesh(8, 1, 1)
    with pytest.raises(ValueError, match="2 logical axes for 1 dimensions"):
        sharding.logical_to_spec(("vocab", "embed"), (8,), mesh, RULES, "w")


def test_batch_is_split_over_data_and_fsdp_and_pairs_stay_together():
    mesh = sharding.make_mesh(2, 4, 1)
    batch_size, length = 16, 5
    tokens = np.arange(batch_size * 2 * length, dtype=np.int32).reshape(batch_size, 2, length)
    batch = {"tokens": tokens, "pair_mask": np.ones((batch_size, 1), bool)}
    placed = sharding.put_batch(batch, mesh)
    assert placed["tokens"].sharding.spec == PartitionSpec(("data", "fsdp"), None, None)
    for shard in placed["tokens"].addressable_shards:
        # 2 whole rows per device, both sides of each pair and all their tokens.
        assert shard.data.shape == (2, 2, length)
        rows = shard.index[0]
        np.testing.assert_array_equal(np.asarray(shard.data), tokens[rows])
    np.testing.assert_array_equal(np.asarray(placed["tokens"]), tokens)


def test_batch_size_must_divide_over_the_batch_shards():
    mesh = sharding.make_mesh(2, 4, 1)
    with pytest.raises(ValueError, match=r"batch_size=12 must be divisible .* 2 × 4 = 8"):
        sharding.put_batch({"tokens": np.zeros((12, 2, 3), np.int32)}, mesh)


def _fake_mesh(process_of, shape):
    """A stand-in mesh over MESH_AXES whose devices carry only their process index."""
    devices = np.array([types.SimpleNamespace(process_index=p) for p in process_of], dtype=object)
    devices = devices.reshape(shape)
    return types.SimpleNamespace(
        axis_names=sharding.MESH_AXES,
        devices=devices,
        shape=dict(zip(sharding.MESH_AXES, shape, strict=True)),
    )


@pytest.mark.parametrize(
    "process_of, shape, expected",
    [
        # data=2 x sequence=2 within each host: each process is its own group (as today).
        ([0, 0, 1, 1], (2, 1, 2, 1), [(0, 2), (1, 2)]),
        # sequence=4 across both hosts: one group, both read every row.
        ([0, 0, 1, 1], (1, 1, 4, 1), [(0, 1), (0, 1)]),
        # data=2 x sequence=4, the sequence axis spanning two hosts of 2 devices each.
        ([0, 0, 1, 1, 2, 2, 3, 3], (2, 1, 4, 1), [(0, 2), (0, 2), (1, 2), (1, 2)]),
    ],
)
def test_row_groups_of_processes_that_share_rows(monkeypatch, process_of, shape, expected):
    mesh = _fake_mesh(process_of, shape)
    monkeypatch.setattr(jax, "process_count", lambda: len(set(process_of)))
    for process, want in enumerate(expected):
        monkeypatch.setattr(jax, "process_index", lambda process=process: process)
        assert sharding.row_group(mesh) == want


def test_rows_not_in_contiguous_blocks_per_process_are_one_line(monkeypatch):
    # data=4 with processes interleaved: process 0 holds rows 0 and 2, process 1 rows 1 and 3.
    mesh = _fake_mesh([0, 1, 0, 1], (4, 1, 1, 1))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(
        ValueError, match=r"not equal contiguous blocks .*\{0: \{0, 2\}, 1: \{1, 3\}\}"
    ):
        sharding.row_group(mesh)
