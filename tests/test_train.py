"""The main job end to end on a shrunken default config: one SFT step, one DPO step, the summary."""

import json
import os

import numpy as np
from test_train_step import tiny_config

from dpo_jax.run import train


def test_one_step_smoke_run_writes_everything(tmp_path, capsys):
    config = tiny_config(sft__num_steps=1, dpo__num_steps=1, log__tensorboard=True)
    config.log.eval_every_steps = 1
    summary = train.train_and_evaluate(config, str(tmp_path))

    printed = capsys.readouterr().out
    assert "eval, before DPO" in printed and "rewards/accuracies" in printed
    # Before DPO the policy is its reference: loss log 2, no margin.
    np.testing.assert_allclose(summary["before_dpo"]["loss"], np.log(2), rtol=1e-6)
    np.testing.assert_allclose(summary["before_dpo"]["rewards/margins"], 0.0, atol=1e-6)
    assert summary["after_dpo"]["num_pairs"] == config.data.num_eval_pairs
    assert summary["train_last"]["step"] == 1
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_second", "rewards/accuracies"):
        assert np.isfinite(summary["train_last"][key]), key
    assert summary["data"]["dpo/train"]["kept"] == config.data.num_train_pairs
    # SFT moved the model: its held-out NLL changed.
    assert summary["sft"]["eval_after"]["loss"] != summary["sft"]["eval_before"]["loss"]

    for stage in ("sft", "dpo"):
        with open(tmp_path / stage / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert {(r["split"], r["step"]) for r in records} == {("train", 1), ("eval", 1)}
        assert any(
            name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / stage / "tb")
        )
        assert os.listdir(tmp_path / stage / "checkpoints") == ["1"]
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
