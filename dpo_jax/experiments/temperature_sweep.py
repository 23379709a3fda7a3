"""Win rate against π_ref across sampling temperatures: the DPO paper's Figure 3 in miniature.

Each policy samples one completion per held-out prompt at each temperature (0 is greedy); it
wins a prompt when its true reward beats that of one π_ref sample at temperature 1 (the same
reference sample at every temperature, as the paper's reference summaries are fixed), ties
counting 1/2. Best-of-N draws N completions from π_ref at the temperature and keeps the one the
true reward ranks highest (an oracle selection: it reads the reward the others are judged by).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from dpo_jax import evaluation, sampling
from dpo_jax.data import synthetic
from dpo_jax.experiments.frontier_analysis import stderr

TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)
FIELDS = ("method", "temperature", "win_rate", "win_rate_stderr", "reward", "reward_stderr")


def _row(method: str, temperature: float, rewards: np.ndarray, ref_rewards: np.ndarray) -> dict:
    outcomes = (rewards > ref_rewards) + 0.5 * (rewards == ref_rewards)  # [prompts]
    return {
        "method": method,
        "temperature": temperature,
        "win_rate": float(outcomes.mean()),
        "win_rate_stderr": stderr(outcomes),
        "reward": float(rewards.mean()),
        "reward_stderr": stderr(rewards),
    }


def win_rates(
    model_config,
    policies: dict,
    ref_params,
    *,
    tokenizer,
    prompts: list[str],
    reward,
    rng: jax.Array,
    temperatures: tuple[float, ...] = TEMPERATURES,
    best_of: int = 16,
) -> list[dict]:
    """FIELDS rows: every policy of `policies` (name -> params) and best-of-`best_of` of π_ref,
    at every temperature, on `prompts`, judged by `reward(prompt, completion)`."""
    prompt_ids = [sampling.encode_prompt(tokenizer, p) for p in prompts]
    sample = functools.partial(
        evaluation.sample_completions,
        model_config,
        prompt_ids=prompt_ids,
        max_new_tokens=synthetic.MAX_RESPONSE_LENGTH,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        batch_size=512,
    )

    def rewards_of(params, key, temperature):
        samples = sample(params, rng=key, temperature=temperature)
        texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
        return np.array([reward(p, t) for p, t in zip(prompts, texts, strict=True)])

    ref_rewards = rewards_of(ref_params, jax.random.fold_in(rng, 0), 1.0)
    rows = []
    for t, temperature in enumerate(temperatures):
        key = jax.random.fold_in(rng, t + 1)
        for p, (name, params) in enumerate(policies.items()):
            policy_rewards = rewards_of(params, jax.random.fold_in(key, p), temperature)
            rows.append(_row(name, temperature, policy_rewards, ref_rewards))
        draws = [
            rewards_of(ref_params, jax.random.fold_in(key, 1000 + d), temperature)
            for d in range(best_of)
        ]
        rows.append(_row(f"best-of-{best_of}", temperature, np.max(draws, axis=0), ref_rewards))
    return rows


def format_sweep(rows: list[dict]) -> str:
    """The sweep as a methods × temperatures table of win rates (± s.e.)."""
    temperatures = sorted({row["temperature"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    cell = {(row["method"], row["temperature"]): row for row in rows}
    lines = [f"{'win rate vs π_ref':<22}" + "".join(f"{f'τ={t:g}':>14}" for t in temperatures)]
    for method in methods:
        values = [cell[method, t] for t in temperatures]
        lines.append(
            f"{method:<22}"
            + "".join(f"{v['win_rate']:>8.3f} ±{v['win_rate_stderr']:.3f}" for v in values)
        )
    return "\n".join(lines)


def plot_sweep(rows: list[dict], png_path: str) -> None:
    """Win rate against temperature, one line per method, 1-s.e. bars."""
    import matplotlib

    matplotlib.use("Agg")  # no display: scripts and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for method in dict.fromkeys(row["method"] for row in rows):
        points = [row for row in rows if row["method"] == method]
        axes.errorbar(
            [row["temperature"] for row in points],
            [row["win_rate"] for row in points],
            yerr=[row["win_rate_stderr"] for row in points],
            fmt="o-",
            capsize=2,
            markersize=4,
            label=method,
        )
    axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axes.set(
        xlabel="sampling temperature",
        ylabel="win rate against π_ref's sample (true reward)",
        title="Win rate across temperatures on the synthetic task",
    )
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
