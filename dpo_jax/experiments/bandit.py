"""The derivation checked on an enumerable bandit: DPO on Bradley–Terry pairs recovers π*.

The problem: prompts x = 0..X-1 (uniform), single-token responses y = 0..Y-1, a known reference
π_ref(y|x) and reward r(x, y). The KL-constrained optimum of E[r] − β·KL(π ‖ π_ref) is

    π*(y|x) = π_ref(y|x)·exp(r(x, y)/β) / Z(x),

and DPO never computes Z(x): it cancels in the margin of a pair. Here pairs (y1, y2) are drawn
from π_ref (two distinct responses), labelled by Bradley–Terry, p(y1 ≻ y2) = σ(r(x, y1) − r(x, y2)),
and a tabular policy (one logit per (x, y)) is fitted by `dpo_jax.losses.dpo_loss_fn`
with optax. As the number of pairs grows, KL(π_θ ‖ π*) goes to 0.

Pairs are kept as a table of counts [X, Y, Y] (chosen, rejected), so the fit costs the same for
any number of pairs, and the infinite-data limit is the same code with the exact expected table.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpo_jax.losses import dpo_loss_fn


class Bandit(NamedTuple):
    """A tabular preference problem.

    Attributes:
      ref_logprobs: [X, Y] float32, log π_ref(y|x) (each row normalised).
      rewards: [X, Y] float32, r(x, y).
      beta: β > 0 of the KL-constrained objective (and of the DPO loss).
    """

    ref_logprobs: jax.Array
    rewards: jax.Array
    beta: float


def make_bandit(
    num_prompts: int = 4,
    num_responses: int = 6,
    *,
    beta: float = 0.5,
    reward_scale: float = 1.0,
    seed: int = 0,
) -> Bandit:
    """A random bandit: π_ref a softmax of N(0, 1) logits, r ~ reward_scale·N(0, 1).

    Raises:
      ValueError: fewer than 1 prompt or 2 responses, or β <= 0.
    """
    if num_prompts < 1 or num_responses < 2:
        raise ValueError(
            f"num_prompts={num_prompts} must be >= 1 and num_responses={num_responses} >= 2"
        )
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    ref_key, reward_key = jax.random.split(jax.random.key(seed))
    shape = (num_prompts, num_responses)
    ref_logprobs = jax.nn.log_softmax(jax.random.normal(ref_key, shape), axis=-1)
    rewards = reward_scale * jax.random.normal(reward_key, shape)
    return Bandit(ref_logprobs, rewards, float(beta))


def optimal_logprobs(bandit: Bandit) -> jax.Array:
    """[X, Y] log π*(y|x) = log π_ref(y|x) + r(x, y)/β − log Z(x), computed exactly."""
    unnormalised = bandit.ref_logprobs + bandit.rewards / bandit.beta
    return unnormalised - jax.nn.logsumexp(unnormalised, axis=-1, keepdims=True)


def kl_divergence(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """Mean over prompts (rows) of KL(p ‖ q) = Σ_y p(y)·(log p(y) − log q(y)), in nats.

    Args:
      logp: [X, Y] log-probabilities of p (rows normalised).
      logq: [X, Y] log-probabilities of q.
    """
    return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1))


def _distinct_pair_probs(bandit: Bandit) -> jax.Array:
    """[X, Y, Y] p(y1, y2 | x): y1 ~ π_ref, then y2 ~ π_ref restricted to y2 != y1."""
    ref = jnp.exp(bandit.ref_logprobs)  # [X, Y]
    num_responses = ref.shape[1]
    off_diagonal = 1.0 - jnp.eye(num_responses)  # [Y, Y]
    second = ref[:, None, :] * off_diagonal[None]  # [X, Y1, Y2]
    second = second / jnp.sum(second, axis=-1, keepdims=True)
    return ref[:, :, None] * second


def expected_pair_weights(bandit: Bandit) -> jax.Array:
    """[X, Y, Y] the infinite-data table: the probability that a pair is (x, chosen, rejected).

    w[x, a, b] = p(x)·Σ over the draw orders giving the pair {a, b}, times σ(r_a − r_b), the
    Bradley–Terry probability that a beats b. Sums to 1.
    """
    pair_probs = _distinct_pair_probs(bandit)  # [X, Y1, Y2]
    unordered = pair_probs + jnp.swapaxes(pair_probs, 1, 2)  # p({a, b}), as (a, b) and (b, a)
    margins = bandit.rewards[:, :, None] - bandit.rewards[:, None, :]  # [X, A, B] r_a − r_b
    num_prompts = bandit.rewards.shape[0]
    return unordered * jax.nn.sigmoid(margins) / num_prompts


def sample_pair_counts(bandit: Bandit, num_pairs: int, rng: jax.Array) -> jax.Array:
    """[X, Y, Y] float32 counts of sampled (x, chosen, rejected) pairs; they sum to num_pairs.

    x is uniform, (y1, y2) two distinct draws from π_ref(·|x), and y1 is chosen with the
    Bradley–Terry probability σ(r(x, y1) − r(x, y2)).

    Raises:
      ValueError: num_pairs < 1.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs} must be >= 1")
    prompt_key, pair_key, label_key = jax.random.split(rng, 3)
    num_prompts, num_responses = bandit.rewards.shape
    prompts = jax.random.randint(prompt_key, (num_pairs,), 0, num_prompts)  # [N]
    pair_probs = _distinct_pair_probs(bandit).reshape(num_prompts, -1)  # [X, Y·Y]
    flat = jax.random.categorical(pair_key, jnp.log(pair_probs[prompts]))  # [N], log 0 = -inf
    first, second = flat // num_responses, flat % num_responses
    margin = bandit.rewards[prompts, first] - bandit.rewards[prompts, second]
    first_wins = jax.random.uniform(label_key, (num_pairs,)) < jax.nn.sigmoid(margin)
    chosen = jnp.where(first_wins, first, second)
    rejected = jnp.where(first_wins, second, first)
    counts = jnp.zeros((num_prompts, num_responses, num_responses), jnp.float32)
    return counts.at[prompts, chosen, rejected].add(1.0)


