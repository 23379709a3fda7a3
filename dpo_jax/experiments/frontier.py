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

Every model is trained by `dpo_jax.run.train.train_and_evaluate`, the main job's entry point
(`dpo_jax.experiments.runs`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import ml_collections
import numpy as np

from dpo_jax import evaluation, sampling
from dpo_jax.data import synthetic
from dpo_jax.experiments import frontier_report, frontier_rlhf, temperature_sweep
from dpo_jax.experiments.frontier_analysis import (
    COMPARISON_FIELDS,
    best_of_n,
    compare,
    kl_optimal_curve,
    policy_row,
)
from dpo_jax.experiments.runs import (
    derived_config,
    quiet_config,
    train_and_load,
    write_csv,
    write_jsonl,
)

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
    """The experiment's knobs (defaults: 8 minutes on a 2-core CPU, 2026-12-04)."""

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
    # The RLHF side (frontier_rlhf): the reward model on all pairs but a held-out tail, then PPO
    # against it at each β and PPO-GT against the true reward; () = none
    held_out_pairs: int = 512  # pairs the reward model is scored on (not trained on)
    rm_steps: int = 200  # reward-model steps (batch_size pairs each)
    ppo_kl_coefs: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0)  # PPO's β values
    # PPO-GT's β values: the true reward is in [0, 1], the reward model's on the Bradley-Terry
    # scale (reward_scale times it), so PPO-GT at β pulls as PPO (RM) at reward_scale·β does
    ppo_gt_kl_coefs: tuple[float, ...] = (0.02, 0.05, 0.1)
    ppo_steps: int = 100  # PPO iterations of each run (64 prompts, 4 epochs of 2 minibatches)
    # The temperature sweep (temperature_sweep): these policies, Preferred-FT and best-of-N
    sweep_dpo_beta: float = 0.5  # the DPO run of the sweep (one of betas)
    sweep_ppo_beta: float = 0.5  # the PPO (RM) run of the sweep (in ppo_kl_coefs; near DPO's KL)
    sweep_best_of: int = 16
    sweep_temperatures: tuple[float, ...] = temperature_sweep.TEMPERATURES


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
    return policy_row(rewards, kl)


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


@dataclasses.dataclass(frozen=True)
class FrontierResult:
    """What `run_frontier` measured.

    Attributes:
      rows: one per policy: CSV_FIELDS (kl_bound for best-of-N only), and the per-prompt
        "prompt_rewards" and "prompt_kls" [eval prompts] they average.
      optimal: the KL-optimal curve's rows (`kl_optimal_curve`), one per τ.
      comparisons: matched-KL differences, DPO minus the others (`compare`).
      reward_model: `frontier_rlhf.reward_model_run`'s result without the export path ({} when
        no PPO ran).
      sweep: `temperature_sweep.win_rates`' rows ([] when a sweep policy did not run).
    """

    rows: list[dict]
    optimal: list[dict]
    comparisons: list[dict]
    reward_model: dict = dataclasses.field(default_factory=dict)
    sweep: list[dict] = dataclasses.field(default_factory=list)


