"""The DPO paper's reward-vs-KL experiment (its Figure 2) in miniature, on the synthetic task.

The paper's IMDb setup, with each part replaced by one this CPU can run in minutes:
- the reward is a known function of the completion alone, standing in for the sentiment
  classifier: the fraction of its digits that are 5-9 (`evaluation.high_digit_reward`);
- π_ref is a small Llama trained briefly by SFT on the task's right answers (the paper's
  GPT-2 fine-tuned on reviews); its answers score about 1/2;
- preference pairs: two completions sampled from π_ref per training prompt, labelled by
  Bradley–Terry on the true reward, p(y1 ≻ y2) = σ(s·(r(y1) − r(y2))) with scale s;
- policies: DPO at several β; Preferred-FT (SFT from π_ref on the chosen completions);
  Unlikelihood (`losses` "unlikelihood": likelihood on the chosen, unlikelihood on the rejected
  completion's tokens, at each α); best-of-N from π_ref (N = 1, 2, 4, ...), its KL estimated
  with ties counted (the analytic log N − (N − 1)/N of Stiennon et al. 2020 is an upper bound,
  reached only without ties);
- each trained policy is scored on held-out prompts by one temperature-1 sample per prompt:
  its mean true reward and the sequence-level KL(π ‖ π_ref) of those samples;
- the curve no policy can beat, π_ref·exp(r/τ)/Z, estimated from π_ref's draws, and each
  method's reward at matched KL, differenced prompt by prompt (`frontier_analysis`).

Every model is trained by `dpo_jax.run.train.train_and_evaluate`, the main job's entry point.
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
from dpo_jax.experiments.frontier_analysis import (
    COMPARISON_FIELDS,
    best_of_n,
    compare,
    kl_optimal_curve,
    stderr,
)
from dpo_jax.models import load_hf
from dpo_jax.run.train import train_and_evaluate

CSV_FIELDS = ("method", "setting", "reward", "reward_stderr", "kl", "kl_stderr", "kl_bound")
# τ of the KL-optimal curve, from near π_ref (KL ≈ 0) to near the best draw (KL ≈ log draws)
OPTIMAL_TEMPERATURES = (
    3.0,
    1.0,
    0.5,
    0.3,
    0.2,
    0.15,
    0.12,
    0.1,
    0.08,
    0.06,
    0.05,
    0.04,
    0.03,
    0.02,
)


@dataclasses.dataclass(frozen=True)
class FrontierSettings:
    """The experiment's knobs (defaults: about seven minutes on a 2-core CPU, measured before
    Unlikelihood's run was added)."""

    betas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 1.0, 2.0, 3.0)  # DPO's β values
    unlikelihood_alphas: tuple[float, ...] = (1.0,)  # Unlikelihood's α values; () = none
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)  # N of best-of-N
    # π_ref samples per held-out prompt that estimate best-of-N's KL and the KL-optimal curve
    # (≥ max(best_of); best-of-N's reward reads the first N of them)
    reference_draws: int = 64
    sft_steps: int = 120  # SFT steps that build π_ref (few: π_ref should be often wrong)
    # Steps × batch_size ≈ the number of pairs (about half the prompts): one pass, so that no
    # pair is fitted twice (4.7 passes over 4,071 pairs spent KL on fitting them, not on reward)
    tune_steps: int = 256  # steps of each DPO, Preferred-FT and Unlikelihood run
    batch_size: int = 64  # pairs per step of each of those runs
    num_train_prompts: int = 32768  # prompts whose two sampled completions make a pair
    num_eval_prompts: int = 1024  # held-out prompts each policy is scored on
    reward: str = "high_digits"  # the true reward, a name in evaluation.REWARD_FUNCTIONS
    reward_scale: float = 10.0  # s of Bradley–Terry on the true reward
    learning_rate: float = 1e-4  # of every tuning run (AdamW, the main job's DPO rate)
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
    """Mean true reward and KL(π ‖ π_ref) of one temperature-1 sample per prompt.

    Returns:
      The CSV fields reward, reward_stderr, kl, kl_stderr, and the per-prompt values they are
      means of: "prompt_rewards" [prompts] and "prompt_kls" [prompts] (log π − log π_ref).
    """
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
        "reward_stderr": stderr(rewards),
        "kl": kl.mean,
        "kl_stderr": kl.stderr,
        "prompt_rewards": rewards,
        "prompt_kls": np.asarray(kl.log_ratios, np.float64),
    }


