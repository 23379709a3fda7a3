"""The decoder (Flax NNX) and its pure boundary: init_params, make_apply_fn, logical_axes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import kv_cache, layers
from dpo_jax.models.config import ModelConfig

Params = dict[str, Any]
ApplyFn = Callable[[Params, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

_INIT_STDDEV = 0.02  # transformers' initializer_range default

# Logical axis names of each param, by its leaf name. Kernels are stored in the layout their
# einsum reads, so the forward has no transposes.
_LOGICAL_AXES = {
    "embedding": ("vocab", "embed"),  # [V, D]
    "lm_head": ("embed", "vocab"),  # [D, V]
    "q_kernel": ("embed", "heads", "head_dim"),  # [D, H, Dh]
    "k_kernel": ("embed", "kv_heads", "head_dim"),  # [D, K, Dh]
    "v_kernel": ("embed", "kv_heads", "head_dim"),  # [D, K, Dh]
    "o_kernel": ("heads", "head_dim", "embed"),  # [H, Dh, D]
    "q_bias": ("heads", "head_dim"),  # [H, Dh]
    "k_bias": ("kv_heads", "head_dim"),  # [K, Dh]
    "v_bias": ("kv_heads", "head_dim"),  # [K, Dh]
    "o_bias": ("embed",),  # [D]
    "gate_kernel": ("embed", "mlp"),  # [D, F]
    "up_kernel": ("embed", "mlp"),  # [D, F]
    "down_kernel": ("mlp", "embed"),  # [F, D]
    "scale": ("norm",),  # RMSNorm weights, [D] or [Dh]
}


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: str) -> nnx.Param:
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
        self.q_kernel = _normal(rngs, (d, h, dh), pd)
        self.k_kernel = _normal(rngs, (d, k, dh), pd)
        self.v_kernel = _normal(rngs, (d, k, dh), pd)
        self.o_kernel = _normal(rngs, (h, dh, d), pd)
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
        tokens = x.reshape(batch * length, -1)  # [B*T, D]: 2-D GEMMs, see layers.gated_mlp

        def project(kernel):
            out = jnp.einsum("nd,dhk->nhk", tokens, kernel[...].astype(dtype))
            return out.reshape(batch, length, *out.shape[1:])  # [B, T, heads, Dh]

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
        out = attended.reshape(batch * length, *attended.shape[2:])  # [B*T, H, Dh]
        out = jnp.einsum("nhk,hkd->nd", out, self.o_kernel[...].astype(attended.dtype))
        out = out.reshape(batch, length, -1)
        if self.config.o_bias:
            out = out + self.o_bias[...].astype(out.dtype)[None, None]
        return out

    def __call__(
        self,
        x: jax.Array,
        cos_sin: tuple[jax.Array, jax.Array],
        segment_ids: jax.Array,
        mask: jax.Array,
        sliding_window: int | None,
    ) -> jax.Array:
        """[B, T, D] -> [B, T, D]; `mask` is [B, T, T] bool (used by the XLA path)."""
        config = self.config
        query, key, value = self.project(x, cos_sin)
        if config.attention_impl == "cudnn":
            out = layers.cudnn_attention(
                query,
                key,
                value,
                segment_ids,
                scale=config.attention_scale,
                sliding_window=sliding_window,
            )
        else:
            out = layers.dot_product_attention(
                query,
                key,
                value,
                mask,
                scale=config.attention_scale,
                softcap=config.attn_logit_softcapping,
            )
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
        self.gate_kernel = _normal(rngs, (d, f), pd)
        self.up_kernel = _normal(rngs, (d, f), pd)
        self.down_kernel = _normal(rngs, (f, d), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        return layers.gated_mlp(
            x,
            self.gate_kernel[...].astype(dtype),
            self.up_kernel[...].astype(dtype),
            self.down_kernel[...].astype(dtype),
            self.activation,
        )


class Block(nnx.Module):
    """One pre-norm decoder layer; Gemma 3 adds a norm after attention and after the MLP."""

    def __init__(self, config: ModelConfig, layer_index: int, rngs: nnx.Rngs):
        self.sliding = config.layer_types[layer_index] == "sliding_attention"
        self.sliding_window = config.sliding_window if self.sliding else None
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

    def __call__(self, x: jax.Array, rope: dict, segment_ids: jax.Array, masks: dict) -> jax.Array:
        kind = "sliding" if self.sliding else "full"

        def attend(normed):
            out = self.attn(normed, rope[kind], segment_ids, masks[kind], self.sliding_window)
            return out, None

        return self._residual(x, attend)[0]

    def decode(self, x, rope: dict, masks: dict, keys, values, index):
        """One layer over L new tokens and this layer's cache; see `Attention.decode`."""
        kind = "sliding" if self.sliding else "full"

        def attend(normed):
            out, new_keys, new_values = self.attn.decode(
                normed, rope[kind], masks[kind], keys, values, index
            )
            return out, (new_keys, new_values)

        return self._residual(x, attend)