def check_settings(settings: FrontierSettings) -> None:
    """Raises ValueError when reference_draws < max(best_of), or a sweep β is not run."""
    if settings.reference_draws < max(settings.best_of):
        raise ValueError(
            f"reference_draws={settings.reference_draws} must be >= max(best_of)="
            f"{max(settings.best_of)}: best-of-N reads the first N draws"
        )
    if settings.sweep_dpo_beta not in settings.betas:
        raise ValueError(
            f"sweep_dpo_beta={settings.sweep_dpo_beta} is not in betas={settings.betas}"
        )
    if settings.ppo_kl_coefs and settings.sweep_ppo_beta not in settings.ppo_kl_coefs:
        raise ValueError(
            f"sweep_ppo_beta={settings.sweep_ppo_beta} is not in "
            f"ppo_kl_coefs={settings.ppo_kl_coefs}"
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
    base = quiet_config(base_config, settings.seed)
    tokenizer = synthetic.make_tokenizer()
    reward = evaluation.reward_fn(settings.reward)
    rng = jax.random.key(settings.seed)
    reference_dir = os.path.join(out_dir, "runs", "reference")
    reference_run = derived_config(
        base, **{"sft.num_steps": settings.sft_steps, "dpo.num_steps": 0}
    )
    model_config, ref_params = train_and_load(reference_run, reference_dir)
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
    hf_reference = os.path.join(reference_dir, "hf")
    runs = [(*run, train_and_load) for run in _tuning_runs(settings, hf_reference, pairs_path)]
    reward_model = {}
    if settings.ppo_kl_coefs or settings.ppo_gt_kl_coefs:
        reward_model = _reward_model(base, settings, hf_reference, pairs_path, out_dir)
        ppo = frontier_rlhf.ppo_runs(settings, hf_reference, pairs_path, reward_model.pop("export"))
        runs += [(*run, frontier_rlhf.train_ppo_policy) for run in ppo]
    policies = _run_and_score(base, runs, score, rows, out_dir, _sweep_names(settings))
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
    sweep = temperature_sweep.win_rates(
        model_config, policies, ref_params, tokenizer=tokenizer, prompts=eval_prompts,
        reward=reward, rng=jax.random.fold_in(rng, 4), temperatures=settings.sweep_temperatures,
        best_of=settings.sweep_best_of,
    )  # fmt: skip
    result = FrontierResult(rows, optimal, compare(rows, optimal), reward_model, sweep)
    write_results(result, out_dir)
    return result


def _sweep_names(settings: FrontierSettings) -> dict[tuple[str, str], str]:
    """(method, setting) of each run the temperature sweep samples -> its name there."""
    return {
        ("DPO", f"beta={settings.sweep_dpo_beta}"): f"DPO β={settings.sweep_dpo_beta}",
        ("PPO", f"beta={settings.sweep_ppo_beta}"): f"PPO β={settings.sweep_ppo_beta}",
        ("Preferred-FT", ""): "Preferred-FT",
    }


def _run_and_score(base, runs, score, rows: list, out_dir: str, sweep_names: dict) -> dict:
    """Trains and scores each (method, setting, fields, train function) run into `rows`;
    returns the params of the sweep's runs by their sweep name, in sweep_names' order."""
    kept = {}
    for method, setting, fields, train_fn in runs:
        name = f"{method}_{setting}".strip("_").replace("=", "")
        _, params = train_fn(derived_config(base, **fields), os.path.join(out_dir, "runs", name))
        rows.append({"method": method, "setting": setting, **score(params)})
        print(f"[frontier] {method} {setting}: " + _summary(rows[-1]))
        if (method, setting) in sweep_names:
            kept[sweep_names[method, setting]] = params
    return {name: kept[name] for name in sweep_names.values() if name in kept}


def _reward_model(base, settings: FrontierSettings, hf_reference: str, pairs_path: str, out_dir):
    """The reward model on the pairs but a held-out tail; its accuracy there and the ceiling."""
    train_path, held_out_path = frontier_rlhf.split_pairs(
        pairs_path, settings.held_out_pairs, out_dir
    )
    fields = frontier_rlhf.reward_model_fields(hf_reference, train_path, held_out_path, settings)
    workdir = os.path.join(out_dir, "runs", "reward_model")
    result = frontier_rlhf.reward_model_run(
        derived_config(base, **fields), held_out_path, settings, workdir
    )
    ceiling = result["ceiling"]
    print(
        f"[frontier] reward model: held-out pair accuracy {result['accuracy']:.3f} on "
        f"{result['num_pairs']} pairs; the true reward's {ceiling['accuracy']:.3f} (expected "
        f"{ceiling['expected']:.3f})"
    )
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
    write_jsonl(pairs, pairs_path)
    print(f"[frontier] {len(pairs)} labelled pairs from {len(train_records)} prompts")
    return pairs_path


format_table = frontier_report.format_table  # the tables of a result, for scripts


def write_results(result: FrontierResult, out_dir: str) -> None:
    """frontier.csv (the policies, then the KL-optimal curve), frontier_matched.csv, the PNG;
    frontier_reward_model.csv and temperature_sweep.csv / .png when they were measured."""
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, "frontier.csv"), CSV_FIELDS, result.rows + result.optimal)
    write_csv(os.path.join(out_dir, "frontier_matched.csv"), COMPARISON_FIELDS, result.comparisons)
    frontier_report.plot(result, os.path.join(out_dir, "frontier.png"))
    if result.reward_model:
        model, ceiling = result.reward_model, result.reward_model["ceiling"]
        row = {
            "reward_model_accuracy": model["accuracy"],
            "true_reward_accuracy": ceiling["accuracy"],
            "true_reward_expected_accuracy": ceiling["expected"],
            "held_out_pairs": model["num_pairs"],
        }
        write_csv(os.path.join(out_dir, "frontier_reward_model.csv"), tuple(row), [row])
    if result.sweep:
        sweep_csv = os.path.join(out_dir, "temperature_sweep.csv")
        write_csv(sweep_csv, temperature_sweep.FIELDS, result.sweep)
        temperature_sweep.plot_sweep(result.sweep, os.path.join(out_dir, "temperature_sweep.png"))
