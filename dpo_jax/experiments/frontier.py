"""The DPO paper's reward-vs-KL experiment (its Figure 2) in miniature, on the synthetic task.

The paper's IMDb setup, with each part replaced by one this CPU can run in minutes:
- the reward is a known function of the completion alone, standing in for the sentiment
  classifier: the fraction of its digits that are 5-9 (`evaluation.high_digit_reward`);
- π_ref is a small Llama trained briefly by SFT on the task's right answers (the paper's
  GPT-2 fine-tuned on reviews); its answers score about 1/2;
- preference pairs: two completions sampled from π_ref per training prompt, labelled by
  Bradley–Terry on the true reward, p(y1 ≻ y2) = σ(s·(r(y1) − r(y2))) with scale s;
- policies: DPO at several β; Preferred-FT (SFT from π_ref on the chosen completions);
  best-of-N from π_ref (N = 1, 2, 4, ...), whose KL is log N − (N − 1)/N (Stiennon et al. 2020);
- each trained policy is scored on held-out prompts by one temperature-1 sample per prompt:
  its mean true reward and the sequence-level KL(π ‖ π_ref) of those samples.

Every model is trained by `dpo_jax.train.train_and_evaluate`, the main job's entry point.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import evaluation, sampling
from dpo_jax.data import synthetic
from dpo_jax.models import load_hf
from dpo_jax.train import train_and_evaluate

CSV_FIELDS = ("method", "setting", "reward", "reward_stderr", "kl", "kl_stderr")


@dataclasses.dataclass(frozen=True)
class FrontierSettings:
    """The experiment's knobs (defaults: about five minutes on a 2-core CPU)."""

    betas: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)  # DPO's β values
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)  # N of best-of-N
    sft_steps: int = 120  # SFT steps that build π_ref (few: π_ref should be often wrong)
    tune_steps: int = 150  # steps of each DPO and Preferred-FT run
    num_train_prompts: int = 8192  # prompts whose two sampled completions make a pair
    num_eval_prompts: int = 256  # held-out prompts each policy is scored on
    reward: str = "high_digits"  # the true reward, a name in evaluation.REWARD_FUNCTIONS
    reward_scale: float = 10.0  # s of Bradley–Terry on the true reward
    learning_rate: float = 1e-4  # of DPO and Preferred-FT (AdamW, the main job's DPO rate)
    seed: int = 0


