"""The reward-vs-KL experiment end to end, at a toy size (the real one: scripts/frontier.py)."""

import csv
import importlib.util
import math
import os

import numpy as np
import pytest

from dpo_jax.experiments import frontier, frontier_analysis


def _tiny_config():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
    spec = importlib.util.spec_from_file_location("default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.mesh.num_devices = 1
    return config


def test_best_of_n_kl_counts_ties():
    # One prompt whose π_ref reward is 0 or 1, each with probability 1/2: best-of-2 gives 1 with
    # probability 3/4, so KL = 1/4 log(1/4 / 1/2) + 3/4 log(3/4 / 1/2) = 0.1308 nats, far under
    # the no-ties bound log 2 − 1/2 = 0.1931. A prompt with one reward value has KL 0.
    draws = np.array([[0.0, 0.5], [1.0, 0.5], [0.0, 0.5], [1.0, 0.5]])  # [draws, prompts]
    kls = frontier_analysis.best_of_n_kl(draws, 2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    np.testing.assert_allclose(kls, [expected, 0.0], rtol=1e-12)
    # Without ties (many distinct values) it approaches log n − (n − 1)/n.
    distinct = np.arange(20_000, dtype=float)[:, None]
    bound = math.log(4) - 3 / 4
    assert frontier_analysis.best_of_n_kl(distinct, 4)[0] == pytest.approx(bound, abs=1e-3)


def test_kl_optimal_curve_matches_the_closed_form():
    # Rewards 0 and 1 equally likely under π_ref: π* ∝ π_ref·exp(r/τ) gives 1 with probability
    # p = σ(1/τ), and KL(π* ‖ π_ref) = p log 2p + (1 − p) log 2(1 − p).
    draws = np.array([[0.0], [1.0]])
    rows = frontier_analysis.kl_optimal_curve(draws, (1.0, 0.25))
    for row, tau in zip(rows, (1.0, 0.25), strict=True):
        p = 1 / (1 + math.exp(-1 / tau))
        assert row["reward"] == pytest.approx(p, rel=1e-12)
        kl = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
        assert row["kl"] == pytest.approx(kl, rel=1e-12)


def _row(kl, rewards, kl_stderr=0.0):
    rewards = np.asarray(rewards, float)
    return {"kl": kl, "kl_stderr": kl_stderr, "reward": rewards.mean(), "prompt_rewards": rewards}


def test_matched_kl_interpolates_per_prompt_and_adds_the_kl_error():
    curve = [_row(0.0, [0.0, 0.2]), _row(1.0, [0.4, 0.6])]  # reward = 0.4·KL + (0, 0.2)
    point = _row(0.5, [0.3, 0.3], kl_stderr=0.1)
    difference, stderr = frontier_analysis.matched_kl(point, curve)
    # Curve at KL 0.5: [0.2, 0.4]; differences [0.1, -0.1]: mean 0, s.e. 0.1; the KL's s.e. 0.1
    # times the slope 0.4 adds 0.04 in quadrature.
    assert difference == pytest.approx(0.0, abs=1e-12)
    assert stderr == pytest.approx(math.hypot(0.1, 0.04), rel=1e-12)
    assert frontier_analysis.matched_kl(_row(1.5, [0.3, 0.3]), curve) is None  # no extrapolation


@pytest.mark.slow
def test_frontier_writes_every_method_with_consistent_numbers(tmp_path):
    settings = frontier.FrontierSettings(
        betas=(0.5,),
        best_of=(1, 2, 4),
        reference_draws=8,
        sft_steps=4,
        tune_steps=2,
        # The toy's 4-step reference keeps only a handful of equal-length pairs (7 of 64
        # prompts): batches of 4, so that a batch never repeats records (the pipeline refuses it).
        batch_size=4,
        num_train_prompts=64,
        num_eval_prompts=16,
        held_out_pairs=2,
        rm_steps=2,
        ppo_kl_coefs=(0.2,),
        ppo_gt_kl_coefs=(0.2,),
        sweep_ppo_beta=0.2,
        ppo_steps=2,
        sweep_best_of=2,
        sweep_temperatures=(0.0, 1.0),
    )
    result = frontier.run_frontier(_tiny_config(), str(tmp_path), settings)
    rows = result.rows
    methods = [(row["method"], row["setting"]) for row in rows]
    assert methods == [
        ("SFT reference", ""),
        ("DPO", "beta=0.5"),
        ("Unlikelihood", "alpha=1.0"),
        ("Preferred-FT", ""),
        ("PPO", "beta=0.2"),
        ("PPO-GT", "beta=0.2"),
        ("best-of-N", "N=1"),
        ("best-of-N", "N=2"),
        ("best-of-N", "N=4"),
    ]
    assert rows[0]["kl"] == 0.0  # the reference against itself
    best = rows[6:]
    assert [row["kl_bound"] for row in best] == [0.0, math.log(2) - 0.5, math.log(4) - 0.75]
    assert best[0]["kl"] == 0.0
    assert all(row["kl"] <= row["kl_bound"] + 1e-12 for row in best)  # ties only lower it
    # The best of 4 draws is at least the best of their first 2, itself at least the first one.
    assert best[0]["reward"] <= best[1]["reward"] <= best[2]["reward"]
    assert all(0.0 <= row["reward"] <= 1.0 for row in rows + result.optimal)
    assert all(set(c) == set(frontier_analysis.COMPARISON_FIELDS) for c in result.comparisons)
    with open(tmp_path / "frontier.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == [m for m, _ in methods] + ["KL-optimal"] * len(
        frontier.OPTIMAL_TEMPERATURES
    )
    assert float(table[1]["kl"]) == pytest.approx(rows[1]["kl"])
    with open(tmp_path / "frontier_matched.csv") as f:
        assert len(list(csv.DictReader(f))) == len(result.comparisons)
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "pairs.jsonl").stat().st_size > 0
    # The reward model, scored on the held-out pairs beside the true reward's own accuracy there.
    model = result.reward_model
    assert model["num_pairs"] == 2 and 0.0 <= model["accuracy"] <= 1.0
    assert 0.5 <= model["ceiling"]["expected"] <= 1.0 and model["ceiling"]["num_pairs"] == 2
    with open(tmp_path / "frontier_reward_model.csv") as f:
        assert float(next(csv.DictReader(f))["reward_model_accuracy"]) == model["accuracy"]
    # The sweep: DPO at its β, PPO at its β, Preferred-FT and best-of-2, at each temperature.
    sweep = {(row["method"], row["temperature"]) for row in result.sweep}
    names = ("DPO β=0.5", "PPO β=0.2", "Preferred-FT", "best-of-2")
    assert sweep == {(name, t) for name in names for t in (0.0, 1.0)}
    assert all(0.0 <= row["win_rate"] <= 1.0 for row in result.sweep)
    assert (tmp_path / "temperature_sweep.png").stat().st_size > 10_000


def test_the_dpo_curve_is_read_at_each_ppo_point():
    dpo = [
        {**_row(0.0, [0.0, 0.2]), "method": "DPO", "setting": "beta=1"},
        {**_row(1.0, [0.4, 0.6]), "method": "DPO", "setting": "beta=0.1"},
    ]
    ppo = {**_row(0.5, [0.5, 0.5]), "method": "PPO", "setting": "beta=0.2"}
    gt = {**_row(0.25, [0.0, 0.0]), "method": "PPO-GT", "setting": "beta=0.2"}
    found = {c["against"]: c for c in frontier_analysis.compare([*dpo, ppo, gt], [])}
    # DPO at KL 0.5: [0.2, 0.4], minus PPO's [0.5, 0.5]: mean −0.2; at 0.25: [0.1, 0.3] − 0.
    assert found["PPO beta=0.2"]["difference"] == pytest.approx(-0.2)
    assert found["PPO-GT beta=0.2"]["difference"] == pytest.approx(0.2)
    assert found["PPO beta=0.2"]["policy"] == "DPO"


def test_true_reward_ceiling_by_hand(tmp_path):
    from dpo_jax.experiments import frontier_rlhf

    path = tmp_path / "pairs.jsonl"
    # high_digits: the fraction of digits 5-9. Pair 1: chosen better by 1; pair 2: a tie;
    # pair 3: chosen worse by 1.
    pairs = [("9", "1"), ("5", "6"), ("2", "8")]
    path.write_text(
        "".join(f'{{"prompt": "p", "chosen": "{c}", "rejected": "{r}"}}\n' for c, r in pairs)
    )
    found = frontier_rlhf.true_reward_ceiling(str(path), "high_digits", 2.0)
    assert found["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    p = 1 / (1 + math.exp(-2.0))
    assert found["expected"] == pytest.approx((p + 0.5 + p) / 3)
    assert found["num_pairs"] == 3
