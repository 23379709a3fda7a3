"""PPO with a KL penalty on the enumerable bandit: RLHF's route to the same π* that DPO reaches.

On `dpo_jax.experiments.bandit`'s problem, PPO maximises E_π[r] − β·KL(π ‖ π_ref) by sampling:
each iteration draws responses y ~ π_old(·|x) for every prompt, pays each the penalised reward
R = r(x, y) − β·(log π_old(y|x) − log π_ref(y|x)) (`dpo_jax.ppo.kl_penalized_rewards`, one
token per episode), takes advantages by GAE against a value table V(x) (with γ = λ = 1 and one
step, A = R − V(x)), whitens them, and runs a few Adam epochs of the clipped surrogate plus the
clipped value loss on that batch. The penalised reward's policy gradient is the objective's
(the KL's own score term has mean 0), so PPO's fixed point is π* = π_ref·exp(r/β)/Z, which
`optimal_logprobs` gives in closed form; the learning rate decays linearly to 0 so the sampling
noise of the last iterations averages out.

Everything is one jitted `lax.scan` over iterations, with the pieces of `dpo_jax.ppo` the
language-model PPO uses, so this checks those pieces where the answer is known.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpo_jax import ppo
from dpo_jax.experiments.bandit import Bandit


class PPOSettings(NamedTuple):
    """PPO's settings on the bandit.

    Attributes:
      num_iterations: rollout-and-learn iterations.
      samples_per_prompt: responses drawn for every prompt each iteration.
      epochs: Adam steps on each batch (PPO's epochs; the batch is one minibatch).
      learning_rate: Adam's initial step size, decayed linearly to 0.
      clip_range: ε of the clipped surrogate.
      clip_range_value: ε_v of the clipped value loss.
      value_coef: weight of the value loss.
    """

    num_iterations: int = 400
    samples_per_prompt: int = 1024
    epochs: int = 4
    learning_rate: float = 0.05
    clip_range: float = 0.2
    clip_range_value: float = 10.0
    value_coef: float = 0.5


def fit_ppo(
    bandit: Bandit, settings: PPOSettings | None = None, *, seed: int = 0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO of a tabular policy from π_ref with the KL penalty at β = `bandit.beta`.

    Args:
      bandit: the problem.
      settings: PPO's settings (None: `PPOSettings()`'s defaults).
      seed: the sampling seed.

    Returns:
      (log π_θ [X, Y] after the last iteration, history): history holds per-iteration [I]
      arrays `objective/scores` (mean r of the samples), `objective/kl` (mean log π_old − log
      π_ref of the samples, nats), `policy/clipfrac` and `val/clipfrac` of the last epoch.

    Raises:
      ValueError: a setting that is not positive (naming it).
    """
    settings = PPOSettings() if settings is None else settings
    for name in ("num_iterations", "samples_per_prompt", "epochs"):
        if getattr(settings, name) < 1:
            raise ValueError(f"PPOSettings.{name}={getattr(settings, name)} must be >= 1")
    for name in ("learning_rate", "clip_range", "clip_range_value"):
        if not getattr(settings, name) > 0:
            raise ValueError(f"PPOSettings.{name}={getattr(settings, name)} must be > 0")
    return _fit_ppo(bandit.ref_logprobs, bandit.rewards, bandit.beta, settings, seed)


@functools.partial(jax.jit, static_argnames=("beta", "settings", "seed"))
def _fit_ppo(ref_logprobs, rewards, beta, settings, seed):
    num_prompts, _ = ref_logprobs.shape
    total_steps = settings.num_iterations * settings.epochs
    tx = optax.adam(optax.linear_schedule(settings.learning_rate, 0.0, total_steps))
    params = {"logits": ref_logprobs, "values": jnp.zeros((num_prompts,), jnp.float32)}
    prompts = jnp.repeat(jnp.arange(num_prompts), settings.samples_per_prompt)  # [B]
    mask = jnp.ones((prompts.shape[0], 1), bool)  # one action per episode

    def losses(params, batch):
        logps = jax.nn.log_softmax(params["logits"], axis=-1)[prompts, batch["actions"]][:, None]
        values = params["values"][prompts][:, None]
        policy_loss, policy_metrics = ppo.clipped_surrogate_loss(
            logps, batch["old_logps"], batch["advantages"], mask, clip_range=settings.clip_range
        )
        critic_loss, critic_metrics = ppo.value_loss(
            values, batch["old_values"], batch["returns"], mask,
            clip_range_value=settings.clip_range_value,
        )  # fmt: skip
        return policy_loss + settings.value_coef * critic_loss, {**policy_metrics, **critic_metrics}

    def iteration(carry, rng):
        params, opt_state = carry
        policy_logprobs = jax.nn.log_softmax(params["logits"], axis=-1)  # π_old
        actions = jax.random.categorical(rng, policy_logprobs[prompts])  # [B]
        old_logps = policy_logprobs[prompts, actions][:, None]  # [B, 1]
        ref_logps = ref_logprobs[prompts, actions][:, None]
        scores = rewards[prompts, actions]  # [B]
        token_rewards, kl = ppo.kl_penalized_rewards(scores, old_logps, ref_logps, mask, beta)
        old_values = params["values"][prompts][:, None]
        advantages, returns = ppo.gae(token_rewards, old_values, mask, gamma=1.0, lam=1.0)
        batch = {
            "actions": actions,
            "old_logps": old_logps,
            "old_values": old_values,
            "advantages": ppo.masked_whiten(advantages, mask),
            "returns": returns,
        }

        def epoch(carry, _):
            params, opt_state = carry
            grads, metrics = jax.grad(losses, has_aux=True)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        (params, opt_state), metrics = jax.lax.scan(
            epoch, (params, opt_state), None, length=settings.epochs
        )
        history = {
            "objective/scores": jnp.mean(scores),
            "objective/kl": jnp.mean(kl),
            **jax.tree.map(lambda m: m[-1], metrics),
        }
        return (params, opt_state), history

    rngs = jax.random.split(jax.random.key(seed), settings.num_iterations)
    (params, _), history = jax.lax.scan(iteration, (params, tx.init(params)), rngs)
    return jax.nn.log_softmax(params["logits"], axis=-1), history
