"""One decoder layer's numerics as pure functions: RMSNorm, RoPE, masks, attention, gated MLP."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import sharding
from dpo_jax.models import linear

# Added to masked attention scores. Finite, so a row with every key masked (a padding query)
# softmaxes to a uniform, finite row instead of NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float, plus_one: bool) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 like transformers.

    Args:
        x: [..., N] activations in the compute dtype.
        scale: [N] weight; the output is multiplied by (1 + scale) when `plus_one` (Gemma).
        eps: added to the mean square.
        plus_one: Gemma's convention (weights stored as offsets from 1).

    Returns:
        [..., N] in x's dtype.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    scale = jnp.reshape(scale, (1,) * (x.ndim - 1) + scale.shape)
    if plus_one:
        # Gemma multiplies in float32, then rounds: (x * (1 + w)).to(dtype).
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    # Llama rounds first, then multiplies: w * x.to(dtype).
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(
    head_dim: int,
    theta: float,
    rope_type: str = "default",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] float32, as transformers' ROPE_INIT_FUNCTIONS."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    if rope_type == "llama3":
        low_freq_wavelen = original_max_position_embeddings / low_freq_factor
        high_freq_wavelen = original_max_position_embeddings / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type={rope_type!r} is not supported")


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position × frequency, in float32.

    Args:
        positions: [B, T] int32 position ids (restarting at 0 in each packed segment).
        inv_freq: [head_dim // 2] float32.

    Returns:
        (cos, sin), each [B, T, head_dim // 2] float32.
    """
    angles = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates pairs (i, i + head_dim/2), transformers' rotate_half layout, in x's dtype.

    Args:
        x: [B, T, N, head_dim] queries or keys.
        cos, sin: [B, T, head_dim // 2] float32.

    Returns:
        [B, T, N, head_dim] in x's dtype.
    """
    # transformers rounds cos/sin to the compute dtype and rotates in it.
    cos = cos.astype(x.dtype)[:, :, None, :]
    sin = sin.astype(x.dtype)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(segment_ids: jax.Array, sliding_window: int | None) -> jax.Array:
    """Which keys each query may see: same segment (> 0), causal, within the window.

    A query at index i sees a key at index j when segment_ids agree and are > 0, j <= i, and,
    with a window, i - j < sliding_window (transformers' `kv_idx > q_idx - sliding_window`).
    Indices, not position ids, define causality, so packed rows need no special case.

    Args:
        segment_ids: [B, T] int32; 0 on padding.
        sliding_window: window length, or None for full causal attention.

    Returns:
        [B, T, T] bool, [batch, query, key].
    """
    length = segment_ids.shape[1]
    query_index = jnp.arange(length)[:, None]
    key_index = jnp.arange(length)[None, :]
    allowed = key_index <= query_index
    if sliding_window is not None:
        allowed = allowed & (query_index - key_index < sliding_window)
    same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (
        segment_ids[:, :, None] > 0
    )
    return same_segment & allowed[None, :, :]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None,
) -> jax.Array:
    """Grouped-query attention in XLA, with scores and softmax in float32.

    K/V are not repeated: queries get a group axis, [B, T, K, H/K, Dh], and the einsums
    broadcast over it.

    Args:
        query: [B, T, H, Dh] compute dtype.
        key, value: [B, S, K, Dh] compute dtype; H % K == 0, query head h uses KV head h // (H/K).
        mask: [B, T, S] bool, True where the query may attend.
        scale: multiplier of q·k.
        softcap: if set, scores become softcap * tanh(scores / softcap) before masking.

    Returns:
        [B, T, H, Dh] in the compute dtype.
    """
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    grouped = query.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    # float32 scores even for bf16 inputs: the softmax needs the range and the precision.
    scores = jnp.einsum("btkgh,bskh->bkgts", grouped, key, preferred_element_type=jnp.float32)
    scores = scores * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, value)
    return out.reshape(batch, length, num_heads, head_dim)


def cudnn_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    sliding_window: int | None,
) -> jax.Array:
    """The same attention through cuDNN's flash attention (NVIDIA GPUs, bf16/fp16 only).

    Causality and the window go to cuDNN as flags (so it skips masked blocks); segments go as
    a boolean mask. Padding queries (segment 0) may see earlier padding keys here, so no row is
    ever fully masked; outputs at real tokens are the same as `dot_product_attention`'s.

    Args:
        query: [B, T, H, Dh]; key, value: [B, S, K, Dh].
        segment_ids: [B, T] int32.
        scale: multiplier of q·k.
        sliding_window: as in `attention_mask`.

    Returns:
        [B, T, H, Dh].
    """
    same_segment = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        query,
        key,
        value,
        mask=same_segment,
        scale=scale,
        is_causal=True,
        local_window_size=window,
        implementation="cudnn",
    )


def flatten_tokens(x: jax.Array) -> jax.Array:
    """[B, T, ...] -> [B·T, ...], the token axis of the 2-D GEMMs (see `gated_mlp`).

    Under context parallelism (T split over the mesh's "sequence" axis) the flattening is
    T-major, [T·B, ...]: a merged axis can stay sharded only when its major part is the sharded
    one, and B-major order made XLA all-gather every row's [T, D] activations around each
    projection. `unflatten_tokens` undoes either order.
    """
    if sharding.sequence_shards(jax.sharding.get_abstract_mesh()) > 1:
        x = jnp.swapaxes(x, 0, 1)
    return x.reshape(-1, *x.shape[2:])


def unflatten_tokens(x: jax.Array, batch: int, length: int) -> jax.Array:
    """[B·T, ...] of `flatten_tokens` -> [B, T, ...]."""
    if sharding.sequence_shards(jax.sharding.get_abstract_mesh()) > 1:
        return jnp.swapaxes(x.reshape(length, batch, *x.shape[1:]), 0, 1)
    return x.reshape(batch, length, *x.shape[1:])


def gated_mlp(
    x: jax.Array,
    gate_kernel: Any,
    up_kernel: Any,
    down_kernel: Any,
    activation: str,
) -> jax.Array:
    """down(act(x @ gate) * (x @ up)): SwiGLU ("silu") or GeGLU ("gelu_tanh").

    Args:
        x: [B, T, D] compute dtype.
        gate_kernel, up_kernel: [D, F]; down_kernel: [F, D]: arrays (cast to x's dtype) or
          `linear.Adapted` kernels.
        activation: "silu" or "gelu_tanh" (transformers' gelu_pytorch_tanh).

    Returns:
        [B, T, D].
    """
    # 2-D matmuls over all tokens: XLA then computes the weight gradients as plain
    # transposed-operand GEMMs, where [B, T, F] einsums made it copy activations (measured on CPU).
    tokens = flatten_tokens(x)  # [B*T, D]
    gate = linear.project(tokens, gate_kernel, "nd,df->nf")
    up = linear.project(tokens, up_kernel, "nd,df->nf")
    if activation == "silu":
        hidden = jax.nn.silu(gate) * up
    else:
        hidden = jax.nn.gelu(gate, approximate=True) * up
    return unflatten_tokens(linear.project(hidden, down_kernel, "nf,fd->nd"), *x.shape[:2])
