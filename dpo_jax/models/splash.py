"""Splash attention (Pallas TPU kernels) with causal, sliding-window and segment masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from dpo_jax import sharding

# Tiles of queries and keys, largest first: splash's default of 128 under-fills a TPU's MXU.
_BLOCKS = (512, 256, 128)


def _block(length: int) -> int:
    """The largest tile that divides the row length (splash's tiles are multiples of 128)."""
    for block in _BLOCKS:
        if length % block == 0:
            return block
    raise ValueError(f"attention_impl='splash': row length {length} must be a multiple of 128")


def _kernel(length: int, num_heads: int, sliding_window: int | None, softcap, interpret: bool):
    """The splash kernel of one device's heads for rows of `length` tokens.

    Built at each trace, not cached: its mask tables become constants of the trace building it.
    """
    if sliding_window is None:
        mask = masks.CausalMask((length, length))
    else:
        # Query i sees keys i - (window - 1) .. i: transformers' i - j < window.
        mask = masks.LocalMask((length, length), window_size=(sliding_window - 1, 0), offset=0)
    block = _block(length)
    sizes = kernels.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return kernels.make_splash_mha(
        masks.MultiHeadMask([mask] * num_heads),
        block_sizes=sizes,
        attn_logits_soft_cap=softcap,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _local_attention(query, key, value, segment_ids, *, scale, sliding_window, softcap, interpret):
    """Splash attention of one device's rows and heads ([b, T, h, Dh] etc., as the caller's)."""
    length, num_heads = query.shape[1], query.shape[2]
    kernel = _kernel(length, num_heads, sliding_window, softcap, interpret)
    # splash applies no 1/sqrt(d) itself; its layout is [heads, T, Dh] per row.
    query = (query * jnp.asarray(scale, query.dtype)).transpose(0, 2, 1, 3)
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)

    def one_row(query, key, value, segments):
        return kernel(query, key, value, segment_ids=kernels.SegmentIds(q=segments, kv=segments))

    out = jax.vmap(one_row)(query, key, value, segment_ids)  # [b, h, T, Dh]
    return out.transpose(0, 2, 1, 3)


def splash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    sliding_window: int | None,
    softcap: float | None = None,
    interpret: bool = False,
) -> jax.Array:
    """`layers.dot_product_attention` through splash attention's flash kernels.

    Causality and the window are the kernel's static mask (it skips fully masked blocks);
    segments are its segment ids. Padding queries (segment 0) see earlier padding keys, so no row
    is fully masked; outputs at real tokens equal `dot_product_attention`'s. A Mosaic kernel
    cannot be partitioned by XLA, so under a mesh in context (`jax.set_mesh`) it runs in
    `shard_map`: rows over the batch axes (data, fsdp), heads over `tensor`.

    Args:
        query: [B, T, H, Dh]; key, value: [B, T, K, Dh] (H % K == 0).
        segment_ids: [B, T] int32.
        scale: multiplier of q·k.
        sliding_window: as in `layers.attention_mask`, or None.
        softcap: scores become softcap·tanh(scores / softcap), or None.
        interpret: run the kernels in the Pallas interpreter (CPU tests), not compiled for TPU.

    Returns:
        [B, T, H, Dh].

    Raises:
        ValueError: a row length splash cannot tile, or KV heads the tensor axis does not divide.
    """
    local = functools.partial(
        _local_attention,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        interpret=interpret,
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(query, key, value, segment_ids)
    batch_axes = sharding.batch_axes_of(mesh)
    heads_axis = "tensor" if "tensor" in mesh.axis_names else None
    if heads_axis and key.shape[2] % mesh.shape[heads_axis]:
        raise ValueError(
            f"attention_impl='splash': {key.shape[2]} KV heads are not divisible by the tensor "
            f"axis ({mesh.shape[heads_axis]})"
        )
    heads = PartitionSpec(batch_axes, None, heads_axis, None)
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(heads, heads, heads, PartitionSpec(batch_axes, None)),
        out_specs=heads,
        check_vma=False,
    )
    return sharded(query, key, value, segment_ids)
