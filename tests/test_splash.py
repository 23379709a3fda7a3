"""Splash attention (Pallas interpreter on CPU) against XLA attention: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models import CONFIGS, _random_params

from dpo_jax.models import layers, logits
from dpo_jax.models.splash import splash_attention

_LENGTH, _HEADS, _KV_HEADS, _HEAD_DIM = 128, 4, 2, 32


def _segments():
    """Row 0: one sequence of 100 then padding; row 1: packed 40 + 50 + 30, then padding."""
    one = np.r_[np.ones(100), np.zeros(28)]
    packed = np.r_[np.full(40, 1), np.full(50, 2), np.full(30, 3), np.zeros(8)]
    return jnp.asarray(np.stack([one, packed]), jnp.int32)


@pytest.mark.parametrize("sliding_window, softcap", [(None, None), (17, None), (None, 20.0)])
def test_splash_matches_xla_values_and_gradients(sliding_window, softcap):
    keys = jax.random.split(jax.random.key(0), 4)
    query = jax.random.normal(keys[0], (2, _LENGTH, _HEADS, _HEAD_DIM))
    key = jax.random.normal(keys[1], (2, _LENGTH, _KV_HEADS, _HEAD_DIM))
    value = jax.random.normal(keys[2], (2, _LENGTH, _KV_HEADS, _HEAD_DIM))
    segment_ids = _segments()
    real = (segment_ids > 0)[:, :, None, None]
    # Padding queries differ by design (splash lets them see padding keys): weight them 0.
    weights = jax.random.normal(keys[3], query.shape) * real
    scale = _HEAD_DIM**-0.5

    def xla(query, key, value):
        mask = layers.attention_mask(segment_ids, sliding_window)
        return layers.dot_product_attention(query, key, value, mask, scale=scale, softcap=softcap)

    def splash(query, key, value):
        return splash_attention(
            query,
            key,
            value,
            segment_ids,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            interpret=True,
        )

    outs = [jax.jit(f)(query, key, value) for f in (xla, splash)]
    np.testing.assert_allclose(
        np.where(real, outs[1], 0), np.where(real, outs[0], 0), atol=2e-5, rtol=1e-5
    )
    grads = [
        jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(weights * f(q, k, v)), argnums=(0, 1, 2)))(
            query, key, value
        )
        for f in (xla, splash)
    ]
    for xla_grad, splash_grad in zip(*grads, strict=True):
        assert float(jnp.abs(xla_grad).max()) > 0.1
        np.testing.assert_allclose(splash_grad, xla_grad, atol=5e-5, rtol=1e-4)


def test_gemma3_with_splash_matches_xla_logits():
    # Gemma 3's tiny config mixes local (window 4) and global layers: the scan picks the kernel
    # of each layer with lax.cond.
    config = CONFIGS["gemma3"]
    params = _random_params(config)
    tokens = jax.random.randint(jax.random.key(3), (2, 128), 1, 256, dtype=jnp.int32)
    segment_ids = jnp.array([[1] * 128, [1] * 60 + [2] * 50 + [0] * 18], jnp.int32)
    positions = jnp.array(
        [list(range(128)), list(range(60)) + list(range(50)) + [0] * 18], jnp.int32
    )
    real = np.asarray(segment_ids) > 0
    xla = logits(config, params, tokens, positions, segment_ids)
    splash = logits(
        config.replace(attention_impl="splash_interpret"), params, tokens, positions, segment_ids
    )
    assert np.abs(np.asarray(xla)[real]).max() > 1.0
    np.testing.assert_allclose(np.asarray(splash)[real], np.asarray(xla)[real], atol=1e-4)


def test_splash_refuses_a_row_length_it_cannot_tile():
    query = jnp.zeros((1, 100, 2, 16))
    with pytest.raises(ValueError, match="row length 100"):
        splash_attention(
            query, query, query, jnp.ones((1, 100), jnp.int32), scale=1.0, sliding_window=None
        )
