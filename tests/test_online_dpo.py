"""Online DPO end to end at a toy size (the real one: scripts/online_dpo.py), and its errors."""

import pytest
from test_frontier import _tiny_config

from dpo_jax.experiments import online_dpo


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(reward=None), "online DPO needs a reward function: settings.reward=None"),
        (dict(reward=""), "online DPO needs a reward function"),
        (dict(reward="sentiment"), "reward='sentiment' is not known; known:"),
        (dict(rounds=0), "settings.rounds=0 must be >= 1"),
    ],
)
def test_bad_settings_are_refused_before_training(tmp_path, changes, message):
    settings = online_dpo.OnlineSettings(**changes)
    with pytest.raises(ValueError) as error:
        online_dpo.run_online_dpo(_tiny_config(), str(tmp_path), settings)
    assert message in str(error.value)
    assert not (tmp_path / "round_0").exists()


@pytest.mark.slow
def test_rounds_sample_label_and_train(tmp_path):
    # A graded reward (the fraction of right digits): a 4-step SFT model is rarely exactly right,
    # so under the exact-match reward its two samples tie and no pair is left to train on.
    settings = online_dpo.OnlineSettings(
        rounds=2,
        steps_per_round=2,
        sft_steps=4,
        num_train_prompts=64,
        num_eval_prompts=16,
        reward="synthetic_digits",
    )
    result = online_dpo.run_online_dpo(_tiny_config(), str(tmp_path), settings)
    assert 0 < result["pairs/round_1"] <= 64 and 0 < result["pairs/round_2"] <= 64
    for name in ("exact_match/sft", "exact_match/online_dpo"):
        assert 0.0 <= result[name] <= 1.0
    for round_index in (1, 2):
        assert (tmp_path / f"round_{round_index}" / "hf" / "config.json").is_file()
        lines = (tmp_path / f"pairs_{round_index}.jsonl").read_text().splitlines()
        assert len(lines) == result[f"pairs/round_{round_index}"]
