"""PPO's training step for a language model: rollout, scores, advantages and the clipped updates,
one pure function of pytrees, jit-compiled over sharded batches like `dpo_jax.step.update_fn`.

One call of `ppo_update_fn` is one PPO iteration, as RLHF runs it (Ziegler et al. 2019; TRL's
PPOTrainer):
1. rollout: a response is sampled from the policy for each prompt of the batch (temperature 1,
   the policy's own distribution, through `dpo_jax.sampling.make_sample_fn`);
2. the sampled rows are scored: log π_old and log π_ref of every response token, the value
   model's V at every position, and the sequence's score (`score_fn`: a reward model's head, or
   the true reward on the host);
3. the per-token reward r_t = −β·(log π_old − log π_ref), plus the score at the last token
   (`dpo_jax.ppo.kl_penalized_rewards`), GAE, advantages whitened over the batch;
4. `epochs` passes over the batch in `num_minibatches` shuffled minibatches, each one Adam step
   on the clipped surrogate + value_coef · the clipped value loss.

Layout: the rows are [prompt; response] of length L = P + R. Everything per token sits at the
position whose hidden state makes the prediction (`dpo_jax.logprobs.next_token_targets`): at
position t, logps[t] = log π(token_{t+1} | tokens_≤t) and values[t] = V(tokens_≤t), and the action
mask is True where token_{t+1} is a response token.

The state's params are {"policy": the model's params, "value": {"backbone": a model's params,
"head": {"kernel": [D], "bias": []}}}: a separate value model, as TRL's (initialised from the
reward model when there is one). The step's `reference` is a `FrozenReference` of the same
structure: π_ref as "policy" and, as "value", the reward model (or the value model's start).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpo_jax import ppo
from dpo_jax import step as step_lib
from dpo_jax.logprobs import next_token_targets, unembedded_token_logps


class PPOSettings(NamedTuple):
    """PPO's static settings (config.ppo; each documented in configs/default.py).

    Attributes:
      kl_coef: β of the per-token KL penalty to π_ref: fixed, or the adaptive controller's start.
      kl_target: > 0: β is Ziegler et al.'s adaptive controller (`dpo_jax.ppo.AdaptiveKL`)
        toward this KL, nats per sequence, carried in `TrainState.running["kl_coef"]` and
        updated after each rollout from its mean KL; 0: β is fixed at kl_coef.
      kl_horizon: the controller's horizon H, in samples.
      epochs: passes over each rollout batch.
      num_minibatches: minibatches per pass (the batch must divide by it).
      clip_range: ε of the clipped surrogate.
      clip_range_value: ε_v of the clipped value loss.
      value_coef: weight of the value loss.
      gamma, lam: GAE's γ and λ.
      whiten_rewards: whiten the per-token rewards over the batch before GAE (TRL's option).
    """

    kl_coef: float = 0.1
    kl_target: float = 0.0
    kl_horizon: float = 10_000.0
    epochs: int = 4
    num_minibatches: int = 2
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    value_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False


def rollout_rows(
    prompt_tokens: jax.Array,
    prompt_positions: jax.Array,
    prompt_valid: jax.Array,
    response: jax.Array,
    lengths: jax.Array,
) -> dict[str, jax.Array]:
    """[prompt; response] rows from left-padded prompts [B, P] and sampled responses [B, R].

    Returns:
      tokens, positions, segment_ids (1 on real tokens, 0 on padding), response_mask (True on
      the first `lengths` response tokens), each [B, P + R].
    """
    response_length = response.shape[1]
    in_response = jnp.arange(response_length)[None, :] < lengths[:, None]  # [B, R]
    next_position = prompt_positions[:, -1:] + 1  # [B, 1]
    response_positions = next_position + jnp.arange(response_length)[None, :]
    valid = jnp.concatenate([prompt_valid, in_response], axis=1)
    return {
        "tokens": jnp.concatenate([prompt_tokens, response], axis=1),
        "positions": jnp.concatenate([prompt_positions, response_positions], axis=1),
        "segment_ids": valid.astype(jnp.int32),
        "response_mask": jnp.concatenate([jnp.zeros_like(prompt_valid), in_response], axis=1),
    }


def _forward(apply_fn, params, rows):
    return apply_fn(params, rows["tokens"], rows["positions"], rows["segment_ids"])


def token_logps(apply_fn, params, rows: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(logps [B, L] float32, action mask [B, L] bool) of the rows' response tokens, at the
    predicting positions; 0 off the mask. The model's logit soft-cap is applied."""
    targets, mask = next_token_targets(rows["tokens"], rows["response_mask"], rows["segment_ids"])
    hidden, unembedding = _forward(apply_fn, params, rows)
    cap = getattr(apply_fn, "final_logit_softcapping", None)
    logps = unembedded_token_logps(hidden, unembedding, targets, cap)
    return jnp.where(mask, logps, 0.0), mask


def _head(hidden: jax.Array, head: dict[str, jax.Array]) -> jax.Array:
    return jnp.einsum("...d,d->...", hidden.astype(jnp.float32), head["kernel"]) + head["bias"]


def token_values(apply_fn, value_params: dict, rows: dict[str, jax.Array]) -> jax.Array:
    """[B, L] float32: V(tokens_≤t) = w·h_t + b of the value model at every position."""
    hidden, _ = _forward(apply_fn, value_params["backbone"], rows)
    return _head(hidden, value_params["head"])


def reward_model_scores(apply_fn, reward_params: dict, rows: dict[str, jax.Array]) -> jax.Array:
    """[B] float32: a Bradley-Terry reward model's r = w·h + b at each response's last token,
    the position `dpo_jax.run.reward_model` reads in training."""
    hidden, _ = _forward(apply_fn, reward_params["backbone"], rows)
    positions = jnp.arange(rows["tokens"].shape[1])[None, :]
    last = jnp.max(jnp.where(rows["response_mask"], positions, 0), axis=1)  # [B]
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    return _head(last_hidden, reward_params["head"])


def initial_running(settings: PPOSettings) -> dict[str, float] | None:
    """`TrainState.running` at step 0: the adaptive controller's β, or None for a fixed β."""
    return {"kl_coef": settings.kl_coef} if settings.kl_target else None


def kl_control(state: step_lib.TrainState, settings: PPOSettings) -> ppo.FixedKL | ppo.AdaptiveKL:
    """The KL coefficient's controller at this state: fixed, or adaptive with the carried β."""
    if not settings.kl_target:
        return ppo.FixedKL(settings.kl_coef)
    return ppo.AdaptiveKL(state.running["kl_coef"], settings.kl_target, settings.kl_horizon)


def _minibatch_loss(params, minibatch, *, apply_fn, settings: PPOSettings):
    logps, mask = token_logps(apply_fn, params["policy"], minibatch)
    values = token_values(apply_fn, params["value"], minibatch)
    policy_loss, policy_metrics = ppo.clipped_surrogate_loss(
        logps, minibatch["old_logps"], minibatch["advantages"], mask,
        clip_range=settings.clip_range,
    )  # fmt: skip
    critic_loss, critic_metrics = ppo.value_loss(
        values, minibatch["old_values"], minibatch["returns"], mask,
        clip_range_value=settings.clip_range_value,
    )  # fmt: skip
    metrics = {
        "loss/policy_avg": policy_loss,
        "loss/value_avg": critic_loss,
        "policy/clipfrac_avg": policy_metrics["policy/clipfrac"],
        "policy/approxkl_avg": policy_metrics["policy/approxkl"],
        "val/clipfrac_avg": critic_metrics["val/clipfrac"],
    }
    return policy_loss + settings.value_coef * critic_loss, jax.lax.stop_gradient(metrics)


def _learn(params, opt_state, rollout, rng, *, apply_fn, tx, settings: PPOSettings):
    """`epochs` × `num_minibatches` Adam steps on one rollout batch; metrics averaged."""
    batch_size = rollout["tokens"].shape[0]
    minibatch_size = batch_size // settings.num_minibatches
    grad_fn = jax.grad(
        lambda p, m: _minibatch_loss(p, m, apply_fn=apply_fn, settings=settings), has_aux=True
    )

    def minibatch_step(carry, indices):
        params, opt_state = carry
        minibatch = jax.tree.map(lambda x: x[indices], rollout)
        grads, metrics = grad_fn(params, minibatch)
        updates, opt_state = tx.update(grads, opt_state, params)
        loss = metrics["loss/policy_avg"] + settings.value_coef * metrics["loss/value_avg"]
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return (optax.apply_updates(params, updates), opt_state), metrics

    orders = jax.vmap(lambda key: jax.random.permutation(key, batch_size))(
        jax.random.split(rng, settings.epochs)
    )  # [epochs, B]
    indices = orders.reshape(settings.epochs * settings.num_minibatches, minibatch_size)
    (params, opt_state), metrics = jax.lax.scan(minibatch_step, (params, opt_state), indices)
    return params, opt_state, jax.tree.map(jnp.mean, metrics)


def _score_rollout(state, reference, batch, rng, *, apply_fn, settings, sample_fn, score_fn):
    """Steps 1-3: the sampled rows with old logps, values, advantages and returns; metrics."""
    ref_params = jax.lax.stop_gradient(reference.params)
    policy = state.params["policy"]
    prompt_valid = batch["segment_ids"] > 0
    response, lengths, finished = sample_fn(
        policy, batch["tokens"], batch["positions"], prompt_valid, rng
    )
    rows = rollout_rows(batch["tokens"], batch["positions"], prompt_valid, response, lengths)
    old_logps, mask = token_logps(apply_fn, policy, rows)
    ref_logps, _ = token_logps(apply_fn, ref_params["policy"], rows)
    old_values = jnp.where(mask, token_values(apply_fn, state.params["value"], rows), 0.0)
    scores = score_fn(ref_params, rows, batch["prompt_index"], response, lengths)  # [B]
    kl_coef = kl_control(state, settings).coef
    rewards, kl = ppo.kl_penalized_rewards(scores, old_logps, ref_logps, mask, kl_coef)
    if settings.whiten_rewards:
        rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = ppo.gae(rewards, old_values, mask, gamma=settings.gamma, lam=settings.lam)
    rollout = {
        **rows,
        "old_logps": old_logps,
        "old_values": old_values,
        "advantages": ppo.masked_whiten(advantages, mask),
        "returns": returns,
    }
    sequence_kl = jnp.sum(kl, axis=1)  # [B]
    metrics = {
        "objective/kl": jnp.mean(sequence_kl),
        "objective/scores": jnp.mean(scores),
        "objective/non_score_reward": -kl_coef * jnp.mean(sequence_kl),
        "objective/rlhf_reward": jnp.mean(scores - kl_coef * sequence_kl),
        "objective/kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "val/num_eos_tokens": jnp.sum(finished, dtype=jnp.int32),
        "logps/chosen": jnp.mean(jnp.sum(old_logps, axis=1)),  # the step-0 check's names
        "logps/ref_abs_diff": jnp.mean(jnp.abs(sequence_kl)),
        "num_pairs": jnp.asarray(batch["tokens"].shape[0], jnp.int32),
    }
    return rollout, scores, jax.lax.stop_gradient(metrics)


def ppo_update_fn(
    state: step_lib.TrainState,
    reference: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    options: Any,
    mesh: Any,
    settings: PPOSettings,
    sample_fn: Callable,
    score_fn: Callable,
) -> tuple[step_lib.TrainState, dict[str, jax.Array]]:
    """One PPO iteration; `dpo_jax.step.update_fn`'s signature, so `run_stage` runs it.

    Args:
      state: TrainState with params {"policy", "value"} (see the module docstring).
      reference: FrozenReference({"policy": π_ref, "value": the reward model or value start}).
      batch: prompts left-padded: tokens, positions, segment_ids (1 real, 0 pad) [B, P] and
        prompt_index [B] int32 (which record each row is, for a host-side score).
      rng: the run's key; the iteration's is `fold_in(rng, state.step)`, so a resume samples
        the same responses.
      apply_fn: the model's forward (`dpo_jax.models.make_apply_fn`).
      tx: the optimizer of {"policy", "value"}.
      schedule: its learning-rate schedule, per iteration (for the logged rate).
      options: not read (`update_fn`'s signature).
      mesh: not read (`update_fn`'s signature).
      settings: PPOSettings.
      sample_fn: `dpo_jax.sampling.make_sample_fn`'s function for the policy's model:
        (params, tokens, positions, valid, rng) -> (response [B, R], lengths [B], finished [B]).
      score_fn: (reference params, rows, prompt_index [B], response [B, R], lengths [B]) -> [B]
        float32 scores of the sampled responses.

    Returns:
      (new state, metrics): TRL's PPO names (objective/kl, objective/scores,
      objective/non_score_reward, objective/rlhf_reward, loss/policy_avg, loss/value_avg,
      policy/clipfrac_avg, policy/approxkl_avg, val/clipfrac_avg, val/num_eos_tokens), and the
      run's loss, grad_norm, learning_rate, num_tokens, nonfinite. A non-finite score, loss or
      update changes nothing but the step counter.
    """
    del options, mesh
    sample_rng, shuffle_rng = jax.random.split(jax.random.fold_in(rng, state.step))
    rollout, scores, metrics = _score_rollout(
        state, reference, batch, sample_rng,
        apply_fn=apply_fn, settings=settings, sample_fn=sample_fn, score_fn=score_fn,
    )  # fmt: skip
    params, opt_state, learn_metrics = _learn(
        state.params, state.opt_state, rollout, shuffle_rng,
        apply_fn=apply_fn, tx=tx, settings=settings,
    )  # fmt: skip
    metrics.update(learn_metrics)
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    metrics["num_tokens"] = step_lib.batch_tokens(rollout)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    control = ppo.update_kl_coef(
        kl_control(state, settings), metrics["objective/kl"], batch["tokens"].shape[0]
    )
    if settings.kl_target:
        new_state = new_state.replace(running={"kl_coef": control.coef})
    finite = step_lib.all_finite(metrics["loss"], metrics["grad_norm"], params)
    finite = finite & jnp.all(jnp.isfinite(scores))
    metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.int32)
    return step_lib.applied_if(finite, new_state, state), metrics