def _run_config(base: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
    """A copy of `base` with dotted fields set, e.g. {"dpo.beta": 0.1}."""
    config = base.copy_and_resolve_references()
    for dotted, value in fields.items():
        *groups, key = dotted.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[key] = value
    return config


def _quiet(base: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    return _run_config(
        base,
        **{
            "log.progress_bar": False,
            "log.tensorboard": False,
            "log.eval_every_steps": 0,
            "checkpoint.every_steps": 10_000,
            "checkpoint.export_hf": True,
            "seed": seed,
        },
    )


def _train(config: ml_collections.ConfigDict, workdir: str):
    """train_and_evaluate in a fresh workdir; returns (model_config, params) of its export."""
    shutil.rmtree(workdir, ignore_errors=True)
    train_and_evaluate(config, workdir)
    return load_hf(os.path.join(workdir, "hf"))


def make_pairs(model_config, ref_params, tokenizer, prompts, settings, rng) -> list[dict]:
    """Two π_ref samples per prompt, labelled by Bradley–Terry on the true reward.

    Only pairs whose two completions have the same number of words are kept, as the paper's
    IMDb completions had one length: the preference is then about content, not length (on
    pairs of different lengths DPO learns mostly to move the eos, and drifts in length).
    Pairs whose completions decode to the same text carry no preference and are left out.
    """
    prompt_ids = [sampling.encode_prompt(tokenizer, p) for p in prompts]
    common = dict(
        max_new_tokens=synthetic.MAX_RESPONSE_LENGTH,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        batch_size=512,
    )
    first_rng, second_rng, label_rng = jax.random.split(rng, 3)
    first = evaluation.sample_completions(
        model_config, ref_params, prompt_ids, rng=first_rng, **common
    )
    second = evaluation.sample_completions(
        model_config, ref_params, prompt_ids, rng=second_rng, **common
    )
    draws = np.asarray(jax.random.uniform(label_rng, (len(prompts),)))
    pairs = []
    for prompt, a, b, u in zip(prompts, first, second, draws, strict=True):
        text_a = tokenizer.decode(a, skip_special_tokens=True)
        text_b = tokenizer.decode(b, skip_special_tokens=True)
        if text_a == text_b or not text_a.strip() or len(text_a.split()) != len(text_b.split()):
            continue
        reward = evaluation.reward_fn(settings.reward)
        margin = settings.reward_scale * (reward(prompt, text_a) - reward(prompt, text_b))
        a_wins = u < 1.0 / (1.0 + math.exp(-margin))
        chosen, rejected = (text_a, text_b) if a_wins else (text_b, text_a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def score_policy(model_config, params, *, ref_params, tokenizer, prompts, reward, rng) -> dict:
    """Mean true reward and KL(π ‖ π_ref) of one temperature-1 sample per prompt."""
    prompt_ids = [sampling.encode_prompt(tokenizer, p) for p in prompts]
    samples = evaluation.sample_completions(
        model_config,
        params,
        prompt_ids,
        rng=rng,
        max_new_tokens=synthetic.MAX_RESPONSE_LENGTH,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        batch_size=512,
    )
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
    rewards = np.array([reward(p, t) for p, t in zip(prompts, texts, strict=True)])
    kl = evaluation.sequence_kl(
        model_config,
        params,
        ref_params,
        prompt_ids,
        samples,
        batch_size=512,
        pad_id=tokenizer.pad_id,
    )
    return {
        "reward": float(rewards.mean()),
        "reward_stderr": float(rewards.std(ddof=1) / math.sqrt(len(rewards))),
        "kl": kl.mean,
        "kl_stderr": kl.stderr,
    }


def best_of_n(model_config, ref_params, tokenizer, prompts, best_of, reward, rng) -> list[dict]:
    """Best-of-N from π_ref: the mean over prompts of the best of N samples' true reward."""
    prompt_ids = [sampling.encode_prompt(tokenizer, p) for p in prompts]
    rewards = np.zeros((max(best_of), len(prompts)))
    for draw in range(max(best_of)):
        samples = evaluation.sample_completions(
            model_config,
            ref_params,
            prompt_ids,
            rng=jax.random.fold_in(rng, draw),
            max_new_tokens=synthetic.MAX_RESPONSE_LENGTH,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            batch_size=512,
        )
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
        rewards[draw] = [reward(p, t) for p, t in zip(prompts, texts, strict=True)]
    rows = []
    for n in best_of:
        best = rewards[:n].max(axis=0)  # [prompts]
        rows.append(
            {
                "method": "best-of-N",
                "setting": f"N={n}",
                "reward": float(best.mean()),
                "reward_stderr": float(best.std(ddof=1) / math.sqrt(len(best))),
                "kl": math.log(n) - (n - 1) / n,  # the analytic KL of best-of-N
                "kl_stderr": 0.0,
            }
        )
    return rows


def _tuning_runs(settings: FrontierSettings, reference_dir: str, pairs_path: str):
    """(method, setting, config fields) of each policy trained from π_ref on the pairs."""
    tune = {
        "model.source": "hf",
        "model.hf_path": reference_dir,
        "data.source": pairs_path,
        "data.eval_source": "",
        "optimizer.learning_rate": settings.learning_rate,
    }
    runs = [
        (
            "DPO",
            f"beta={beta}",
            {**tune, "dpo.beta": beta, "sft.num_steps": 0, "dpo.num_steps": settings.tune_steps},
        )
        for beta in settings.betas
    ]
    preferred_ft = {
        **tune,
        "sft.num_steps": settings.tune_steps,
        "sft.learning_rate": settings.learning_rate,
        "dpo.num_steps": 0,
    }
    return [*runs, ("Preferred-FT", "", preferred_ft)]


def _write_pairs(pairs: list[dict], path: str) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(pair) + "\n" for pair in pairs)


def run_frontier(
    base_config: ml_collections.ConfigDict,
    out_dir: str,
    settings: FrontierSettings = FrontierSettings(),
) -> list[dict]:
    """Runs the whole experiment; writes frontier.csv and frontier.png to `out_dir`.

    Args:
      base_config: the main job's config (configs/default.py); model and optimizer come from it.
      out_dir: where the runs (under runs/), pairs.jsonl, the CSV and the PNG go.
      settings: the experiment's knobs.

    Returns:
      One row per policy: method, setting, reward (mean true reward of one sample per held-out
      prompt), reward_stderr, kl (nats per sequence), kl_stderr.
    """
    base = _quiet(base_config, settings.seed)
    tokenizer = synthetic.make_tokenizer()
    reward = evaluation.reward_fn(settings.reward)
    rng = jax.random.key(settings.seed)
    reference_dir = os.path.join(out_dir, "runs", "reference")
    reference_run = _run_config(base, **{"sft.num_steps": settings.sft_steps, "dpo.num_steps": 0})
    model_config, ref_params = _train(reference_run, reference_dir)

    train_records = synthetic.make_records(settings.num_train_prompts, settings.seed)
    eval_records = synthetic.make_records(settings.num_eval_prompts, settings.seed, split="eval")
    eval_prompts = [r["prompt"] for r in eval_records]
    pairs = make_pairs(
        model_config,
        ref_params,
        tokenizer,
        [r["prompt"] for r in train_records],
        settings,
        jax.random.fold_in(rng, 1),
    )
    pairs_path = os.path.join(out_dir, "pairs.jsonl")
    _write_pairs(pairs, pairs_path)
    print(f"[frontier] {len(pairs)} labelled pairs from {len(train_records)} prompts")

    score = functools.partial(
        score_policy,
        model_config,
        ref_params=ref_params,
        tokenizer=tokenizer,
        prompts=eval_prompts,
        reward=reward,
        rng=jax.random.fold_in(rng, 2),
    )
    rows = [{"method": "SFT reference", "setting": "", **score(ref_params)}]
    for method, setting, fields in _tuning_runs(
        settings, os.path.join(reference_dir, "hf"), pairs_path
    ):
        name = f"{method}_{setting}".strip("_").replace("=", "")
        _, params = _train(_run_config(base, **fields), os.path.join(out_dir, "runs", name))
        rows.append({"method": method, "setting": setting, **score(params)})
        print(
            f"[frontier] {method} {setting}: "
            + ", ".join(f"{k} {rows[-1][k]:.3f}" for k in ("reward", "kl"))
        )
    rows += best_of_n(
        model_config,
        ref_params,
        tokenizer,
        eval_prompts,
        settings.best_of,
        reward,
        jax.random.fold_in(rng, 3),
    )
    csv_path, png_path = (os.path.join(out_dir, f"frontier.{ext}") for ext in ("csv", "png"))
    write_results(rows, csv_path, png_path)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width table."""
    lines = [f"{'method':<15}{'setting':<10}{'reward':>9}{'± se':>8}{'KL nats':>10}{'± se':>8}"]
    lines.append("-" * len(lines[0]))
    for row in rows:
        lines.append(
            f"{row['method']:<15}{row['setting']:<10}{row['reward']:>9.3f}"
            f"{row['reward_stderr']:>8.3f}{row['kl']:>10.3f}{row['kl_stderr']:>8.3f}"
        )
    return "\n".join(lines)


def write_results(rows: list[dict], csv_path: str, png_path: str) -> None:
    """The rows as CSV (CSV_FIELDS) and the reward-vs-KL plot as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: scripts and CI
    import matplotlib.pyplot as plt

    with open(csv_path, "w") as f:
        f.write(",".join(CSV_FIELDS) + "\n")
        for row in rows:
            f.write(",".join(str(row[field]) for field in CSV_FIELDS) + "\n")
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    styles = {"DPO": "o-", "Preferred-FT": "s", "best-of-N": "^--", "SFT reference": "k*"}
    for method, style in styles.items():
        points = [row for row in rows if row["method"] == method]
        if not points:
            continue
        axes.errorbar(
            [row["kl"] for row in points],
            [row["reward"] for row in points],
            xerr=[row["kl_stderr"] for row in points],
            yerr=[row["reward_stderr"] for row in points],
            fmt=style,
            label=method,
            markersize=6,
            capsize=2,
        )
        for row in points:
            if row["setting"]:
                axes.annotate(
                    row["setting"],
                    (row["kl"], row["reward"]),
                    fontsize=7,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
    axes.set(
        xlabel="KL(π ‖ π_ref)  [nats per sequence]",
        ylabel="mean true reward",
        title="Reward vs KL on the synthetic task",
    )
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
