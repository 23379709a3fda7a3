"""The decoder's contract: packing, remat, bf16, logical axes, sharded init, cuDNN-path guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax.models import ModelConfig, init_params, logical_axes, logits, make_apply_fn

_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
CONFIGS = {
    "llama": ModelConfig(family="llama", **_TINY),
    "llama_tied_bias_llama3_rope": ModelConfig(
        family="llama",
        **_TINY,
        tie_word_embeddings=True,
        qkv_bias=True,
        o_bias=True,
        rope_type="llama3",
        rope_factor=8.0,
        rope_original_max_position_embeddings=64,
    ),
    "qwen3": ModelConfig(family="qwen3", **_TINY, qk_norm=True),
    "gemma3": ModelConfig(
        family="gemma3_text",
        **_TINY,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        sliding_window=4,
        rope_theta=1e6,
        rope_local_theta=1e4,
        qk_norm=True,
        norm_plus_one=True,
        post_norms=True,
        embed_scale=True,
        mlp_activation="gelu_tanh",
        query_pre_attn_scalar=16,
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
    ),
}
LOGICAL_NAMES = {"layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", None}


def _random_params(config, seed=0):
    """Init params with norms perturbed, so every weight influences the output."""
    params = init_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [
        leaf + 0.1 * jax.random.normal(key, leaf.shape)
        for leaf, key in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


def _row(tokens, length):
    """tokens, positions and segment ids of one sequence, right-padded to `length`."""
    pad = length - len(tokens)
    return (
        np.pad(tokens, (0, pad)),
        np.pad(np.arange(len(tokens)), (0, pad)),
        np.pad(np.ones(len(tokens), np.int32), (0, pad)),
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_segments_match_separate_sequences(name):
    config = CONFIGS[name]
    params = _random_params(config)
    apply_fn = jax.jit(make_apply_fn(config))
    rng = np.random.default_rng(0)
    first, second = rng.integers(1, 256, size=7), rng.integers(1, 256, size=9)
    length = 20

    packed_tokens = np.zeros(length, np.int32)
    packed_tokens[:16] = np.concatenate([first, second])
    packed_positions = np.zeros(length, np.int32)
    packed_positions[:16] = np.concatenate([np.arange(7), np.arange(9)])
    packed_segments = np.zeros(length, np.int32)
    packed_segments[:16] = [1] * 7 + [2] * 9
    alone = [_row(first, length), _row(second, length)]
    tokens, positions, segments = (
        np.stack([packed_tokens, alone[0][0], alone[1][0]]),
        np.stack([packed_positions, alone[0][1], alone[1][1]]),
        np.stack([packed_segments, alone[0][2], alone[1][2]]),
    )

    hidden, _ = apply_fn(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    hidden = np.asarray(hidden)

    assert np.all(np.isfinite(hidden)), "padding rows must stay finite"
    np.testing.assert_allclose(hidden[0, :7], hidden[1, :7], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(hidden[0, 7:16], hidden[2, :9], atol=1e-5, rtol=1e-5)


def _loss_and_grads(config, params, tokens, segment_ids):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    apply_fn = make_apply_fn(config)

    def loss_fn(params):
        hidden, unembedding = apply_fn(params, tokens, positions, segment_ids)
        logits = jnp.einsum("btd,dv->btv", hidden, unembedding).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        token_logps = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
        mask = (segment_ids[:, 1:] > 0).astype(jnp.float32)
        return -jnp.sum(token_logps * mask)

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def _padded_tokens():
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 1, 256, dtype=jnp.int32)
    segment_ids = jnp.array([[1] * 12, [1] * 8 + [0] * 4], dtype=jnp.int32)
    return jnp.where(segment_ids > 0, tokens, 0), segment_ids


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_remat_gives_same_values_and_grads(name):
    config = CONFIGS[name]
    params = _random_params(config)
    tokens, segment_ids = _padded_tokens()
    loss, grads = _loss_and_grads(config, params, tokens, segment_ids)
    loss_remat, grads_remat = _loss_and_grads(
        config.replace(remat=True), params, tokens, segment_ids
    )

    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)), "padding gave NaN grads"
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    for g_remat, g in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g_remat, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_bfloat16_compute_is_close_to_float32(name):
    config = CONFIGS[name]
    params = _random_params(config)
    tokens, segment_ids = _padded_tokens()
    full = np.asarray(logits(config, params, tokens, segment_ids=segment_ids))
    bf16_config = config.replace(dtype="bfloat16")
    hidden, unembedding = make_apply_fn(bf16_config)(
        params,
        tokens,
        jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), tokens.shape),
        segment_ids,
    )
    assert hidden.dtype == jnp.bfloat16 and unembedding.dtype == jnp.bfloat16
    half = np.asarray(logits(bf16_config, params, tokens, segment_ids=segment_ids))

    real = np.asarray(segment_ids > 0)
    scale = np.abs(full[real]).max()
    assert scale > 1.0, "logits too small for a relative comparison"
    # bf16 keeps ~3 significant digits; over 3 layers errors stay within ~3% of the logit range.
    assert np.abs(half - full)[real].max() <= 0.03 * scale
    assert np.all(np.isfinite(half))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logical_axes_cover_every_param(name):
    config = CONFIGS[name]
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))
    axes = logical_axes(config)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_axes = jax.tree.structure(shapes).flatten_up_to(axes)
    assert len(flat_axes) == len(flat_shapes)
    for (path, shape), names in zip(flat_shapes, flat_axes, strict=True):
        assert isinstance(names, tuple) and len(names) == len(shape.shape), path
        assert set(names) <= LOGICAL_NAMES, (path, names)


def test_init_under_jit_with_out_shardings_matches_plain_init():
    config = CONFIGS["gemma3"]
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))
    axes = logical_axes(config)

    def sharding(names):
        spec = ["fsdp" if name == "embed" else None for name in names]
        return NamedSharding(mesh, PartitionSpec(*spec))

    out_shardings = jax.tree.map(sharding, axes, is_leaf=lambda x: isinstance(x, tuple))
    sharded = jax.jit(init_params, static_argnums=0, out_shardings=out_shardings)(
        config, jax.random.key(0)
    )
    plain = init_params(config, jax.random.key(0))

    assert jax.tree.structure(sharded) == jax.tree.structure(shapes)
    assert sharded["embedding"].sharding.spec == PartitionSpec(None, "fsdp")
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
        # Same random bits; the jitted init may round its scaling by one ulp differently.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    tokens, segment_ids = _padded_tokens()
    np.testing.assert_allclose(
        logits(config, sharded, tokens, segment_ids=segment_ids),
        logits(config, plain, tokens, segment_ids=segment_ids),
        atol=1e-5,
    )


def test_cudnn_attention_matches_xla_on_gpu_and_is_refused_elsewhere():
    config = CONFIGS["llama"].replace(attention_impl="cudnn")
    tokens, segment_ids = _padded_tokens()
    params = init_params(config, jax.random.key(0))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn"):
            logits(config, params, tokens, segment_ids=segment_ids)
        return
    xla = CONFIGS["llama"]
    real = np.asarray(segment_ids) > 0
    np.testing.assert_allclose(
        np.asarray(logits(config, params, tokens, segment_ids=segment_ids))[real],
        np.asarray(logits(xla, params, tokens, segment_ids=segment_ids))[real],
        atol=2e-3,  # cuDNN computes attention in bf16/tf32 internally
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_kv_heads=3), "divisible"),
        (dict(rope_type="yarn"), "rope_type"),
        (dict(layer_types=("sliding_attention",) * 3), "sliding_window"),
        (dict(dtype="float64"), "dtype"),
        (dict(attention_impl="flash"), "attention_impl"),
    ],
)
def test_bad_config_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        CONFIGS["llama"].replace(**changes)
