"""PPO's pieces against hand-worked values and NumPy loops written from their formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import ppo


def np_gae(rewards, values, mask, gamma, lam):
    """GAE by a plain loop over each row's valid tokens, last first (float64)."""
    advantages = np.zeros_like(rewards, np.float64)
    for row in range(rewards.shape[0]):
        valid = np.flatnonzero(mask[row])
        next_value, next_advantage = 0.0, 0.0
        for t in valid[::-1]:
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[row, t] = next_advantage
            next_value = values[row, t]
    return advantages, np.where(mask, advantages + values, 0.0)


def test_gae_hand_example_gives_monte_carlo_returns():
    # r = (0, 0, 1), V = 0.5 everywhere, γ = λ = 1: δ = (0, 0, 0.5) (the last one pays
    # 1 + 0 − 0.5), A = (0.5, 0.5, 0.5), returns = A + V = (1, 1, 1), the Monte Carlo return.
    rewards, values = jnp.array([[0.0, 0.0, 1.0]]), jnp.full((1, 3), 0.5)
    advantages, returns = ppo.gae(rewards, values, jnp.ones((1, 3), bool), gamma=1.0, lam=1.0)
    np.testing.assert_allclose(advantages, [[0.5, 0.5, 0.5]])
    np.testing.assert_allclose(returns, [[1.0, 1.0, 1.0]])
    # λ = 0: one-step TD errors, A_t = δ_t = (0, 0, 0.5).
    advantages, _ = ppo.gae(rewards, values, jnp.ones((1, 3), bool), gamma=1.0, lam=0.0)
    np.testing.assert_allclose(advantages, [[0.0, 0.0, 0.5]])


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_matches_numpy_with_prompt_and_padding_masked(gamma, lam):
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
    mask = np.zeros((4, 9), bool)
    mask[0, 2:7] = True  # prompt before, padding after
    mask[1, 0:9] = True
    mask[2, 5:6] = True  # one token
    # row 3: no response at all
    advantages, returns = ppo.gae(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam
    )
    expected_advantages, expected_returns = np_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-5, atol=1e-6)
    # What lies off the mask never matters.
    garbage = np.where(mask, rewards, 1e6), np.where(mask, values, -1e6)
    shifted, _ = ppo.gae(
        *(jnp.asarray(a) for a in garbage), jnp.asarray(mask), gamma=gamma, lam=lam
    )
    np.testing.assert_allclose(shifted, advantages, rtol=1e-6)


def test_kl_penalized_rewards_pay_the_score_at_the_last_response_token():
    policy = jnp.array([[9.0, -1.0, -2.0, -0.5, 9.0]])
    ref = jnp.array([[0.0, -1.5, -1.0, -0.5, 0.0]])
    mask = jnp.array([[False, True, True, True, False]])
    rewards, kl = ppo.kl_penalized_rewards(jnp.array([2.0]), policy, ref, mask, kl_coef=0.1)
    # Log-ratios 0.5, −1, 0 on the response; −β·those, and the score 2 on the last one.
    np.testing.assert_allclose(kl, [[0.0, 0.5, -1.0, 0.0, 0.0]])
    np.testing.assert_allclose(rewards, [[0.0, -0.05, 0.1, 2.0, 0.0]], rtol=1e-6)


def test_clipped_surrogate_by_hand():
    # ε = 0.2. Token 1: ρ = e^0.5 ≈ 1.6487, A = 1: max(−1.6487, −1.2) = −1.2 (clipped).
    # Token 2: ρ = e^−0.5 ≈ 0.6065, A = 1: max(−0.6065, −0.8) = −0.6065 (not clipped).
    # Token 3: ρ = 1, A = −2: 2. Token 4 is off the mask. Mean over 3 tokens.
    logps = jnp.array([[0.5, -0.5, 0.0, 3.0]])
    old = jnp.zeros((1, 4))
    advantages = jnp.array([[1.0, 1.0, -2.0, 5.0]])
    mask = jnp.array([[True, True, True, False]])
    loss, metrics = ppo.clipped_surrogate_loss(logps, old, advantages, mask, clip_range=0.2)
    np.testing.assert_allclose(loss, (-1.2 - math.exp(-0.5) + 2.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["policy/clipfrac"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["policy/approxkl"], 0.5 * (0.25 + 0.25) / 3, rtol=1e-6)
    # The clipped token passes no gradient; the others pass −A·ρ/3 to log π.
    grad = jax.grad(
        lambda x: ppo.clipped_surrogate_loss(x, old, advantages, mask, clip_range=0.2)[0]
    )(logps)
    np.testing.assert_allclose(grad, [[0.0, -math.exp(-0.5) / 3, 2.0 / 3, 0.0]], rtol=1e-6)


def test_value_loss_by_hand():
    # ε_v = 0.5. Token 1: V = 2, V_old = 0 -> V_clip = 0.5, R = 1: max(1, 0.25) = 1.
    # Token 2: V = 0.2, V_old = 0, R = 1: V_clip = V, both 0.64. Loss ½·(1 + 0.64)/2 = 0.41.
    values = jnp.array([[2.0, 0.2, 7.0]])
    old = jnp.zeros((1, 3))
    returns = jnp.array([[1.0, 1.0, 0.0]])
    mask = jnp.array([[True, True, False]])
    loss, metrics = ppo.value_loss(values, old, returns, mask, clip_range_value=0.5)
    np.testing.assert_allclose(loss, 0.41, rtol=1e-6)
    assert float(metrics["val/clipfrac"]) == 0.0
    # Token 1 with R = 3 instead: unclipped (2 − 3)² = 1 < clipped (0.5 − 3)² = 6.25.
    _, metrics = ppo.value_loss(values, old, returns.at[0, 0].set(3.0), mask, clip_range_value=0.5)
    np.testing.assert_allclose(metrics["val/clipfrac"], 0.5)


def test_adaptive_kl_controller_by_hand():
    # Ziegler et al.: e = clip(KL/target − 1, ±0.2); β' = β·(1 + e·n/H).
    control = ppo.AdaptiveKL(coef=0.1, target=6.0, horizon=10_000.0)
    above = ppo.update_kl_coef(control, current_kl=12.0, num_samples=256)  # e clipped to 0.2
    np.testing.assert_allclose(above.coef, 0.1 * (1 + 0.2 * 256 / 10_000), rtol=1e-6)
    below = ppo.update_kl_coef(control, current_kl=5.4, num_samples=512)  # e = −0.1
    np.testing.assert_allclose(below.coef, 0.1 * (1 - 0.1 * 512 / 10_000), rtol=1e-6)
    assert ppo.update_kl_coef(ppo.FixedKL(0.05), 100.0, 256) == ppo.FixedKL(0.05)


def test_masked_whiten_has_zero_mean_unit_variance_on_the_mask():
    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 2.0, (3, 6))
    mask = rng.uniform(size=(3, 6)) < 0.7
    whitened = np.asarray(ppo.masked_whiten(jnp.asarray(values), jnp.asarray(mask)))
    np.testing.assert_allclose(whitened[mask].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(whitened[mask].std(), 1.0, rtol=1e-4)
    assert np.all(whitened[~mask] == 0.0)