def _table_loss(policy_logits: jax.Array, bandit: Bandit, weights: jax.Array) -> jax.Array:
    """The DPO loss of every (x, chosen, rejected) cell, weighted by `weights` [X, Y, Y]."""
    num_prompts, num_responses = bandit.rewards.shape
    policy_logprobs = jax.nn.log_softmax(policy_logits, axis=-1)
    x, chosen, rejected = jnp.meshgrid(
        jnp.arange(num_prompts), jnp.arange(num_responses), jnp.arange(num_responses), indexing="ij"
    )
    x, chosen, rejected = x.reshape(-1), chosen.reshape(-1), rejected.reshape(-1)  # [X·Y·Y]

    def pair_loss(policy_w, policy_l, ref_w, ref_l):
        # One pair at a time: dpo_loss_fn averages over its pairs, the table needs a weighted sum.
        loss, _ = dpo_loss_fn(
            policy_w[None], policy_l[None], ref_w[None], ref_l[None], beta=bandit.beta
        )
        return loss

    losses = jax.vmap(pair_loss)(
        policy_logprobs[x, chosen],
        policy_logprobs[x, rejected],
        bandit.ref_logprobs[x, chosen],
        bandit.ref_logprobs[x, rejected],
    )  # [X·Y·Y]
    flat_weights = weights.reshape(-1)
    return jnp.sum(flat_weights * losses) / jnp.sum(flat_weights)


def fit_policy(
    bandit: Bandit,
    pair_weights: jax.Array,
    *,
    num_steps: int = 3000,
    learning_rate: float = 0.05,
) -> jax.Array:
    """DPO of a tabular policy from π_ref on a table of pairs; returns [X, Y] log π_θ.

    The policy is one logit per (x, y), initialised at log π_ref, trained full-batch with Adam
    (a `lax.scan` of `num_steps` steps, one compiled program). A response that no pair mentions
    keeps its reference logit (its gradient is 0) up to the shift of its row.

    Args:
      bandit: the problem (π_ref and β; the rewards are not read).
      pair_weights: [X, Y, Y] counts or probabilities of (x, chosen, rejected).
      num_steps: Adam steps.
      learning_rate: Adam's step size.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    tx = optax.adam(learning_rate)
    return _fit(
        bandit.ref_logprobs,
        bandit.rewards,
        pair_weights,
        beta=bandit.beta,
        tx=tx,
        num_steps=num_steps,
    )


@functools.partial(jax.jit, static_argnames=("beta", "tx", "num_steps"))
def _fit(ref_logprobs, rewards, pair_weights, *, beta, tx, num_steps):
    bandit = Bandit(ref_logprobs, rewards, beta)  # beta static: dpo_loss_fn validates it
    params = ref_logprobs
    grad_fn = jax.grad(_table_loss)

    def step(carry, _):
        params, opt_state = carry
        grads = grad_fn(params, bandit, pair_weights)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=num_steps)
    return jax.nn.log_softmax(params, axis=-1)


def kl_curve(
    bandit: Bandit,
    pair_counts: tuple[int, ...],
    *,
    num_seeds: int = 3,
    seed: int = 0,
    num_steps: int = 3000,
    learning_rate: float = 0.05,
) -> np.ndarray:
    """KL(π_θ ‖ π*) after DPO on N sampled pairs, for each N and seed.

    Returns:
      [len(pair_counts), num_seeds] float64 KL in nats.
    """
    target = optimal_logprobs(bandit)
    kls = np.zeros((len(pair_counts), num_seeds))
    for i, num_pairs in enumerate(pair_counts):
        for s in range(num_seeds):
            rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), num_pairs), s)
            counts = sample_pair_counts(bandit, num_pairs, rng)
            policy = fit_policy(bandit, counts, num_steps=num_steps, learning_rate=learning_rate)
            kls[i, s] = float(kl_divergence(policy, target))
    return kls


def write_curve(
    pair_counts: tuple[int, ...], kls: np.ndarray, png_path: str, csv_path: str
) -> None:
    """Writes the KL-vs-pairs curve as a CSV (one row per N and seed) and a log-log PNG.

    Args:
      pair_counts: the N of each row of `kls`.
      kls: [len(pair_counts), num_seeds] KL(π_θ ‖ π*) in nats, from `kl_curve`.
      png_path: where the plot goes.
      csv_path: where the table goes (columns: num_pairs, seed, kl_nats).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: scripts, notebooks' tests and CI
    import matplotlib.pyplot as plt

    with open(csv_path, "w") as f:
        f.write("num_pairs,seed,kl_nats\n")
        for num_pairs, row in zip(pair_counts, kls, strict=True):
            for seed, kl in enumerate(row):
                f.write(f"{num_pairs},{seed},{kl:.6g}\n")
    figure, axes = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    for seed in range(kls.shape[1]):
        axes.plot(pair_counts, kls[:, seed], "o", color="tab:blue", alpha=0.35, markersize=4)
    axes.plot(pair_counts, np.median(kls, axis=1), "-", color="tab:blue", label="median of seeds")
    axes.axhline(0.01, color="tab:red", linestyle="--", linewidth=1, label="0.01 nats")
    axes.set(
        xscale="log",
        yscale="log",
        xlabel="preference pairs N",
        ylabel="KL(π_θ ‖ π*)  [nats]",
        title="DPO on an enumerable bandit recovers π*",
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
