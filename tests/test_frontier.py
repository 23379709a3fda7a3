"""The reward-vs-KL experiment end to end, at a toy size (the real one: scripts/frontier.py)."""

import csv
import importlib.util
import math
import os

import pytest

from dpo_jax.experiments import frontier


def _tiny_config():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
    spec = importlib.util.spec_from_file_location("default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.mesh.num_devices = 1
    return config


@pytest.mark.slow
def test_frontier_writes_every_method_with_consistent_numbers(tmp_path):
    settings = frontier.FrontierSettings(
        betas=(0.5,),
        best_of=(1, 2, 4),
        sft_steps=4,
        tune_steps=2,
        num_train_prompts=64,
        num_eval_prompts=16,
    )
    config = _tiny_config()
    # The toy's 4-step reference keeps only a handful of equal-length pairs (7 of 64 prompts):
    # batches of 4, so that a batch never repeats records (the pipeline refuses that).
    config.data.batch_size = 4
    rows = frontier.run_frontier(config, str(tmp_path), settings)
    methods = [(row["method"], row["setting"]) for row in rows]
    assert methods == [
        ("SFT reference", ""),
        ("DPO", "beta=0.5"),
        ("Preferred-FT", ""),
        ("best-of-N", "N=1"),
        ("best-of-N", "N=2"),
        ("best-of-N", "N=4"),
    ]
    assert rows[0]["kl"] == 0.0  # the reference against itself
    best = rows[3:]
    assert [row["kl"] for row in best] == [0.0, math.log(2) - 0.5, math.log(4) - 0.75]
    # The best of 4 draws is at least the best of their first 2, itself at least the first one.
    assert best[0]["reward"] <= best[1]["reward"] <= best[2]["reward"]
    assert all(0.0 <= row["reward"] <= 1.0 for row in rows)
    with open(tmp_path / "frontier.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == [m for m, _ in methods]
    assert float(table[1]["kl"]) == pytest.approx(rows[1]["kl"])
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "pairs.jsonl").stat().st_size > 0
