"""PPO's pieces for RLHF as pure jax.numpy functions over response tokens: KL-penalised rewards,
GAE, the clipped surrogate and value losses, and the fixed or adaptive KL coefficient.

Conventions (those of Ziegler et al. 2019, arXiv:1909.08593, and TRL's PPO):
- Arrays are [B, T] over a batch of sampled responses; `mask` [B, T] bool is True on response
  tokens (the actions), False on prompt and padding. Values, log-probs and rewards are read at
  the positions of the tokens they score.
- Means over tokens are over every valid token of the batch (Σ masked / Σ mask).
- The episode ends after the last response token: the value beyond it is 0.

Like `dpo_jax.losses`, this module imports jax alone; the rollout loop is not here.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over the True entries of `mask` (same shape); 0 when there are none."""
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def masked_whiten(values: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(values − mean) / std over the valid entries (population variance), 0 elsewhere; with
    shift_mean=False the mean is added back (TRL whitens rewards so, advantages fully)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * jax.lax.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0.0)


class FixedKL(NamedTuple):
    """A constant KL coefficient β."""

    coef: float | jax.Array


class AdaptiveKL(NamedTuple):
    """Ziegler et al.'s proportional controller of β toward a target KL (their §2.2).

    Attributes:
      coef: the current β.
      target: KL_target, nats per sequence.
      horizon: H, in samples (episodes); Ziegler et al. use 10,000.
    """

    coef: float | jax.Array
    target: float
    horizon: float


def update_kl_coef(control: FixedKL | AdaptiveKL, current_kl, num_samples) -> FixedKL | AdaptiveKL:
    """The controller after a batch of `num_samples` episodes whose mean KL was `current_kl`.

    Fixed: unchanged. Adaptive: e = clip(KL / KL_target − 1, −0.2, 0.2) and
    β' = β·(1 + e·num_samples / H).
    """
    if isinstance(control, FixedKL):
        return control
    error = jnp.clip(current_kl / control.target - 1.0, -0.2, 0.2)
    return control._replace(coef=control.coef * (1.0 + error * num_samples / control.horizon))


def kl_penalized_rewards(
    scores: jax.Array,
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    mask: jax.Array,
    kl_coef: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Per-token rewards r_t = −β·(log π(a_t) − log π_ref(a_t)), plus the score at the last token.

    R(x, y) = r(x, y) − β·log(π(y|x) / π_ref(y|x)), spread over the tokens: each response token
    pays its own log-ratio (the per-token KL estimate k1), and the sequence's score (from the
    reward model or the true reward) is paid at its last response token.

    Args:
      scores: [B] float, the reward of each whole response.
      policy_logps: [B, T] float, log-probs of the sampled tokens (any value off mask).
      ref_logps: [B, T] float, π_ref's log-probs of the same tokens.
      mask: [B, T] bool, response tokens.
      kl_coef: β (a float or a traced scalar: `FixedKL.coef`, `AdaptiveKL.coef`).

    Returns:
      (rewards [B, T] float32, 0 off mask; kl [B, T] float32, the per-token log-ratio, 0 off mask).
    """
    kl = jnp.where(mask, (policy_logps - ref_logps).astype(jnp.float32), 0.0)  # [B, T]
    positions = jnp.arange(mask.shape[1])[None, :]  # [1, T]
    last = jnp.max(jnp.where(mask, positions, -1), axis=1, keepdims=True)  # [B, 1]
    at_last = (positions == last) & mask  # [B, T]
    rewards = -kl_coef * kl + jnp.where(at_last, scores[:, None].astype(jnp.float32), 0.0)
    return jnp.where(mask, rewards, 0.0), kl


def gae(
    rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv:1506.02438, eq. 16).

    Over the valid tokens of each row, in order, with V = 0 after the last one:
        δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   returns_t = A_t + V_t,
    where t + 1 is the next *valid* token (positions off mask are skipped, so padding on either
    side, or a prompt, changes nothing).

    Args:
      rewards: [B, T] float.
      values: [B, T] float.
      mask: [B, T] bool.
      gamma: γ in [0, 1].
      lam: λ in [0, 1].

    Returns:
      (advantages [B, T] float32, returns [B, T] float32), both 0 off mask; no gradient.
    """
    rewards, values = jax.lax.stop_gradient((rewards, values))
    rewards = jnp.where(mask, rewards, 0.0).astype(jnp.float32)
    values = jnp.where(mask, values, 0.0).astype(jnp.float32)

    def step(carry, column):  # walks t = T−1 .. 0; carry: (V_{t+1}, A_{t+1}) of the next valid
        next_value, next_advantage = carry
        reward, value, valid = column  # [B] each
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(valid, value, next_value), jnp.where(valid, advantage, next_advantage))
        return carry, jnp.where(valid, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    columns = (rewards.T[::-1], values.T[::-1], mask.T[::-1])  # [T, B], last token first
    _, advantages = jax.lax.scan(step, (zeros, zeros), columns)
    advantages = advantages[::-1].T  # [B, T]
    return advantages, jnp.where(mask, advantages + values, 0.0)


def clipped_surrogate_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_range: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped policy loss (Schulman et al. 2017, arXiv:1707.06347, eq. 7), per token:

        ρ_t = exp(log π(a_t) − log π_old(a_t)),
        L = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε)),  ε = clip_range.

    Args:
      logps: [B, T] log-probs under the policy being trained (differentiated).
      old_logps: [B, T] log-probs under the policy that sampled (no gradient).
      advantages: [B, T] (no gradient), e.g. `gae`'s, optionally `masked_whiten`ed.
      mask: [B, T] bool.
      clip_range: ε > 0.

    Returns:
      (loss, metrics): TRL's `policy/clipfrac` (fraction of tokens where the clipped term is
      the larger) and `policy/approxkl` (½·mean (log ρ)²), both without gradient.
    """
    old_logps, advantages = jax.lax.stop_gradient((old_logps, advantages))
    log_ratio = jnp.where(mask, logps - old_logps, 0.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "policy/clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "policy/approxkl": 0.5 * masked_mean(log_ratio**2, mask),
    }
    return loss, jax.lax.stop_gradient(metrics)


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip_range_value: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped value loss of PPO's reference implementation, as TRL's:

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v),
        L = ½·mean_t max((V − R)², (V_clip − R)²),  R = returns.

    Returns:
      (loss, metrics): `val/clipfrac`, the fraction of tokens where the clipped error is larger.
    """
    old_values, returns = jax.lax.stop_gradient((old_values, returns))
    clipped_values = old_values + jnp.clip(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(unclipped_error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > unclipped_error).astype(jnp.float32), mask)
    return loss, {"val/clipfrac": jax.lax.stop_gradient(clipfrac)}
