"""The key/value cache of incremental decoding: its layout, its slots' bookkeeping, its mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dpo_jax.models.config import ModelConfig


@struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_length` slots per row.

    Attributes:
        keys: [layers, N, S, K, Dh] in the config's compute dtype (S = max_length).
        values: [layers, N, S, K, Dh], likewise.
        positions: [N, S] int32, the absolute position id of the token in each slot.
        valid: [N, S] bool; False for an empty slot or a padding token.
        index: scalar int32, the next slot to write (the same for every row).
    """

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    valid: jax.Array
    index: jax.Array


def init_cache(config: ModelConfig, batch_size: int, max_length: int) -> KVCache:
    """An empty cache: every slot invalid, `index` 0.

    Args:
        config: the model.
        batch_size: N, the rows decoded together.
        max_length: S, the most tokens (prompt and generated, padding included) a row holds.

    Returns:
        A `KVCache` of zeros (works under `jax.jit` and `jax.eval_shape`).

    Raises:
        ValueError: batch_size or max_length is not positive.
    """
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"batch_size={batch_size} and max_length={max_length} must be > 0")
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    return KVCache(
        keys=jnp.zeros(shape, jnp.dtype(config.dtype)),
        values=jnp.zeros(shape, jnp.dtype(config.dtype)),
        positions=jnp.zeros((batch_size, max_length), jnp.int32),
        valid=jnp.zeros((batch_size, max_length), bool),
        index=jnp.zeros((), jnp.int32),
    )


def write_slots(cache: KVCache, positions: jax.Array, valid: jax.Array) -> KVCache:
    """Records the positions and validity of L new tokens at slots index .. index + L - 1.

    Keys and values are written layer by layer (`Attention.decode`); `index` moves on after.

    Args:
        cache: the cache before the new tokens.
        positions: [N, L] int32 position ids of the new tokens.
        valid: [N, L] bool, False on (left-)padding.

    Returns:
        The cache with `positions` and `valid` updated; keys, values and index unchanged.

    Raises:
        ValueError: positions and valid do not match the cache's rows or each other.
    """
    rows = cache.positions.shape[0]
    if positions.ndim != 2 or positions.shape[0] != rows or valid.shape != positions.shape:
        raise ValueError(
            f"positions {positions.shape} and valid {valid.shape} must both be [N, L] with "
            f"N = {rows}, the cache's batch size"
        )
    start = (0, cache.index)
    return cache.replace(
        positions=jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), start),
        valid=jax.lax.dynamic_update_slice(cache.valid, valid.astype(bool), start),
    )


def attention_mask(cache: KVCache, positions: jax.Array, sliding_window: int | None) -> jax.Array:
    """Which cache slots each new token attends to.

    A query at position p sees a valid slot holding position q when q <= p and, with a window,
    p - q < sliding_window (transformers' semantics). Slots not yet written are invalid.

    Args:
        cache: after `write_slots` for the new tokens.
        positions: [N, L] int32 position ids of the new tokens.
        sliding_window: window length, or None for full causal attention.

    Returns:
        [N, L, S] bool, [row, query, slot].
    """
    query = positions[:, :, None]  # [N, L, 1]
    key = cache.positions[:, None, :]  # [N, 1, S]
    allowed = cache.valid[:, None, :] & (key <= query)
    if sliding_window is not None:
        allowed = allowed & (query - key < sliding_window)
    return allowed
