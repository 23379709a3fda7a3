"""Online (iterative) DPO on the synthetic task: sample, label by a reward function, train, repeat.

Each round samples two completions per training prompt from the current policy, labels the
pair by a reward function named in the settings (the higher reward is chosen; ties carry no
preference and are left out), and trains DPO on those pairs from the current policy, which is
also the round's reference (iterative DPO: Xu et al. 2023, arXiv:2312.16682; Xiong et al. 2024,
arXiv:2312.11456). The first policy is the SFT model. Every model is trained by
`dpo_jax.run.train.train_and_evaluate`; the final policy's greedy exact-match rate is compared with
the SFT model's on held-out prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections

from dpo_jax import evaluation, sampling
from dpo_jax.data import synthetic
from dpo_jax.experiments.runs import derived_config, quiet_config, train_and_load


@dataclasses.dataclass(frozen=True)
class OnlineSettings:
    """The experiment's knobs (defaults: a few minutes on a 2-core CPU)."""

    reward: str | None = "synthetic_exact"  # a name in evaluation.REWARD_FUNCTIONS (required)
    rounds: int = 2  # sample-label-train rounds
    steps_per_round: int = 100  # DPO steps of each round
    beta: float = 2.0  # DPO's β
    sft_steps: int = 400  # SFT steps of the first policy (the main job's)
    num_train_prompts: int = 4096  # prompts sampled from in each round
    num_eval_prompts: int = 256  # held-out prompts of the exact-match rate
    seed: int = 0


def check_settings(settings: OnlineSettings) -> None:
    """Raises ValueError naming the setting: no or an unknown reward function, bad counts."""
    if not settings.reward:
        raise ValueError(
            f"online DPO needs a reward function: settings.reward={settings.reward!r}; known: "
            f"{sorted(evaluation.REWARD_FUNCTIONS)}"
        )
    evaluation.reward_fn(settings.reward)  # an unknown name lists the known ones
    for name in ("rounds", "steps_per_round", "num_train_prompts", "num_eval_prompts"):
        if getattr(settings, name) < 1:
            raise ValueError(f"settings.{name}={getattr(settings, name)} must be >= 1")


def label_pairs(model_config, params, tokenizer, prompts, reward_name: str, rng) -> list[dict]:
    """Two policy samples per prompt; the one with the higher reward is chosen (ties dropped)."""
    reward = evaluation.reward_fn(reward_name)
    prompt_ids = [sampling.encode_prompt(tokenizer, p) for p in prompts]
    common = dict(
        max_new_tokens=synthetic.MAX_RESPONSE_LENGTH,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        batch_size=512,
    )
    first_rng, second_rng = jax.random.split(rng)
    samples = [
        evaluation.sample_completions(model_config, params, prompt_ids, rng=key, **common)
        for key in (first_rng, second_rng)
    ]
    pairs = []
    for prompt, a, b in zip(prompts, *samples, strict=True):
        text_a = tokenizer.decode(a, skip_special_tokens=True)
        text_b = tokenizer.decode(b, skip_special_tokens=True)
        reward_a, reward_b = reward(prompt, text_a), reward(prompt, text_b)
        if reward_a == reward_b or not text_a.strip() or not text_b.strip():
            continue
        chosen, rejected = (text_a, text_b) if reward_a > reward_b else (text_b, text_a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def _write_jsonl(records: list[dict], path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def run_online_dpo(
    base_config: ml_collections.ConfigDict, out_dir: str, settings: OnlineSettings
) -> dict[str, float]:
    """Runs SFT, then `settings.rounds` rounds of sample-label-DPO; returns the comparison.

    Returns:
      {"exact_match/sft", "exact_match/online_dpo"} on the held-out prompts, and
      "pairs/round_<r>", the labelled pairs of each round.

    Raises:
      ValueError: see `check_settings` (raised before anything is trained).
    """
    check_settings(settings)
    base = quiet_config(base_config, settings.seed)
    tokenizer = synthetic.make_tokenizer()
    rng = jax.random.key(settings.seed)
    os.makedirs(out_dir, exist_ok=True)
    eval_records = synthetic.make_records(settings.num_eval_prompts, settings.seed, split="eval")
    eval_path = _write_jsonl(eval_records, os.path.join(out_dir, "eval.jsonl"))
    prompts = [
        r["prompt"] for r in synthetic.make_records(settings.num_train_prompts, settings.seed)
    ]
    sft_run = derived_config(base, **{"sft.num_steps": settings.sft_steps, "dpo.num_steps": 0})
    policy_dir = os.path.join(out_dir, "round_0")
    model_config, sft_params = train_and_load(sft_run, policy_dir)
    params, result = sft_params, {}
    for round_index in range(1, settings.rounds + 1):
        pairs = label_pairs(
            model_config,
            params,
            tokenizer,
            prompts,
            settings.reward,
            jax.random.fold_in(rng, round_index),
        )
        result[f"pairs/round_{round_index}"] = float(len(pairs))
        pairs_path = _write_jsonl(pairs, os.path.join(out_dir, f"pairs_{round_index}.jsonl"))
        fields = {
            "model.source": "hf",
            "model.hf_path": os.path.join(policy_dir, "hf"),
            "data.source": pairs_path,
            "data.eval_source": eval_path,
            "sft.num_steps": 0,
            "dpo.num_steps": settings.steps_per_round,
            "dpo.beta": settings.beta,
        }
        policy_dir = os.path.join(out_dir, f"round_{round_index}")
        _, params = train_and_load(derived_config(base, **fields), policy_dir)
    for name, model_params in (("sft", sft_params), ("online_dpo", params)):
        result[f"exact_match/{name}"] = evaluation.exact_match_rate(
            model_config, model_params, tokenizer, eval_records
        )
    return result
