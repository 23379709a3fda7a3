"""KV-cache decoding: prefill + one token at a time gives the full forward's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models import _TINY, CONFIGS, _random_params

from dpo_jax.models import ModelConfig, init_cache, logits, make_decode_fn

DECODE_CONFIGS = {
    "llama": CONFIGS["llama"],
    "llama_tied_bias_llama3_rope": CONFIGS["llama_tied_bias_llama3_rope"],
    "mistral": ModelConfig(
        family="mistral", **_TINY, layer_types=("sliding_attention",) * 3, sliding_window=3
    ),
    "qwen2": ModelConfig(family="qwen2", **_TINY, qkv_bias=True, tie_word_embeddings=True),
    "qwen3": CONFIGS["qwen3"],
    "gemma3": CONFIGS["gemma3"],  # window 4 < the 10-token rows; local and global RoPE bases
}
_LENGTH, _PREFILL, _MAX_LENGTH = 10, 6, 13


def _left_padded_batch():
    """Row 0 has 10 real tokens, row 1 three left-pads then 7, row 2 one left-pad then 9."""
    pads = np.array([0, 3, 1])
    valid = np.arange(_LENGTH)[None, :] >= pads[:, None]  # [N, T]
    positions = np.maximum(np.arange(_LENGTH)[None, :] - pads[:, None], 0).astype(np.int32)
    tokens = np.random.default_rng(0).integers(1, 256, size=valid.shape).astype(np.int32)
    return np.where(valid, tokens, 0), positions, valid


@pytest.mark.parametrize("name", sorted(DECODE_CONFIGS))
def test_prefill_then_steps_match_full_forward(name):
    config = DECODE_CONFIGS[name]
    params = _random_params(config)
    tokens, positions, valid = _left_padded_batch()
    full = np.asarray(
        logits(config, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid, int))
    )

    decode_fn = jax.jit(make_decode_fn(config), donate_argnums=1)
    cache = init_cache(config, batch_size=3, max_length=_MAX_LENGTH)
    step_logits, cache = decode_fn(
        params,
        cache,
        tokens[:, :_PREFILL],
        positions[:, :_PREFILL],
        valid[:, :_PREFILL],
    )
    pieces = [np.asarray(step_logits)]
    for t in range(_PREFILL, _LENGTH):
        sl = slice(t, t + 1)
        step_logits, cache = decode_fn(params, cache, tokens[:, sl], positions[:, sl], valid[:, sl])
        pieces.append(np.asarray(step_logits))
    decoded = np.concatenate(pieces, axis=1)

    assert decoded.shape == full.shape == (3, _LENGTH, config.vocab_size)
    assert decoded.dtype == np.float32
    assert int(cache.index) == _LENGTH
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :_LENGTH]), valid)
    assert not np.asarray(cache.valid[:, _LENGTH:]).any()
    assert np.abs(full[valid]).max() > 1.0, "logits too small for the tolerance to mean much"
    np.testing.assert_allclose(decoded[valid], full[valid], atol=2e-5, rtol=1e-5)


def test_gemma3_window_changes_decoded_logits():
    """The window is in force: a wider window gives different late-position logits."""
    config = DECODE_CONFIGS["gemma3"]
    params = _random_params(config)
    tokens, positions, valid = _left_padded_batch()
    results = []
    for window in (4, 64):
        wide = config.replace(sliding_window=window)
        cache = init_cache(wide, batch_size=3, max_length=_MAX_LENGTH)
        out, _ = jax.jit(make_decode_fn(wide))(params, cache, tokens, positions, valid)
        results.append(np.asarray(out))
    assert np.abs(results[0][0, -1] - results[1][0, -1]).max() > 1e-3


def test_bad_cache_shapes_are_refused():
    config = DECODE_CONFIGS["llama"]
    with pytest.raises(ValueError, match="max_length"):
        init_cache(config, batch_size=2, max_length=0)
    cache = init_cache(config, batch_size=2, max_length=8)
    params = _random_params(config)
    tokens = jnp.zeros((3, 1), jnp.int32)
    with pytest.raises(ValueError, match="cache's batch size"):
        make_decode_fn(config)(params, cache, tokens, tokens, tokens > 0)
