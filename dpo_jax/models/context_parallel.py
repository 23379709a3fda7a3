"""Attention over rows split along the token axis: context parallelism on the "sequence" axis.

Under a mesh with a "sequence" axis of size C > 1 (`sharding.SEQUENCE_AXIS`), every activation
[N, T, ...] holds T / C tokens of each row on each device; the projections, norms, MLP and the
log-prob head are per token and need nothing from the other shards. Attention is the one place
a token looks at others: here each device all-gathers the keys, values and segment ids of its
rows along the axis, once per layer, and attends with its own T / C queries to all T keys, the
mask built from global indices (query index = shard offset + local index), so causality, the
sliding window of Gemma 3's local layers and packed segments hold across shard boundaries
exactly as on one device.

Why an all-gather and not a ring: the gathered K/V are [N, T, K, Dh] per layer, K·Dh of the
hidden size D (1/4 for Llama 3 8B's grouped queries), held for one layer at a time under remat;
a ring (rotating K/V blocks with `ppermute` while accumulating an online softmax) would hold
1/C of that but is C sequential steps. The scores are what grows: [N, H, T / C, T] float32 per
shard, so `query_chunk` (ModelConfig.attention_query_chunk) attends in blocks of queries, each
block's scores recomputed in the backward; at 32,768 tokens the planner's long-context config
uses it (configs/llama3_8b_tpu.py).

Load balance: every shard computes its [T / C, T] score block in full (the masked causal part
is computed and thrown away), so the shards do equal work and none idles on the causal
triangle, at the price of up to 2x the attention FLOPs a causal kernel needs. The zigzag layout
(shard i holding blocks i and 2C − 1 − i) only pays with a kernel that skips masked blocks
(splash on TPU), and splash is not composed with the sequence axis yet: `config_checks` admits
attention_impl='xla' only with it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dpo_jax.models import layers
from dpo_jax.sharding import BATCH_AXES, SEQUENCE_AXIS

# The window of a full-attention layer where one traced value serves both kinds of layer (the
# layer scan's data): query index - key index < NO_WINDOW always holds.
NO_WINDOW = int(jnp.iinfo(jnp.int32).max)


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    segment_ids: jax.Array,
    *,
    sliding_window: int | None | jax.Array,
    scale: float,
    softcap: float | None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    query_chunk: int = 0,
) -> jax.Array:
    """`layers.dot_product_attention` with `layers.attention_mask`, T split over "sequence".

    Args:
        query: [B, T, H, Dh], T sharded over "sequence" (B over the batch axes).
        key, value: [B, T, K, Dh], sharded as query.
        segment_ids: [B, T] int32, sharded as query's first two axes.
        sliding_window: the layer's window, None (full causal attention), or an int32 scalar
            (traced: chosen by the layer scan's kind, NO_WINDOW for full attention).
        scale: multiplier of q·k.
        softcap: attention logit soft-cap, or None.
        mesh: the mesh whose "sequence" axis splits T.
        query_chunk: queries per block on each shard (0: all T / C at once). Each block's
            [B, H, block, T] float32 scores are recomputed in the backward (`jax.checkpoint`),
            so a layer holds one block's scores instead of the shard's [B, H, T / C, T].

    Returns:
        [B, T, H, Dh], sharded as query.
    """
    window = jnp.asarray(NO_WINDOW if sliding_window is None else sliding_window, jnp.int32)
    batch_axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    heads_axis = _heads_axis(mesh, query.shape[2], key.shape[2])
    heads = PartitionSpec(batch_axes, SEQUENCE_AXIS, heads_axis, None)
    rows = PartitionSpec(batch_axes, SEQUENCE_AXIS)
    local = functools.partial(
        _local_attention, scale=scale, softcap=softcap, query_chunk=query_chunk
    )
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(heads, heads, heads, rows, PartitionSpec()),
        out_specs=heads,
        check_vma=False,
    )
    return sharded(query, key, value, segment_ids, window)


def _heads_axis(mesh, num_heads: int, num_kv_heads: int) -> str | None:
    """ "tensor" when it divides both head counts (heads then stay where the kernels put them);
    else heads are whole on every device (correct, with the projections resharded)."""
    if "tensor" not in mesh.axis_names or mesh.shape["tensor"] == 1:
        return None
    size = mesh.shape["tensor"]
    return "tensor" if num_heads % size == 0 and num_kv_heads % size == 0 else None


def _local_attention(query, key, value, segment_ids, window, *, scale, softcap, query_chunk):
    """One device's queries [b, T/C, h, Dh] over its rows' keys gathered along "sequence"."""
    gather = functools.partial(jax.lax.all_gather, axis_name=SEQUENCE_AXIS, axis=1, tiled=True)
    all_keys, all_values, key_segment_ids = gather(key), gather(value), gather(segment_ids)
    length = query.shape[1]
    offset = jax.lax.axis_index(SEQUENCE_AXIS) * length

    def attend(block_query, block_segment_ids, block_offset):
        mask = layers.attention_mask(
            block_segment_ids, window, key_segment_ids=key_segment_ids, query_offset=block_offset
        )  # [b, block, T]
        return layers.dot_product_attention(
            block_query, all_keys, all_values, mask, scale=scale, softcap=softcap
        )

    if not query_chunk or query_chunk >= length:
        return attend(query, segment_ids, offset)
    if length % query_chunk:
        raise ValueError(
            f"attention_query_chunk={query_chunk} must divide the {length} tokens of a row "
            "on each sequence shard"
        )
    num_blocks = length // query_chunk

    def blocks(x):  # [b, T/C, ...] -> [num_blocks, b, block, ...]
        return jnp.swapaxes(x.reshape(x.shape[0], num_blocks, query_chunk, *x.shape[2:]), 0, 1)

    starts = offset + query_chunk * jnp.arange(num_blocks)
    out = jax.lax.map(
        lambda args: jax.checkpoint(attend)(*args), (blocks(query), blocks(segment_ids), starts)
    )  # [num_blocks, b, block, h, Dh]
    return jnp.swapaxes(out, 0, 1).reshape(query.shape)
