"""PPO run by the main job's machinery: exact resume, π = π_ref at step 1, and bad input."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_train_step import tiny_config

from dpo_jax import evaluation
from dpo_jax.models import init_params
from dpo_jax.run import errors, ppo_train, reward_model, train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from tiny_tokenizers import make_word_tokenizer  # noqa: E402

# The module's run adapts β (Ziegler et al.'s controller), with a horizon short enough that β
# moves visibly in 4 iterations of 8 responses: the resume test then also checks that β resumes.
KL_TARGET, KL_HORIZON = 0.5, 40.0


def ppo_config(**changes):
    defaults = dict(
        ppo__true_reward="high_digits",
        ppo__kl_target=KL_TARGET,
        ppo__kl_horizon=KL_HORIZON,
        ppo__num_steps=4,
        checkpoint__every_steps=2,
        checkpoint__keep=3,
    )
    return tiny_config(**{**defaults, **changes})


def _metrics(workdir):
    with open(os.path.join(workdir, "ppo", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"train"' in line or "split" not in line]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ppo_uninterrupted"))
    summary = ppo_train.train_ppo(ppo_config(), workdir)
    return workdir, summary


def test_the_first_iteration_samples_from_pi_ref_so_its_kl_is_zero(uninterrupted):
    _, summary = uninterrupted
    first = summary["train_first"]
    assert first["step"] == 1
    assert first["objective/kl"] == 0.0 and first["logps/ref_abs_diff"] == 0.0
    # The score is high_digits' mean over the batch: a fraction of digits in [0, 1].
    assert 0.0 <= first["objective/scores"] <= 1.0
    assert first["objective/rlhf_reward"] == pytest.approx(first["objective/scores"])
    assert first["nonfinite"] == 0
    assert summary["train_last"]["step"] == 4


def test_a_resumed_ppo_run_gives_the_uninterrupted_runs_losses_and_policy(uninterrupted, tmp_path):
    done, _ = uninterrupted
    resumed = str(tmp_path / "resumed")
    shutil.copytree(done, resumed)
    shutil.rmtree(os.path.join(resumed, "ppo", "checkpoints", "4"))  # the run stopped at 2
    shutil.rmtree(os.path.join(resumed, "ppo", "export"))
    summary = ppo_train.train_ppo(ppo_config(), resumed)
    assert summary["train_first"]["step"] == 3  # it resumed, and replayed steps 3 and 4
    by_step = {record["step"]: record for record in _metrics(done)}
    for record in (summary["train_first"], summary["train_last"]):
        names = ("loss", "objective/scores", "objective/kl", "objective/kl_coef", "loss/value_avg")
        for name in (*names, "grad_norm"):
            assert record[name] == by_step[record["step"]][name], name
    expected = load_file(os.path.join(done, "ppo", "export", "model.safetensors"))
    found = load_file(os.path.join(resumed, "ppo", "export", "model.safetensors"))
    assert expected.keys() == found.keys()
    for name in expected:
        np.testing.assert_array_equal(found[name], expected[name], err_msg=name)


def test_the_adaptive_kl_coefficient_follows_ziegler_et_als_controller(uninterrupted):
    """β_{t+1} = β_t·(1 + clip(KL_t / KL_target − 1, −0.2, 0.2)·B / H), KL_t the mean sequence
    KL of iteration t's rollout (NumPy, from the logged metrics); β_1 = config.ppo.kl_coef."""
    done, _ = uninterrupted
    records = sorted(_metrics(done), key=lambda record: record["step"])
    config = ppo_config()
    coef = config.ppo.kl_coef
    batch = config.ppo.rollout_batch_size
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    for record in records:
        assert record["objective/kl_coef"] == pytest.approx(coef, rel=1e-6)
        assert record["objective/non_score_reward"] == pytest.approx(
            -coef * record["objective/kl"], rel=1e-5, abs=1e-7
        )
        error = np.clip(record["objective/kl"] / KL_TARGET - 1.0, -0.2, 0.2)
        coef = coef * (1.0 + error * batch / KL_HORIZON)
    assert records[-1]["objective/kl_coef"] != config.ppo.kl_coef  # it moved


def test_ppo_without_a_reward_source_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="PPO has no reward source: set config.ppo.reward_model"):
        ppo_train.train_ppo(tiny_config(), str(tmp_path))


def test_two_reward_sources_are_refused_before_anything_is_built(tmp_path):
    config = ppo_config(ppo__reward_model=str(tmp_path))
    with pytest.raises(ValueError, match="PPO takes one reward source"):
        ppo_train.train_ppo(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("word_vocabulary", [True, False])
def test_a_reward_model_of_another_tokenizer_is_refused(tmp_path, word_vocabulary):
    config = ppo_config()
    policy_tokenizer, model_config, _ = train.load_model(config, str(tmp_path))
    other = make_word_tokenizer()
    rm_config = model_config
    if word_vocabulary:  # another vocabulary size; else the same size, another digest
        rm_config = model_config.replace(vocab_size=other.vocab_size)
    params = init_params(rm_config, jax.random.key(0))
    head = reward_model.init_head(rm_config.hidden_size)
    export = str(tmp_path / "rm")
    reward_model.export(export, rm_config, {"backbone": params, "head": head}, other)
    with pytest.raises(ValueError, match="was trained with another tokenizer") as raised:
        ppo_train.load_reward_model(export, model_config, policy_tokenizer)
    assert f"config.ppo.reward_model={export!r}" in str(raised.value)
    assert errors.user_message(raised.value).count("\n") == 0


def test_a_missing_reward_model_export_names_the_path(tmp_path):
    config = ppo_config(ppo__true_reward="", ppo__reward_model=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="no reward_head.safetensors there"):
        ppo_train.train_ppo(config, str(tmp_path / "run"))


def test_a_non_finite_true_reward_names_the_reward_prompt_and_completion(tmp_path, monkeypatch):
    monkeypatch.setitem(evaluation.REWARD_FUNCTIONS, "broken", lambda prompt, text: float("nan"))
    config = ppo_config(ppo__true_reward="broken", sft__num_steps=0)
    with pytest.raises(
        ppo_train.NonFiniteReward, match="config.ppo.true_reward='broken' returned nan for prompt '"
    ) as raised:
        ppo_train.train_ppo(config, str(tmp_path))
    assert "completion" in str(raised.value)
    assert not os.path.exists(tmp_path / "ppo" / "export")
