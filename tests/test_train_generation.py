"""The main job's closing table: greedy exact match before and after DPO, and the KL."""

import numpy as np
from test_train_step import tiny_config

from dpo_jax import evaluation
from dpo_jax.run import train


def test_main_job_reports_exact_match_and_kl(tmp_path, capsys):
    config = tiny_config(sft__num_steps=2, dpo__num_steps=2)
    summary = train.train_and_evaluate(config, str(tmp_path))
    generation = summary["generation"]
    assert generation["num_prompts"] == config.data.num_eval_pairs
    for key in ("exact_match/reference", "exact_match/policy", "win_rate"):
        assert 0.0 <= generation[key] <= 1.0, key
    assert np.isfinite(generation["kl/mean"]) and generation["kl/stderr"] >= 0.0
    printed = capsys.readouterr().out
    assert "exact_match (greedy)" in printed and "kl/sequence (nats)" in printed

    # The policy's rate is the one evaluation.exact_match_rate gives for the exported policy.
    from dpo_jax.data import synthetic
    from dpo_jax.models import load_hf

    model_config, params = load_hf(str(tmp_path / "hf"))
    records = synthetic.make_records(config.data.num_eval_pairs, seed=config.seed, split="eval")
    rate = evaluation.exact_match_rate(model_config, params, synthetic.make_tokenizer(), records)
    assert rate == generation["exact_match/policy"]


def test_no_generation_rows_without_the_synthetic_task():
    summary = {
        "sft": {},
        "before_dpo": {"loss": 0.69},
        "after_dpo": {"loss": 0.5, "num_pairs": 4},
        "train_first": {},
        "train_last": {},
        "generation": {},
    }
    assert "exact_match" not in train.format_summary(summary)
