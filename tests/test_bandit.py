"""The derivation on an enumerable bandit: π* in closed form, DPO's optimum is π*, KL → 0."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.experiments import bandit


@pytest.fixture(scope="module")
def problem():
    return bandit.make_bandit(num_prompts=3, num_responses=5, beta=0.5, seed=1)


def test_optimal_policy_is_the_kl_constrained_optimum(problem):
    ref = np.exp(np.asarray(problem.ref_logprobs, np.float64))
    rewards = np.asarray(problem.rewards, np.float64)
    optimal = np.exp(np.asarray(bandit.optimal_logprobs(problem), np.float64))
    # NumPy closed form π_ref·exp(r/β)/Z.
    unnormalised = ref * np.exp(rewards / problem.beta)
    np.testing.assert_allclose(
        optimal, unnormalised / unnormalised.sum(-1, keepdims=True), rtol=1e-5
    )

    # π* maximises E_π[r] − β·KL(π ‖ π_ref): every random policy (float64) scores lower.
    def objective(policy):
        return np.sum(policy * rewards, -1) - problem.beta * np.sum(
            policy * np.log(policy / ref), -1
        )

    best = objective(optimal)
    candidates = np.random.default_rng(0).dirichlet(np.ones(5), size=(2000, 3))  # [2000, X, Y]
    assert np.all(objective(candidates) < best[None] + 1e-6)


def test_expected_pair_weights_are_bradley_terry_on_reference_draws(problem):
    weights = np.asarray(bandit.expected_pair_weights(problem), np.float64)
    ref = np.exp(np.asarray(problem.ref_logprobs, np.float64))
    rewards = np.asarray(problem.rewards, np.float64)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
    for x, a, b in itertools.product(range(3), range(5), range(5)):
        if a == b:
            assert weights[x, a, b] == 0.0
            continue
        # Two ordered draws without repetition give {a, b}; a wins with σ(r_a − r_b).
        draws = ref[x, a] * ref[x, b] / (1 - ref[x, a]) + ref[x, b] * ref[x, a] / (1 - ref[x, b])
        wins = 1 / (1 + np.exp(rewards[x, b] - rewards[x, a]))
        np.testing.assert_allclose(weights[x, a, b], draws * wins / 3, rtol=1e-5)


def test_sampled_pair_counts_follow_the_expected_table(problem):
    num_pairs = 1 << 18
    counts = np.asarray(bandit.sample_pair_counts(problem, num_pairs, jax.random.key(0)))
    assert counts.sum() == num_pairs
    assert np.all(counts[:, np.arange(5), np.arange(5)] == 0)  # never chosen == rejected
    expected = np.asarray(bandit.expected_pair_weights(problem))
    # Binomial standard error of a frequency p is sqrt(p(1 − p)/N) <= 1e-3 here; allow 5 of them.
    assert np.max(np.abs(counts / num_pairs - expected)) < 5e-3


def test_dpo_with_infinite_data_recovers_the_optimum_z_never_computed(problem):
    policy = bandit.fit_policy(problem, bandit.expected_pair_weights(problem), num_steps=3000)
    optimal = bandit.optimal_logprobs(problem)
    assert float(bandit.kl_divergence(policy, optimal)) < 1e-6
    np.testing.assert_allclose(np.exp(policy), np.exp(optimal), atol=1e-4)


def test_z_cancels_in_the_dpo_loss(problem):
    # Shifting log π by any c(x) (a different normaliser per prompt) leaves every pair's loss as
    # it was, which is why DPO needs no Z(x).
    weights = bandit.expected_pair_weights(problem)
    logits = jax.random.normal(jax.random.key(3), problem.rewards.shape)
    shifted = logits + jnp.array([[5.0], [-2.0], [0.3]])
    loss = bandit._table_loss(logits, problem, weights)
    np.testing.assert_allclose(float(bandit._table_loss(shifted, problem, weights)), float(loss))


def test_kl_to_the_optimum_falls_below_001_nats_with_enough_pairs(problem):
    kls = bandit.kl_curve(problem, (256, 1 << 18), num_seeds=2, num_steps=2000)
    assert np.all(kls[1] < 0.01), kls
    assert np.all(kls[0] > 10 * kls[1]), kls  # and it falls with N


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_responses=1), "num_responses=1"),
        (dict(num_prompts=0), "num_prompts=0"),
        (dict(beta=0.0), "beta=0.0"),
    ],
)
def test_bad_problem_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bandit.make_bandit(**kwargs)


def test_bad_pair_count_is_refused(problem):
    with pytest.raises(ValueError, match="num_pairs=0"):
        bandit.sample_pair_counts(problem, 0, jax.random.key(0))
