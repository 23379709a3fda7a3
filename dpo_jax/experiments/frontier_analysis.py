"""The reward-vs-KL experiment's analysis, from per-prompt rewards and KLs (numpy only).

Best-of-N's KL with ties, the KL-optimal curve π_ref·exp(r/τ)/Z, and matched-KL differences
between methods scored on the same prompts (`dpo_jax.experiments.frontier` runs the models).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

COMPARISON_FIELDS = ("policy", "against", "kl", "difference", "stderr")


def stderr(values: np.ndarray) -> float:
    """The standard error of the mean of `values` [n] (0 for fewer than two)."""
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def policy_row(rewards: np.ndarray, kl) -> dict:
    """A sampled policy's row: the mean reward and KL with their standard errors, and the
    per-prompt values they average ("prompt_rewards", "prompt_kls" [prompts]).

    Args:
      rewards: [prompts] rewards of one sample per prompt.
      kl: `dpo_jax.evaluation.KLEstimate` of those samples (mean, stderr, log_ratios).
    """
    return {
        "reward": float(rewards.mean()),
        "reward_stderr": stderr(rewards),
        "kl": kl.mean,
        "kl_stderr": kl.stderr,
        "prompt_rewards": rewards,
        "prompt_kls": np.asarray(kl.log_ratios, np.float64),
    }


def best_of_n_kl(draw_rewards: np.ndarray, n: int) -> np.ndarray:
    """Per-prompt KL(best-of-n ‖ π_ref), ties counted, from π_ref's reward frequencies.

    Best-of-n changes only how likely each reward value is: a value v with π_ref-probability p
    and CDF F comes out with probability q = F^n − (F − p)^n, and within a value the samples keep
    π_ref's odds (they are exchangeable), so KL = Σ_v q log(q / p). The frequencies are those of
    the draws (a plug-in estimate). With no ties this is log n − (n − 1)/n, the bound
    `best_of_n` also reports; ties (a short answer has few reward values) make it smaller.

    Args:
      draw_rewards: [draws, prompts] rewards of independent π_ref samples.
      n: best of how many.

    Returns:
      [prompts] float64, nats per sequence.
    """
    kls = np.zeros(draw_rewards.shape[1])
    for prompt in range(draw_rewards.shape[1]):
        _, counts = np.unique(draw_rewards[:, prompt], return_counts=True)  # sorted by value
        probs = counts / counts.sum()
        cdf = np.cumsum(probs)
        best = cdf**n - (cdf - probs) ** n
        kls[prompt] = float(np.sum(best * np.log(best / probs)))
    return kls


def best_of_n(draw_rewards: np.ndarray, best_of: tuple[int, ...]) -> list[dict]:
    """Best-of-N rows from [draws, prompts] π_ref rewards: reward of the best of the first N.

    Its KL is `best_of_n_kl` over all the draws; kl_bound is log N − (N − 1)/N (Stiennon et al.
    2020), which holds with equality only when no two samples tie.
    """
    rows = []
    for n in best_of:
        best = draw_rewards[:n].max(axis=0)  # [prompts]
        kls = best_of_n_kl(draw_rewards, n)
        rows.append(
            {
                "method": "best-of-N",
                "setting": f"N={n}",
                "reward": float(best.mean()),
                "reward_stderr": stderr(best),
                "kl": float(kls.mean()),
                "kl_stderr": stderr(kls),
                "kl_bound": math.log(n) - (n - 1) / n,
                "prompt_rewards": best,
                "prompt_kls": kls,
            }
        )
    return rows


def kl_optimal_curve(draw_rewards: np.ndarray, temperatures: tuple[float, ...]) -> list[dict]:
    """Rows of π* = π_ref·exp(r/τ)/Z at each τ, π_ref taken as its draws for each prompt.

    π* maximises E[r] − τ·KL(π ‖ π_ref) (the DPO paper's eq. 4), so no policy lies above this
    curve; DPO at β on Bradley–Terry labels at scale s targets τ = β/s. Each prompt's draws are
    reweighted by exp(r/τ) (self-normalised), so the curve is that of the draws' support.
    """
    rows = []
    for tau in temperatures:
        logits = draw_rewards / tau  # [draws, prompts]
        log_z = np.logaddexp.reduce(logits, axis=0) - math.log(len(draw_rewards))
        weights = np.exp(logits - logits.max(axis=0))
        weights /= weights.sum(axis=0)
        kls = np.sum(weights * logits, axis=0) - log_z  # [prompts]
        rewards = np.sum(weights * draw_rewards, axis=0)  # [prompts], expected under π*
        rows.append(
            {
                "method": "KL-optimal",
                "setting": f"tau={tau}",
                "reward": float(rewards.mean()),
                "reward_stderr": stderr(rewards),
                "kl": float(kls.mean()),
                "kl_stderr": stderr(kls),
                "prompt_rewards": rewards,
                "prompt_kls": kls,
            }
        )
    return rows


def _interpolate(curve_rows: list[dict], kl: float, kl_field: str):
    """`curve_rows`' per-prompt rewards linearly interpolated at `kl`; None outside their range.

    Returns:
      (rewards [prompts], d reward / d KL, the standard error of the curve's KL there).
    """
    points = sorted(curve_rows, key=lambda row: row[kl_field])
    for low, high in itertools.pairwise(points):
        if low[kl_field] <= kl <= high[kl_field] and high[kl_field] > low[kl_field]:
            weight = (kl - low[kl_field]) / (high[kl_field] - low[kl_field])
            rewards = (1 - weight) * low["prompt_rewards"] + weight * high["prompt_rewards"]
            slope = (high["reward"] - low["reward"]) / (high[kl_field] - low[kl_field])
            if kl_field != "kl":  # an analytic KL (the bound) has no sampling error
                return rewards, slope, 0.0
            return rewards, slope, (1 - weight) * low["kl_stderr"] + weight * high["kl_stderr"]
    return None


def matched_kl(point: dict, curve_rows: list[dict], kl_field: str = "kl"):
    """(point's reward − the curve's at the point's KL, its standard error), or None.

    The curve's per-prompt rewards are interpolated at the point's KL (`kl_field` of the curve's
    rows: "kl", or "kl_bound" for best-of-N's bound) and subtracted prompt by prompt: every
    method is scored on the same prompts, so the prompts' own spread cancels. The KLs'
    uncertainty, the point's and the curve's, enters through the curve's slope. None when the
    point's KL lies outside the curve's range (no extrapolation).
    """
    found = _interpolate(curve_rows, point["kl"], kl_field)
    if found is None:
        return None
    curve_rewards, slope, curve_kl_stderr = found
    difference = point["prompt_rewards"] - curve_rewards  # [prompts]
    kl_stderr = math.hypot(point["kl_stderr"], curve_kl_stderr)
    return float(difference.mean()), math.hypot(stderr(difference), slope * kl_stderr)


# Methods whose points the DPO curve is read at (one tuned model per point, not a curve).
DPO_CURVE_AGAINST = ("Preferred-FT", "Unlikelihood", "PPO", "PPO-GT")


def compare(rows: list[dict], optimal: list[dict]) -> list[dict]:
    """Matched-KL differences, DPO minus each other method (COMPARISON_FIELDS).

    Each DPO point against best-of-N (at its estimated KL and at its bound) and against the
    KL-optimal curve; the DPO curve against each Preferred-FT, Unlikelihood, PPO and PPO-GT
    point at that point's KL.
    """
    dpo = [row for row in rows if row["method"] == "DPO"]
    best = [row for row in rows if row["method"] == "best-of-N"]
    curves = (
        ("best-of-N", best, "kl"),
        ("best-of-N (KL bound)", best, "kl_bound"),
        ("KL-optimal", optimal, "kl"),
    )
    comparisons = []
    for row in dpo:
        for against, curve_rows, kl_field in curves:
            found = matched_kl(row, curve_rows, kl_field)
            if found is not None:
                comparisons.append(_comparison(f"DPO {row['setting']}", against, row, found))
    for row in (row for row in rows if row["method"] in DPO_CURVE_AGAINST):
        found = matched_kl(row, dpo)
        if found is not None:  # the other method minus DPO, turned round
            against = f"{row['method']} {row['setting']}".strip()
            comparisons.append(_comparison("DPO", against, row, (-found[0], found[1])))
    return comparisons


def _comparison(policy: str, against: str, row: dict, found: tuple[float, float]) -> dict:
    difference, difference_stderr = found
    return {
        "policy": policy,
        "against": against,
        "kl": row["kl"],
        "difference": difference,
        "stderr": difference_stderr,
    }