def reference_rewards(model_config, ref_params, tokenizer, prompts, draws, reward, rng):
    """[draws, prompts] true rewards of independent π_ref samples for each prompt."""
    prompt_ids = [sampling.encode_prompt(tokenizer, p) for p in prompts]
    rewards = np.zeros((draws, len(prompts)))
    for draw in range(draws):
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
    return rewards


def _tuning_runs(settings: FrontierSettings, reference_dir: str, pairs_path: str):
    """(method, setting, config fields) of each policy trained from π_ref on the pairs."""
    tune = {
        "model.source": "hf",
        "model.hf_path": reference_dir,
        "data.source": pairs_path,
        "data.eval_source": "",
        "optimizer.learning_rate": settings.learning_rate,
        "data.batch_size": settings.batch_size,
    }
    runs = [
        (
            "DPO",
            f"beta={beta}",
            {**tune, "dpo.beta": beta, "sft.num_steps": 0, "dpo.num_steps": settings.tune_steps},
        )
        for beta in settings.betas
    ]
    runs += [
        (
            "Unlikelihood",
            f"alpha={alpha}",
            {
                **tune,
                "dpo.loss_type": "unlikelihood",
                "dpo.unlikelihood_alpha": alpha,
                "sft.num_steps": 0,
                "dpo.num_steps": settings.tune_steps,
            },
        )
        for alpha in settings.unlikelihood_alphas
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


@dataclasses.dataclass(frozen=True)
class FrontierResult:
    """What `run_frontier` measured.

    Attributes:
      rows: one per policy: CSV_FIELDS (kl_bound for best-of-N only), and the per-prompt
        "prompt_rewards" and "prompt_kls" [eval prompts] they average.
      optimal: the KL-optimal curve's rows (`kl_optimal_curve`), one per τ.
      comparisons: matched-KL differences, DPO minus the others (`compare`).
    """

    rows: list[dict]
    optimal: list[dict]
    comparisons: list[dict]


def check_settings(settings: FrontierSettings) -> None:
    """Raises ValueError when reference_draws < max(best_of)."""
    if settings.reference_draws < max(settings.best_of):
        raise ValueError(
            f"reference_draws={settings.reference_draws} must be >= max(best_of)="
            f"{max(settings.best_of)}: best-of-N reads the first N draws"
        )


def run_frontier(
    base_config: ml_collections.ConfigDict,
    out_dir: str,
    settings: FrontierSettings = FrontierSettings(),
) -> FrontierResult:
    """Runs the whole experiment; writes frontier.csv, frontier_matched.csv and frontier.png.

    Args:
      base_config: the main job's config (configs/default.py); model and optimizer come from it.
      out_dir: where the runs (under runs/), pairs.jsonl, the CSVs and the PNG go.
      settings: the experiment's knobs.

    Returns:
      The policies' rows, the KL-optimal curve and the matched-KL comparisons (FrontierResult).

    Raises:
      ValueError: reference_draws < max(best_of).
    """
    check_settings(settings)
    base = _quiet(base_config, settings.seed)
    tokenizer = synthetic.make_tokenizer()
    reward = evaluation.reward_fn(settings.reward)
    rng = jax.random.key(settings.seed)
    reference_dir = os.path.join(out_dir, "runs", "reference")
    reference_run = _run_config(base, **{"sft.num_steps": settings.sft_steps, "dpo.num_steps": 0})
    model_config, ref_params = _train(reference_run, reference_dir)
    pairs_path = _make_pairs_file(model_config, ref_params, tokenizer, settings, out_dir, rng)
    eval_records = synthetic.make_records(settings.num_eval_prompts, settings.seed, split="eval")
    eval_prompts = [r["prompt"] for r in eval_records]
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
        print(f"[frontier] {method} {setting}: " + _summary(rows[-1]))
    draw_rewards = reference_rewards(  # [reference_draws, eval prompts]
        model_config,
        ref_params,
        tokenizer,
        eval_prompts,
        settings.reference_draws,
        reward,
        jax.random.fold_in(rng, 3),
    )
    rows += best_of_n(draw_rewards, settings.best_of)
    optimal = kl_optimal_curve(draw_rewards, OPTIMAL_TEMPERATURES)
    result = FrontierResult(rows, optimal, compare(rows, optimal))
    write_results(result, out_dir)
    return result


def _summary(row: dict) -> str:
    return ", ".join(f"{k} {row[k]:.3f}" for k in ("reward", "kl"))


def _make_pairs_file(model_config, ref_params, tokenizer, settings, out_dir, rng) -> str:
    """Labels pairs of π_ref samples on the training prompts; returns the .jsonl path."""
    train_records = synthetic.make_records(settings.num_train_prompts, settings.seed)
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
    return pairs_path


def format_table(result: FrontierResult) -> str:
    """The policies and the matched-KL comparisons as fixed-width tables."""
    lines = [f"{'method':<15}{'setting':<10}{'reward':>9}{'± se':>8}{'KL nats':>10}{'± se':>8}"]
    lines.append("-" * len(lines[0]))
    for row in result.rows:
        bound = f"   (bound {row['kl_bound']:.3f})" if "kl_bound" in row else ""
        lines.append(
            f"{row['method']:<15}{row['setting']:<10}{row['reward']:>9.3f}"
            f"{row['reward_stderr']:>8.3f}{row['kl']:>10.3f}{row['kl_stderr']:>8.3f}{bound}"
        )
    lines += ["", f"{'DPO minus':<38}{'at KL':>8}{'difference':>12}{'± se':>8}"]
    for item in result.comparisons:
        lines.append(
            f"{item['policy'] + ' − ' + item['against']:<38}{item['kl']:>8.3f}"
            f"{item['difference']:>12.3f}{item['stderr']:>8.3f}"
        )
    return "\n".join(lines)


def _write_csv(path: str, fields: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.write(",".join(fields) + "\n")
        for row in rows:
            f.write(",".join(str(row.get(field, "")) for field in fields) + "\n")


def write_results(result: FrontierResult, out_dir: str) -> None:
    """frontier.csv (the policies, then the KL-optimal curve), frontier_matched.csv, the PNG."""
    os.makedirs(out_dir, exist_ok=True)
    _write_csv(os.path.join(out_dir, "frontier.csv"), CSV_FIELDS, result.rows + result.optimal)
    _write_csv(os.path.join(out_dir, "frontier_matched.csv"), COMPARISON_FIELDS, result.comparisons)
    _plot(result, os.path.join(out_dir, "frontier.png"))


def _plot(result: FrontierResult, png_path: str) -> None:
    """Reward vs KL, all of it and up to best-of-N's largest KL: 1-s.e. bars, the optimal curve."""
    import matplotlib

    matplotlib.use("Agg")  # no display: scripts and CI
    import matplotlib.pyplot as plt

    figure, (whole, close) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=100)
    for axes in (whole, close):
        _draw(axes, result)
        axes.set(xlabel="KL(π ‖ π_ref)  [nats per sequence]", ylabel="mean true reward")
    best = [row for row in result.rows if row["method"] == "best-of-N"]
    kl_max = 1.1 * max(row["kl_bound"] for row in best) + 0.05
    shown = [row["reward"] for row in result.rows + result.optimal if row["kl"] <= kl_max]
    close.set(xlim=(-0.05, kl_max), ylim=(min(shown) - 0.02, max(shown) + 0.02))
    whole.set_title("Reward vs KL on the synthetic task")
    close.set_title("Up to best-of-N's largest KL")
    whole.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)


