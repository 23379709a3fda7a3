"""The decoder (Flax NNX) and its pure boundary: init_params, make_apply_fn, logical_axes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax import sharding
from dpo_jax.models import context_parallel, kv_cache, layers, linear
from dpo_jax.models.blocks import Block, RMSNorm, normal_param
from dpo_jax.models.config import ModelConfig

Params = dict[str, Any]
ApplyFn = Callable[[Params, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

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


def _stacked(modules: list[nnx.Module]) -> nnx.Module:
    """One module whose params are those of `modules` stacked on a new leading axis."""
    splits = [nnx.split(module) for module in modules]
    states = [state for _, state in splits]
    return nnx.merge(splits[0][0], jax.tree.map(lambda *leaves: jnp.stack(leaves), *states))


def _remat_policy(config: ModelConfig):
    """What the backward pass keeps of a layer: nothing (recompute it all from its input)."""
    del config
    return jax.checkpoint_policies.nothing_saveable


def sliding_flags(config: ModelConfig) -> jax.Array:
    """[layers] bool: which layers use the sliding window (the scan's per-layer data)."""
    return jnp.asarray([kind == "sliding_attention" for kind in config.layer_types])


class Transformer(nnx.Module):
    """Decoder-only transformer; `__call__` returns final hidden states and the unembedding.

    The layers are one `Block` whose params carry a leading `layers` axis, run by
    `jax.lax.scan` (with the remat policy inside the scanned body), so the compiled program does
    not grow with depth.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        v, d, pd = config.vocab_size, config.hidden_size, config.param_dtype
        self.embedding = normal_param(rngs, (v, d), pd)
        # Built one by one, then stacked: the same random bits as unstacked layers drew.
        self.layers = _stacked([Block(config, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(d, config)
        if not config.tie_word_embeddings:
            self.lm_head = normal_param(rngs, (d, v), pd)

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
        mesh = jax.sharding.get_abstract_mesh()
        split_rows = sharding.sequence_shards(mesh) > 1
        if split_rows:  # the decoder runs in the load-balanced token order (context_parallel)
            tokens, positions, segment_ids = (
                context_parallel.to_zigzag(x, mesh) for x in (tokens, positions, segment_ids)
            )
        rope, masks = _rope_and_masks(config, positions, segment_ids, split_rows)
        graphdef, stacked = nnx.split(self.layers)

        def body(x, layer):
            layer_params, sliding = layer
            block = nnx.merge(graphdef, layer_params)
            return sharding.constrain_split_rows(block(x, rope, segment_ids, masks, sliding)), None

        if config.remat:
            body = jax.checkpoint(body, prevent_cse=False, policy=_remat_policy(config))
        x = sharding.constrain_split_rows(self._embed(tokens))  # [N, T, D]
        x, _ = jax.lax.scan(body, x, (stacked, sliding_flags(config)))
        hidden = self.final_norm(x)
        if split_rows:
            hidden = context_parallel.from_zigzag(hidden, mesh)
        return sharding.constrain_split_rows(hidden), self._unembedding()

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
        graphdef, stacked = nnx.split(self.layers)

        def body(x, layer):
            layer_params, sliding, keys, values = layer
            block = nnx.merge(graphdef, layer_params)
            x, new_cache = block.decode(x, rope, masks, keys, values, cache.index, sliding)
            return x, new_cache

        x, (keys, values) = jax.lax.scan(
            body, self._embed(tokens), (stacked, sliding_flags(config), cache.keys, cache.values)
        )
        cache = cache.replace(keys=keys, values=values, index=cache.index + tokens.shape[1])
        return self.final_norm(x), self._unembedding(), cache

    def _embed(self, tokens: jax.Array) -> jax.Array:
        """[N, T] int32 -> [N, T, D] in the compute dtype."""
        config = self.config
        dtype = jnp.dtype(config.dtype)
        x = linear.take_rows(self.embedding.get_value(), tokens, dtype)  # [N, T, D]
        if config.embed_scale:
            # transformers rounds sqrt(D) to the weights' dtype first (55.4256 -> 55.5 in bf16).
            x = x * jnp.asarray(config.hidden_size**0.5, dtype)
        return x

    def _unembedding(self) -> jax.Array:
        """[D, V] in the compute dtype."""
        dtype = jnp.dtype(self.config.dtype)
        if self.config.tie_word_embeddings:  # [V, D] -> [D, V]; XLA folds a float transpose
            return linear.dense_transposed(self.embedding.get_value(), dtype)
        return linear.dense(self.lm_head.get_value(), dtype)


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


def _rope_and_masks(
    config: ModelConfig, positions: jax.Array, segment_ids: jax.Array, split_rows: bool
):
    """cos/sin and [B, T, T] masks for the two layer kinds, computed once per forward."""
    rope = _rope(config, positions)
    masks = {"full": None, "sliding": None}
    # Under context parallelism (split_rows) each attention block builds its mask from global
    # token indices and the gathered segment ids (`context_parallel`); a [B, T, T] one would be
    # the full row's.
    if config.attention_impl == "xla" and not split_rows:
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

    The function carries the config's cap as `apply_fn.final_logit_softcapping`, which
    `logprob_fn` reads, so a soft-capped model is scored with its cap without passing it.
    """
    graphdef = _graphdef(config)

    def apply_fn(params, tokens, positions, segment_ids):
        model = nnx.merge(graphdef, params)
        return model(tokens, positions, segment_ids)

    apply_fn.final_logit_softcapping = config.final_logit_softcapping
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

    Names: layers (the leading axis of every param under "layers"), vocab, embed, heads,
    kv_heads, head_dim, mlp, norm.
    """
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))

    def axes(path, leaf):
        name = path[-1].key
        if name not in _LOGICAL_AXES:
            raise ValueError(f"param {jax.tree_util.keystr(path)} has no logical axes")
        names = _LOGICAL_AXES[name]
        if path[0].key == "layers":
            names = ("layers", *names)
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
