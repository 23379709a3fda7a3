"""The RLHF side of the reward-vs-KL experiment: the reward model, its ceiling, PPO and PPO-GT.

As the DPO paper's baselines, on the frontier's own pairs and prompts:
- a Bradley-Terry reward model (`dpo_jax.run.reward_model`) from π_ref on the pairs but a
  held-out tail, scored on that tail by pair accuracy; beside it the ceiling: the accuracy of
  the true reward itself on the same pairs (the labels were drawn by Bradley-Terry on it, so no
  model can beat it in expectation: E max(σ(sΔ), 1 − σ(sΔ)), and the realised rate);
- PPO against that reward model at several KL coefficients β, and PPO-GT against the true
  reward (`dpo_jax.run.ppo_train`), each from π_ref on the pairs' prompts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import numpy as np

from dpo_jax import evaluation
from dpo_jax.models import load_hf
from dpo_jax.run.ppo_train import train_ppo
from dpo_jax.run.reward_model import train_reward_model


def split_pairs(pairs_path: str, held_out: int, out_dir: str) -> tuple[str, str]:
    """(train path, held-out path): the pairs file's last `held_out` pairs held out.

    Raises:
      ValueError: fewer than held_out + 1 pairs.
    """
    with open(pairs_path) as f:
        lines = f.readlines()
    if len(lines) <= held_out:
        raise ValueError(
            f"{pairs_path}: {len(lines)} pairs, but held_out_pairs={held_out} are to be held out"
        )
    paths = (
        os.path.join(out_dir, "pairs_rm_train.jsonl"),
        os.path.join(out_dir, "pairs_held_out.jsonl"),
    )
    for path, part in zip(paths, (lines[:-held_out], lines[-held_out:]), strict=True):
        with open(path, "w") as f:
            f.writelines(part)
    return paths


def true_reward_ceiling(pairs_path: str, reward_name: str, reward_scale: float) -> dict[str, float]:
    """The true reward as a pair classifier on a pairs file.

    Returns:
      {"accuracy": the fraction of pairs whose chosen has the higher true reward (ties 1/2),
      "expected": mean over pairs of max(σ(sΔ), 1 − σ(sΔ)), the Bayes accuracy of labels drawn
      by Bradley-Terry with scale s, "num_pairs"}.
    """
    reward = evaluation.reward_fn(reward_name)
    correct, expected = [], []
    with open(pairs_path) as f:
        for line in f:
            pair = json.loads(line)
            margin = reward(pair["prompt"], pair["chosen"]) - reward(
                pair["prompt"], pair["rejected"]
            )
            correct.append(1.0 if margin > 0 else 0.5 if margin == 0 else 0.0)
            p = 1.0 / (1.0 + math.exp(-reward_scale * margin))
            expected.append(max(p, 1.0 - p))
    return {
        "accuracy": float(np.mean(correct)),
        "expected": float(np.mean(expected)),
        "num_pairs": len(correct),
    }


def reward_model_fields(reference_dir: str, train_path: str, held_out_path: str, settings) -> dict:
    """The config fields of the reward model's run from π_ref on the training pairs."""
    return {
        "model.source": "hf",
        "model.hf_path": reference_dir,
        "data.source": train_path,
        "data.eval_source": held_out_path,
        "data.batch_size": settings.batch_size,
        "sft.num_steps": 0,
        "reward_model.num_steps": settings.rm_steps,
    }


def reward_model_run(config, held_out_path: str, settings, workdir: str) -> dict:
    """Trains the reward model (config from `reward_model_fields`) in a fresh workdir.

    Returns:
      {"export": its export directory, "accuracy": held-out pair accuracy, "num_pairs",
      "ceiling": `true_reward_ceiling` on the held-out pairs}.
    """
    shutil.rmtree(workdir, ignore_errors=True)
    summary = train_reward_model(config, workdir)
    after = summary["eval_after"]
    return {
        "export": summary["export"],
        "accuracy": after["rewards/accuracies"],
        "num_pairs": after["num_pairs"],
        "ceiling": true_reward_ceiling(held_out_path, settings.reward, settings.reward_scale),
    }


def ppo_runs(settings, reference_dir: str, pairs_path: str, rm_export: str) -> list:
    """(method, setting, config fields) of each PPO run: PPO (RM) at each β, PPO-GT at each."""
    common = {
        "model.source": "hf",
        "model.hf_path": reference_dir,
        "data.source": pairs_path,  # the prompts of the pairs
        "data.eval_source": "",
        "sft.num_steps": 0,
        "ppo.num_steps": settings.ppo_steps,
        "ppo.learning_rate": settings.learning_rate,
    }
    runs = [
        ("PPO", f"beta={beta}", {**common, "ppo.reward_model": rm_export, "ppo.kl_coef": beta})
        for beta in settings.ppo_kl_coefs
    ]
    runs += [
        (
            "PPO-GT",
            f"beta={beta}",
            {**common, "ppo.true_reward": settings.reward, "ppo.kl_coef": beta},
        )
        for beta in settings.ppo_gt_kl_coefs
    ]
    return runs


def train_ppo_policy(config, workdir: str) -> tuple[Any, Any]:
    """train_ppo in a fresh workdir; returns (model_config, params) of its export."""
    shutil.rmtree(workdir, ignore_errors=True)
    summary = train_ppo(config, workdir)
    return load_hf(summary["export"])