def _draw(axes, result: FrontierResult) -> None:
    """Each method's points and the KL-optimal curve on one matplotlib Axes."""
    axes.plot(
        [row["kl"] for row in result.optimal],
        [row["reward"] for row in result.optimal],
        ":",
        color="grey",
        label="KL-optimal π_ref·exp(r/τ)/Z (estimate)",
    )
    best = [row for row in result.rows if row["method"] == "best-of-N"]
    axes.plot(
        [row["kl_bound"] for row in best],
        [row["reward"] for row in best],
        "^:",
        color="tab:green",
        alpha=0.35,
        label="best-of-N at its KL bound",
    )
    styles = {
        "DPO": "o-",
        "Preferred-FT": "s",
        "Unlikelihood": "D",
        "best-of-N": "^--",
        "SFT reference": "k*",
    }
    for method, style in styles.items():
        points = [row for row in result.rows if row["method"] == method]
        axes.errorbar(
            [row["kl"] for row in points],
            [row["reward"] for row in points],
            xerr=[row["kl_stderr"] for row in points],
            yerr=[row["reward_stderr"] for row in points],
            fmt=style,
            color={"best-of-N": "tab:green"}.get(method),
            label=method,
            markersize=5,
            capsize=2,
        )
        for row in points:
            axes.annotate(
                row["setting"].replace("beta=", "β=").replace("alpha=", "α="),
                (row["kl"], row["reward"]),
                fontsize=7,
                xytext=(4, -9),
                textcoords="offset points",
                annotation_clip=True,
            )
