"""The decoder's layers as Flax NNX modules: RMSNorm, Attention, MLP and the residual Block."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax import sharding
from dpo_jax.models import context_parallel, layers, linear
from dpo_jax.models.config import ModelConfig

_INIT_STDDEV = 0.02  # transformers' initializer_range default


def select_kind(config: ModelConfig, sliding: jax.Array, full_value: Any, sliding_value: Any):
    """A layer's value by its kind, where the kind is data (a scalar bool inside the layer scan).

    Static when every layer has the same kind; else an element-wise select, so one scanned body
    serves Gemma 3's local and global layers.
    """
    kinds = set(config.layer_types)
    if kinds == {"full_attention"}:
        return full_value
    if kinds == {"sliding_attention"}:
        return sliding_value
    return jax.tree.map(lambda f, s: jnp.where(sliding, s, f), full_value, sliding_value)


def switch_kind(config: ModelConfig, sliding: jax.Array, full_fn: Callable, sliding_fn: Callable):
    """`full_fn()` or `sliding_fn()` by the layer's kind: `lax.cond` when kinds are mixed.

    For kernels whose window is static (cuDNN, splash): both branches compile once each.
    """
    kinds = set(config.layer_types)
    if kinds == {"full_attention"}:
        return full_fn()
    if kinds == {"sliding_attention"}:
        return sliding_fn()
    return jax.lax.cond(sliding, sliding_fn, full_fn)


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: str) -> nnx.Param:
    return nnx.Param(_INIT_STDDEV * jax.random.normal(rngs.params(), shape, jnp.dtype(dtype)))


def _zeros(shape: tuple[int, ...], dtype: str) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.dtype(dtype)))


class RMSNorm(nnx.Module):
    """RMSNorm with a [N] `scale` (1 at init; 0 for Gemma's (1 + w) convention)."""

    def __init__(self, size: int, config: ModelConfig):
        init = jnp.zeros if config.norm_plus_one else jnp.ones
        self.scale = nnx.Param(init((size,), jnp.dtype(config.param_dtype)))
        self.eps = config.rms_norm_eps
        self.plus_one = config.norm_plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.rms_norm(x, self.scale[...], eps=self.eps, plus_one=self.plus_one)


class Attention(nnx.Module):
    """Self-attention: projections, optional q/k norm, RoPE, masked grouped-query attention."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        pd = config.param_dtype
        self.config = config
        self.q_kernel = normal_param(rngs, (d, h, dh), pd)
        self.k_kernel = normal_param(rngs, (d, k, dh), pd)
        self.v_kernel = normal_param(rngs, (d, k, dh), pd)
        self.o_kernel = normal_param(rngs, (h, dh, d), pd)
        if config.qkv_bias:
            self.q_bias = _zeros((h, dh), pd)
            self.k_bias = _zeros((k, dh), pd)
            self.v_bias = _zeros((k, dh), pd)
        if config.o_bias:
            self.o_bias = _zeros((d,), pd)
        if config.qk_norm:
            self.q_norm = RMSNorm(dh, config)
            self.k_norm = RMSNorm(dh, config)

    def project(
        self, x: jax.Array, cos_sin: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[B, T, D] -> queries [B, T, H, Dh], keys/values [B, T, K, Dh]: biased, normed, rotated.

        The one implementation of the projections, shared by the training forward and decoding.
        """
        config = self.config
        dtype = x.dtype
        batch, length, _ = x.shape
        tokens = layers.flatten_tokens(x)  # [B*T, D]: 2-D GEMMs, see layers.gated_mlp

        def project(kernel):
            out = linear.project(tokens, kernel.get_value(), "nd,dhk->nhk")
            return layers.unflatten_tokens(out, batch, length)  # [B, T, heads, Dh]

        query = project(self.q_kernel)
        key = project(self.k_kernel)
        value = project(self.v_kernel)
        if config.qkv_bias:
            query = query + self.q_bias[...].astype(dtype)[None, None]
            key = key + self.k_bias[...].astype(dtype)[None, None]
            value = value + self.v_bias[...].astype(dtype)[None, None]
        if config.qk_norm:
            query = self.q_norm(query)
            key = self.k_norm(key)
        return layers.apply_rope(query, *cos_sin), layers.apply_rope(key, *cos_sin), value

    def output(self, attended: jax.Array) -> jax.Array:
        """Attention outputs [B, T, H, Dh] -> [B, T, D] through the output projection."""
        batch, length = attended.shape[:2]
        out = layers.flatten_tokens(attended)  # [B*T, H, Dh]
        out = linear.project(out, self.o_kernel.get_value(), "nhk,hkd->nd")
        out = layers.unflatten_tokens(out, batch, length)
        if self.config.o_bias:
            out = out + self.o_bias[...].astype(out.dtype)[None, None]
        return out

    def __call__(
        self,
        x: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        segment_ids: jax.Array,
        mask: jax.Array | None,
        sliding: jax.Array,
    ) -> jax.Array:
        """[B, T, D] -> [B, T, D].

        Args:
            x: [B, T, D] normed inputs.
            cos_sin: this layer's RoPE, each [B, T, Dh // 2].
            segment_ids: [B, T] int32 (the kernels build their masks from it).
            mask: [B, T, T] bool for XLA attention (None for the kernels).
            sliding: scalar bool, whether this layer is a sliding-window one (data in the scan).
        """
        config = self.config
        query, key, value = self.project(x, cos_sin)
        mesh = jax.sharding.get_abstract_mesh()
        if sharding.sequence_shards(mesh) > 1:  # rows split along T (context parallelism)
            if config.attention_impl != "xla":
                raise ValueError(
                    f"attention_impl={config.attention_impl!r} under a mesh with a sequence axis "
                    f"of {sharding.sequence_shards(mesh)}: context parallelism supports 'xla' only"
                )
            out = context_parallel.attention(
                query,
                key,
                value,
                segment_ids,
                sliding_window=select_kind(
                    config, sliding, context_parallel.NO_WINDOW, config.sliding_window
                ),
                scale=config.attention_scale,
                softcap=config.attn_logit_softcapping,
                mesh=mesh,
                block_size=config.attention_block_size,
            )
            return self.output(out)
        if config.attention_impl == "xla":
            out = layers.dot_product_attention(
                query,
                key,
                value,
                mask,
                scale=config.attention_scale,
                softcap=config.attn_logit_softcapping,
            )
            return self.output(out)
        if config.attention_impl == "cudnn":
            kernel = layers.cudnn_attention
        else:
            from dpo_jax.models import splash  # the Pallas TPU kernels load only when asked for

            kernel = functools.partial(
                splash.splash_attention,
                softcap=config.attn_logit_softcapping,
                interpret=config.attention_impl == "splash_interpret",
            )

        def attend(window):
            return lambda: kernel(
                query,
                key,
                value,
                segment_ids,
                scale=config.attention_scale,
                sliding_window=window,
            )

        out = switch_kind(config, sliding, attend(None), attend(config.sliding_window))
        return self.output(out)

    def decode(
        self,
        x: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        cache_keys: jax.Array,
        cache_values: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention of L new tokens over a KV cache (XLA attention, whatever attention_impl).

        Args:
            x: [N, L, D] normed inputs of the new tokens.
            cos_sin: RoPE of the new tokens' positions, each [N, L, Dh // 2].
            mask: [N, L, S] bool over the cache slots after the write.
            cache_keys, cache_values: [N, S, K, Dh]; the new keys/values go to slots
                index .. index + L - 1.
            index: scalar int32, the first slot written.

        Returns:
            ([N, L, D] outputs, updated keys, updated values).
        """
        query, key, value = self.project(x, cos_sin)
        start = (0, index, 0, 0)
        cache_keys = jax.lax.dynamic_update_slice(cache_keys, key.astype(cache_keys.dtype), start)
        cache_values = jax.lax.dynamic_update_slice(
            cache_values, value.astype(cache_values.dtype), start
        )
        out = layers.dot_product_attention(
            query,
            cache_keys.astype(query.dtype),
            cache_values.astype(query.dtype),
            mask,
            scale=self.config.attention_scale,
            softcap=self.config.attn_logit_softcapping,
        )
        return self.output(out), cache_keys, cache_values


class MLP(nnx.Module):
    """Gated MLP: SwiGLU (Llama, Mistral, Qwen) or GeGLU (Gemma 3)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f, pd = config.hidden_size, config.intermediate_size, config.param_dtype
        self.activation = config.mlp_activation
        self.gate_kernel = normal_param(rngs, (d, f), pd)
        self.up_kernel = normal_param(rngs, (d, f), pd)
        self.down_kernel = normal_param(rngs, (f, d), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.gated_mlp(
            x,
            self.gate_kernel.get_value(),
            self.up_kernel.get_value(),
            self.down_kernel.get_value(),
            self.activation,
        )


class Block(nnx.Module):
    """One pre-norm decoder layer; Gemma 3 adds a norm after attention and after the MLP.

    Layers are stacked (see `Transformer`): what differs between layers (local or global
    attention, its RoPE base and window) comes in as data, the scalar bool `sliding`.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        self.attn_norm = RMSNorm(config.hidden_size, config)
        self.attn = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config)
        self.mlp = MLP(config, rngs)
        self.post_norms = config.post_norms
        if config.post_norms:
            self.post_attn_norm = RMSNorm(config.hidden_size, config)
            self.post_mlp_norm = RMSNorm(config.hidden_size, config)

    def _residual(self, x: jax.Array, attend: Callable) -> tuple[jax.Array, Any]:
        """x + attention, then + MLP; `attend(normed) -> (out, extra)` is the attention kind."""
        attn_out, extra = attend(self.attn_norm(x))
        if self.post_norms:
            attn_out = self.post_attn_norm(attn_out)
        x = x + attn_out
        mlp_out = self.mlp(self.mlp_norm(x))
        if self.post_norms:
            mlp_out = self.post_mlp_norm(mlp_out)
        return x + mlp_out, extra

    def __call__(
        self, x: jax.Array, rope: dict, segment_ids: jax.Array, masks: dict, sliding: jax.Array
    ) -> jax.Array:
        """[B, T, D] -> [B, T, D]; `rope` and `masks` hold both kinds ("full", "sliding")."""
        cos_sin = select_kind(self.config, sliding, rope["full"], rope["sliding"])
        mask = select_kind(self.config, sliding, masks["full"], masks["sliding"])

        def attend(normed):
            return self.attn(normed, cos_sin, segment_ids, mask, sliding), None

        return self._residual(x, attend)[0]

    def decode(self, x, rope: dict, masks: dict, keys, values, index, sliding):
        """One layer over L new tokens and this layer's cache; see `Attention.decode`."""
        cos_sin = select_kind(self.config, sliding, rope["full"], rope["sliding"])
        mask = select_kind(self.config, sliding, masks["full"], masks["sliding"])

        def attend(normed):
            out, new_keys, new_values = self.attn.decode(normed, cos_sin, mask, keys, values, index)
            return out, (new_keys, new_values)

        return self._residual(x, attend)
