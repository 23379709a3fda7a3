"""PPO with the KL penalty at β reaches the π* that DPO reaches, on the enumerable bandit."""

import numpy as np
import pytest

from dpo_jax.experiments import bandit, bandit_ppo


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_ppo_with_the_kl_penalty_reaches_pi_star_as_dpo_does(beta):
    problem = bandit.make_bandit(num_prompts=3, num_responses=5, beta=beta, seed=1)
    optimal = bandit.optimal_logprobs(problem)
    assert float(bandit.kl_divergence(problem.ref_logprobs, optimal)) > 0.05  # far to go
    policy, history = bandit_ppo.fit_ppo(problem, seed=3)
    assert float(bandit.kl_divergence(policy, optimal)) < 0.01
    dpo_policy = bandit.fit_policy(problem, bandit.expected_pair_weights(problem))
    assert float(bandit.kl_divergence(policy, dpo_policy)) < 0.01
    # The last batch's sampled KL to π_ref estimates KL(π* ‖ π_ref), the optimum's own.
    optimum_kl = float(bandit.kl_divergence(optimal, problem.ref_logprobs))
    assert abs(float(history["objective/kl"][-1]) - optimum_kl) < 0.1 * optimum_kl + 0.01
    # Its mean score approaches E_π*[r] (one batch of samples: within a few standard errors).
    optimal_score = float(np.mean(np.sum(np.exp(optimal) * problem.rewards, axis=-1)))
    assert abs(float(history["objective/scores"][-1]) - optimal_score) < 0.05


def test_without_the_penalty_ppo_leaves_pi_star_for_the_best_response():
    # β → 0 makes π* greedy on r; with β = 0.5's reward but a tiny penalty, PPO goes past π*.
    problem = bandit.make_bandit(num_prompts=3, num_responses=5, beta=0.5, seed=1)
    greedy = problem._replace(beta=1e-3)
    policy, _ = bandit_ppo.fit_ppo(greedy, seed=3)
    assert float(bandit.kl_divergence(policy, bandit.optimal_logprobs(problem))) > 0.1


@pytest.mark.parametrize(
    "field, value", [("num_iterations", 0), ("epochs", 0), ("clip_range", 0.0)]
)
def test_a_setting_that_is_not_positive_is_refused(field, value):
    problem = bandit.make_bandit()
    with pytest.raises(ValueError, match=f"PPOSettings.{field}={value}"):
        bandit_ppo.fit_ppo(problem, bandit_ppo.PPOSettings()._replace(**{field: value}))