def _block_forward(block: Block, x, rope, segment_ids, masks):
    return block(x, rope, segment_ids, masks)


class Transformer(nnx.Module):
    """Decoder-only transformer; `__call__` returns final hidden states and the unembedding."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        v, d, pd = config.vocab_size, config.hidden_size, config.param_dtype
        self.embedding = _normal(rngs, (v, d), pd)
        self.layers = nnx.List([Block(config, i, rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(d, config)
        if not config.tie_word_embeddings:
            self.lm_head = _normal(rngs, (d, v), pd)

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """See `make_apply_fn`."""
        config = self.config
        if config.attention_impl == "cudnn" and jax.default_backend() != "gpu":
            raise ValueError(
                f"attention_impl='cudnn' needs an NVIDIA GPU (backend: {jax.default_backend()}); "
                "use attention_impl='xla'"
            )
        x = self._embed(tokens)
        rope, masks = _rope_and_masks(config, positions, segment_ids)
        block_forward = nnx.remat(_block_forward) if config.remat else _block_forward
        for block in self.layers:
            x = block_forward(block, x, rope, segment_ids, masks)
        return self.final_norm(x), self._unembedding()

    def decode(
        self, tokens: jax.Array, positions: jax.Array, valid: jax.Array, cache: kv_cache.KVCache
    ) -> tuple[jax.Array, jax.Array, kv_cache.KVCache]:
        """See `make_decode_fn`; returns (hidden [N, L, D], unembedding [D, V], cache)."""
        config = self.config
        cache = kv_cache.write_slots(cache, positions, valid)
        rope = _rope(config, positions)
        masks = {
            "full": kv_cache.attention_mask(cache, positions, None),
            "sliding": kv_cache.attention_mask(cache, positions, config.sliding_window),
        }
        x = self._embed(tokens)
        keys, values = [], []
        for i, block in enumerate(self.layers):
            x, (layer_keys, layer_values) = block.decode(
                x, rope, masks, cache.keys[i], cache.values[i], cache.index
            )
            keys.append(layer_keys)
            values.append(layer_values)
        cache = cache.replace(
            keys=jnp.stack(keys), values=jnp.stack(values), index=cache.index + tokens.shape[1]
        )
        return self.final_norm(x), self._unembedding(), cache

    def _embed(self, tokens: jax.Array) -> jax.Array:
        """[N, T] int32 -> [N, T, D] in the compute dtype."""
        config = self.config
        dtype = jnp.dtype(config.dtype)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)  # [N, T, D]
        if config.embed_scale:
            # transformers rounds sqrt(D) to the weights' dtype first (55.4256 -> 55.5 in bf16).
            x = x * jnp.asarray(config.hidden_size**0.5, dtype)
        return x

    def _unembedding(self) -> jax.Array:
        """[D, V] in the compute dtype."""
        if self.config.tie_word_embeddings:
            unembedding = self.embedding[...].T  # [D, V]; XLA folds the transpose into the dot
        else:
            unembedding = self.lm_head[...]
        return unembedding.astype(jnp.dtype(self.config.dtype))


def _rope(config: ModelConfig, positions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """cos/sin of each layer kind ("full", and "sliding" with its own base when set)."""
    global_freq = layers.rope_inv_freq(
        config.head_dim,
        config.rope_theta,
        config.rope_type,
        config.rope_factor,
        config.rope_low_freq_factor,
        config.rope_high_freq_factor,
        config.rope_original_max_position_embeddings,
    )
    rope = {"full": layers.rope_cos_sin(positions, global_freq)}
    if config.rope_local_theta is None:
        rope["sliding"] = rope["full"]
    else:
        local_freq = layers.rope_inv_freq(config.head_dim, config.rope_local_theta)
        rope["sliding"] = layers.rope_cos_sin(positions, local_freq)
    return rope


def _rope_and_masks(config: ModelConfig, positions: jax.Array, segment_ids: jax.Array):
    """cos/sin and [B, T, T] masks for the two layer kinds, computed once per forward."""
    rope = _rope(config, positions)
    masks = {"full": None, "sliding": None}
    if config.attention_impl == "xla":
        masks["full"] = layers.attention_mask(segment_ids, None)
        if "sliding_attention" in config.layer_types:
            masks["sliding"] = layers.attention_mask(segment_ids, config.sliding_window)
    return rope, masks


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random params as a plain nested dict (works under `jax.jit` and `jax.eval_shape`).

    Args:
        config: the model.
        rng: a PRNG key.

    Returns:
        Nested dict of arrays in `config.param_dtype`; `logical_axes(config)` has its structure.
    """
    model = Transformer(config, nnx.Rngs(params=rng))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.lru_cache(maxsize=32)
