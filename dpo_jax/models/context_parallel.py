"""Attention over rows split along the token axis: context parallelism on the "sequence" axis.

Under a mesh with a "sequence" axis of size C > 1 (`sharding.SEQUENCE_AXIS`), every activation
[N, T, ...] holds T / C tokens of each row on each device; the projections, norms, MLP and the
log-prob head are per token and need nothing from the other shards. Attention is the one place
a token looks at others.

**Load-balanced layout (zigzag).** Under causal attention the first tokens of a row see few
keys and the last see many, so a contiguous split would give the last shard most of the work.
The decoder therefore runs in a permuted token order (`to_zigzag` on the way in, `from_zigzag`
on the way out, one `ppermute` of each shard's two halves): the row is cut into 2C blocks and
shard s holds blocks s and 2C − 1 − s, an early and a late one. Only the decoder sees that
order; its inputs and outputs are in the row's own order, so the log-prob head, the shift of
targets by one across shard boundaries and everything after it are unchanged.

**Attention** (`attention`): each shard all-gathers its rows' keys, values and segment ids
along the axis, once per layer (the gathered keys and values are each K·Dh / D of the hidden
states: a quarter each for Llama 3 8B), then attends block by block with an online softmax
(flash attention's recurrence, in XLA): its queries in blocks of `block_size`, over the keys in
blocks of the same size, skipping every block pair that causality or the sliding window masks
entirely (`lax.cond`). In the zigzag order each shard then computes 2C + 1 of the 4C key blocks
a full [T / C, T] score matrix would take (with block_size = T / 2C): the same count on every
shard, about half the attention FLOPs. Within a computed block the mask comes from global
token indices, so causality, Gemma 3's sliding window and packed segments hold across shard
boundaries exactly as on one device. The backward recomputes (`jax.checkpoint`): each query
block's pass, and in it each key block's scores, so what a layer's backward holds is one query
block's running statistics and outputs per key block, never a block's [B, H, Bq, Bk]
probabilities for every key block (flash attention's memory trade, reached by autodiff rather
than a hand-written backward, at one more recomputation of the scores).

What is not built: a ring (rotating K/V with `ppermute` while accumulating) would hold 1/C of
the gathered K/V, at C sequential steps; splash attention (TPU), whose kernels skip masked
blocks themselves, is not composed with the axis, so `config_checks` admits attention_impl='xla'
only with it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from dpo_jax import sharding
from dpo_jax.models import layers
from dpo_jax.sharding import SEQUENCE_AXIS

# The window of a full-attention layer where one traced value serves both kinds of layer (the
# layer scan's data): query index - key index < NO_WINDOW always holds.
NO_WINDOW = int(jnp.iinfo(jnp.int32).max)


def zigzag_order(length: int, shards: int) -> np.ndarray:
    """[T] int32: the row index of the token at each position of the zigzag layout.

    The row's 2C blocks of T / 2C tokens are laid out as 0, 2C − 1, 1, 2C − 2, ...: shard s
    (positions [s·T / C, (s + 1)·T / C)) holds blocks s and 2C − 1 − s.

    Raises:
        ValueError: if T is not divisible by 2C.
    """
    if length % (2 * shards):
        raise ValueError(
            f"row length {length} must be divisible by 2 x the sequence axis ({2 * shards}): "
            "each shard holds two equal blocks of every row"
        )
    block = length // (2 * shards)
    order = [b for s in range(shards) for b in (s, 2 * shards - 1 - s)]
    return np.concatenate([np.arange(b * block, (b + 1) * block) for b in order]).astype(np.int32)


def _zigzag_shard(block: int, shards: int) -> int:
    """The shard that holds row block `block` (of 2C) in the zigzag layout."""
    return block if block < shards else 2 * shards - 1 - block


def _permute_rows(x: jax.Array, mesh, local_fn) -> jax.Array:
    spec = sharding.split_rows_spec(mesh, x.ndim)
    sharded = jax.shard_map(local_fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    return sharded(x)


def to_zigzag(x: jax.Array, mesh) -> jax.Array:
    """[N, T, ...] in row order, T split over "sequence" -> the same in the zigzag layout.

    Natural shard s holds blocks 2s and 2s + 1; each goes to the shard `_zigzag_shard` names,
    one `ppermute` for the first halves and one for the second.
    """
    shards = mesh.shape[SEQUENCE_AXIS]
    pairs = [[(s, _zigzag_shard(2 * s + h, shards)) for s in range(shards)] for h in (0, 1)]

    def local(x):
        first, second = jnp.split(x, 2, axis=1)
        from_even = jax.lax.ppermute(first, SEQUENCE_AXIS, pairs[0])  # block of even index
        from_odd = jax.lax.ppermute(second, SEQUENCE_AXIS, pairs[1])
        # Shard d holds blocks d and 2C - 1 - d: d's parity says which arrived first.
        even = jax.lax.axis_index(SEQUENCE_AXIS) % 2 == 0
        return jnp.where(
            even,
            jnp.concatenate([from_even, from_odd], axis=1),
            jnp.concatenate([from_odd, from_even], axis=1),
        )

    return _permute_rows(x, mesh, local)


def from_zigzag(x: jax.Array, mesh) -> jax.Array:
    """The inverse of `to_zigzag`: [N, T, ...] in the zigzag layout -> row order."""
    shards = mesh.shape[SEQUENCE_AXIS]
    evens, odds = range(0, 2 * shards, 2), range(1, 2 * shards, 2)
    pairs = [[(_zigzag_shard(b, shards), b // 2) for b in blocks] for blocks in (evens, odds)]

    def local(x):
        first, second = jnp.split(x, 2, axis=1)
        even = jax.lax.axis_index(SEQUENCE_AXIS) % 2 == 0
        even_block = jnp.where(even, first, second)
        odd_block = jnp.where(even, second, first)
        return jnp.concatenate(
            [
                jax.lax.ppermute(even_block, SEQUENCE_AXIS, pairs[0]),
                jax.lax.ppermute(odd_block, SEQUENCE_AXIS, pairs[1]),
            ],
            axis=1,
        )

    return _permute_rows(x, mesh, local)


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
    block_size: int = 0,
) -> jax.Array:
    """`layers.dot_product_attention` with `layers.attention_mask`, T split over "sequence" in
    the zigzag layout (`to_zigzag`).

    Args:
        query: [B, T, H, Dh], T sharded over "sequence" (B over the batch axes), zigzag order.
        key: [B, T, K, Dh], sharded and ordered as query.
        value: [B, T, K, Dh], sharded and ordered as query.
        segment_ids: [B, T] int32, sharded and ordered as query's first two axes.
        sliding_window: the layer's window, None (full causal attention), or an int32 scalar
            (traced: chosen by the layer scan's kind, NO_WINDOW for full attention).
        scale: multiplier of q·k.
        softcap: attention logit soft-cap, or None.
        mesh: the mesh whose "sequence" axis splits T.
        block_size: tokens per query block and per key block (0: T / 2C, one zigzag block);
            it must divide T / 2C.

    Returns:
        [B, T, H, Dh], sharded and ordered as query.

    Raises:
        ValueError: a block size that does not divide T / 2C.
    """
    shards, length = mesh.shape[SEQUENCE_AXIS], query.shape[1]
    sharding.check_row_length(length, mesh, what="attention row length", block_size=block_size)
    order = zigzag_order(length, shards)
    block_size = block_size or length // (2 * shards)
    window = jnp.asarray(NO_WINDOW if sliding_window is None else sliding_window, jnp.int32)
    batch_axes = sharding.batch_axes_of(mesh)
    heads_axis = _heads_axis(mesh, query.shape[2], key.shape[2])
    heads = PartitionSpec(batch_axes, SEQUENCE_AXIS, heads_axis, None)
    rows = PartitionSpec(batch_axes, SEQUENCE_AXIS)
    local = functools.partial(
        _local_attention, order=order, scale=scale, softcap=softcap, block_size=block_size
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


def _blocks(x: jax.Array, block_size: int, axis: int) -> jax.Array:
    """Splits `axis` into [num_blocks, ..., block_size, ...] with the block index leading."""
    shape = x.shape[:axis] + (x.shape[axis] // block_size, block_size) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _local_attention(query, key, value, segment_ids, window, *, order, scale, softcap, block_size):
    """One device's queries [b, T/C, h, Dh] over its rows' keys gathered along "sequence"."""
    gather = functools.partial(jax.lax.all_gather, axis_name=SEQUENCE_AXIS, axis=1, tiled=True)
    keys = _blocks(gather(key), block_size, 1)  # [nk, b, Bk, K, Dh]
    values = _blocks(gather(value), block_size, 1)
    key_segments = _blocks(gather(segment_ids), block_size, 1)  # [nk, b, Bk]
    key_index = _blocks(jnp.asarray(order), block_size, 0)  # [nk, Bk]: row indices
    shard_length = query.shape[1]
    start = jax.lax.axis_index(SEQUENCE_AXIS) * shard_length
    query_index = jax.lax.dynamic_slice_in_dim(jnp.asarray(order), start, shard_length)
    kv = (keys, values, key_segments, key_index)

    def attend(query_block, segment_block, index_block):
        return _query_block(
            query_block, segment_block, index_block, kv, window, scale=scale, softcap=softcap
        )

    out = jax.lax.map(
        lambda args: jax.checkpoint(attend)(*args),
        (
            _blocks(query, block_size, 1),
            _blocks(segment_ids, block_size, 1),
            _blocks(query_index, block_size, 0),
        ),
    )  # [nq, b, Bq, h, Dh]
    return jnp.moveaxis(out, 0, 1).reshape(query.shape)


def _query_block(query, segment_ids, query_index, kv, window, *, scale, softcap):
    """Online softmax of one query block [b, Bq, h, Dh] over the key blocks it can see.

    The carry is flash attention's: the running max m and sum l of exp(score − m) per query and
    head, and the running output; a key block that causality or the window masks for every
    query of the block is skipped. The diagonal block is always computed, so m is real by the
    end for every query that has a key (a padding query's output is unused).
    """
    keys, values, key_segments, key_index = kv
    batch, block, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[3]
    grouped = query.reshape(batch, block, num_kv_heads, num_heads // num_kv_heads, head_dim)

    def update(carry, key_block, value_block, key_segment_block, key_index_block):
        running_max, running_sum, out = carry  # [b, K, G, Bq] x 2, [b, K, G, Bq, Dh] float32
        scores = jnp.einsum(
            "btkgh,bskh->bkgts", grouped, key_block, preferred_element_type=jnp.float32
        )
        scores = scores * scale
        if softcap is not None:
            scores = jnp.tanh(scores / softcap) * softcap
        delta = query_index[:, None] - key_index_block[None, :]  # [Bq, Bk]
        allowed = (delta >= 0) & (delta < window)
        same = (segment_ids[:, :, None] == key_segment_block[:, None, :]) & (
            segment_ids[:, :, None] > 0
        )
        mask = same & allowed[None]  # [b, Bq, Bk]
        scores = jnp.where(mask[:, None, None], scores, layers.MASK_VALUE)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        rescale = jnp.exp(running_max - new_max)
        probs = jnp.exp(scores - new_max[..., None])
        pv = jnp.einsum(
            "bkgts,bskh->bkgth",
            probs.astype(value_block.dtype),
            value_block,
            preferred_element_type=jnp.float32,
        )
        return new_max, running_sum * rescale + probs.sum(axis=-1), out * rescale[..., None] + pv

    def step(carry, block_kv):
        key_block, value_block, key_segment_block, key_index_block = block_kv
        # Some (query, key) pair of the two blocks is causal and within the window.
        visible = (key_index_block[0] <= query_index[-1]) & (
            query_index[0] - key_index_block[-1] < window
        )
        carry = jax.lax.cond(
            visible,
            # Checkpointed: the backward keeps each step's carry, not its [b, H, Bq, Bk] scores
            # and probabilities, and recomputes them (flash attention's trade, by autodiff).
            lambda c: jax.checkpoint(update)(
                c, key_block, value_block, key_segment_block, key_index_block
            ),
            lambda c: c,
            carry,
        )
        return carry, None

    shape = (batch, num_kv_heads, num_heads // num_kv_heads, block)
    init = (
        jnp.full(shape, layers.MASK_VALUE, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, head_dim), jnp.float32),
    )
    (_, running_sum, out), _ = jax.lax.scan(step, init, kv)
    out = out / running_sum[..., None]  # [b, K, G, Bq, Dh]
    out = jnp.moveaxis(out, 3, 1)  # [b, Bq, K, G, Dh]
    return out.reshape(batch, block, num_heads, head_dim).astype(query.dtype)