def _graphdef(config: ModelConfig) -> nnx.GraphDef:
    abstract_model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(params=0)))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    return graphdef


def make_apply_fn(config: ModelConfig) -> ApplyFn:
    """The pure forward `apply_fn(params, tokens, positions, segment_ids)`.

    apply_fn args:
        params: nested dict from `init_params` or a converter.
        tokens: [N, T] int32 token ids.
        positions: [N, T] int32, restarting at 0 in each packed segment.
        segment_ids: [N, T] int32; 0 on padding, k >= 1 for the k-th packed sequence. A token
            attends to earlier tokens of its own segment only.

    apply_fn returns:
        hidden: [N, T, D] final hidden states (after the final norm), in `config.dtype`.
        unembedding: [D, V] in `config.dtype` (the transposed embedding when tied). Logits are
            hidden @ unembedding, then `final_logit_softcapping` if the config sets it (see
            `logits_from_hidden`).
    """
    graphdef = _graphdef(config)

    def apply_fn(params, tokens, positions, segment_ids):
        model = nnx.merge(graphdef, params)
        return model(tokens, positions, segment_ids)

    return apply_fn


def logits_from_hidden(config: ModelConfig, hidden: jax.Array, unembedding: jax.Array) -> jax.Array:
    """[N, T, D] x [D, V] -> [N, T, V] float32 logits, soft-capped if the config says so."""
    logits = jnp.einsum("btd,dv->btv", hidden, unembedding, preferred_element_type=jnp.float32)
    if config.final_logit_softcapping is not None:
        cap = config.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


def logits(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Full-vocabulary logits [N, T, V] float32 (for tests and sampling, not for training).

    `positions` default to 0..T-1 and `segment_ids` to all ones (one unpadded sequence per row).
    """
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens, dtype=jnp.int32)
    hidden, unembedding = make_apply_fn(config)(params, tokens, positions, segment_ids)
    return logits_from_hidden(config, hidden, unembedding)


def logical_axes(config: ModelConfig) -> dict[str, Any]:
    """Per-dimension logical axis names for every param, in the structure of `init_params`.

    Names: vocab, embed, heads, kv_heads, head_dim, mlp, norm.
    """
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))

    def axes(path, leaf):
        name = path[-1].key
        if name not in _LOGICAL_AXES:
            raise ValueError(f"param {jax.tree_util.keystr(path)} has no logical axes")
        names = _LOGICAL_AXES[name]
        if len(names) != len(leaf.shape):
            raise ValueError(
                f"param {jax.tree_util.keystr(path)} has shape {leaf.shape}, axes {names}"
            )
        return names

    return jax.tree_util.tree_map_with_path(axes, shapes)


DecodeFn = Callable[..., tuple[jax.Array, kv_cache.KVCache]]


def make_decode_fn(config: ModelConfig) -> DecodeFn:
    """The pure incremental forward `decode_fn(params, cache, tokens, positions, valid)`.

    Prefill is one call with the whole (left-padded) prompt; then one call per generated token
    with L = 1. Jit it with the cache donated: `jax.jit(decode_fn, donate_argnums=1)`.
    Attention here is XLA's whatever `config.attention_impl` says.

    decode_fn args:
        params: nested dict from `init_params` or a converter.
        cache: a `KVCache` from `init_cache` (or a previous call); needs index + L <= max_length
            (slots past the end are not written, as `jax.lax.dynamic_update_slice` clamps).
        tokens: [N, L] int32 new tokens, written at slots index .. index + L - 1.
        positions: [N, L] int32 their absolute position ids.
        valid: [N, L] bool, False on left-padding (such slots are never attended to).

    decode_fn returns:
        logits: [N, L, V] float32, soft-capped as `logits_from_hidden`. Each token attends to
            every valid slot whose position is <= its own (within the window in sliding layers).
        cache: the updated cache, index advanced by L.
    """
    graphdef = _graphdef(config)

    def decode_fn(params, cache, tokens, positions, valid):
        model = nnx.merge(graphdef, params)
        hidden, unembedding, cache = model.decode(tokens, positions, valid, cache)
        return logits_from_hidden(config, hidden, unembedding), cache

    return decode_fn
