"""The DPO paper's controlled-sentiment experiment on a real model, judged by an outside reward.

The paper tunes GPT-2 to continue IMDb review prefixes positively, scoring with a sentiment
classifier. Here, at CPU size:
- π_ref is the packaged Gemma 3 270M (Q4_K_M GGUF, dequantised), with no SFT;
- prompts are movie-review openings from `review_openings` (neutral themselves: VADER 0);
- a continuation is π_ref's (or a policy's) next sentence: sampled at temperature 1 until a token
  that holds '.', '!', '?' or a newline, or eos, or `max_new_tokens`. Those tokens are stop ids
  of the sampler, so the continuation is an exact sample of π's distribution over first sentences
  and its summed log-probs give an exact sequence KL (a run cut by max_new_tokens is a prefix,
  whose probability the sum also is);
- the true reward is VADER's compound score of the continuation, in [−1, 1] (`vaderSentiment`:
  Hutto & Gilbert's published lexicon and rules, nobody's model here);
- pairs: two π_ref continuations per training opening, labelled by Bradley–Terry on the reward,
  p(y1 ≻ y2) = σ(s·(r(y1) − r(y2))). A pair whose two continuations are the same text, or score
  the same (most often both 0: no sentiment word), carries no preference and is left out
  (counted in the result);
- policies: DPO with LoRA adapters (`configs/pretrained.py:gemma3_gguf_lora`) at each β;
  Preferred-FT, the same adapters trained on the chosen continuations alone (loss "sft"); and
  best-of-N of π_ref by VADER, its KL tie-aware (`frontier_analysis.best_of_n`);
- each policy is scored on held-out openings by one temperature-1 continuation per opening:
  mean VADER score and sequence KL(π ‖ π_ref), each with its standard error.

Every model is trained by `dpo_jax.run.train.train_and_evaluate`, the main job's entry point.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import evaluation, sampling
from dpo_jax.experiments.frontier_analysis import best_of_n, policy_row, stderr
from dpo_jax.experiments.review_openings import make_openings
from dpo_jax.experiments.runs import (
    derived_config,
    quiet_config,
    train_and_load,
    write_csv,
    write_jsonl,
)

CSV_FIELDS = (
    "method", "setting", "reward", "reward_stderr", "kl", "kl_stderr", "kl_bound",
    "reward_gain", "reward_gain_stderr",
)  # fmt: skip
SENTENCE_ENDS = (".", "!", "?", "\n")  # a token holding one of these ends a continuation
PROMPT_TOKENS = 24  # the longest opening in tokens, bos included (Gemma's: 21)


@dataclasses.dataclass(frozen=True)
class SentimentSettings:
    """The experiment's knobs (defaults: the README run)."""

    num_train_openings: int = 256  # openings whose two π_ref continuations make a pair
    num_eval_openings: int = 128  # held-out openings each policy is scored on
    max_new_tokens: int = 24  # the longest continuation (most end at their sentence's end)
    reward_scale: float = 5.0  # s of Bradley–Terry on VADER's compound score
    betas: tuple[float, ...] = (0.1, 0.5)  # DPO's β values
    epochs: int = 1  # passes over the pairs of each DPO and Preferred-FT run
    batch_size: int = 8  # pairs per step of those runs
    learning_rate: float = 1e-4  # of the adapters (the base config's optimizer)
    best_of: tuple[int, ...] = (1, 2, 4, 8)  # N of best-of-N
    reference_draws: int = 8  # π_ref continuations per held-out opening (>= max(best_of))
    samples_shown: int = 8  # held-out openings whose continuations the samples file shows
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SentimentResult:
    """What `run_sentiment` measured.

    Attributes:
      rows: one per policy: CSV_FIELDS (kl_bound for best-of-N only), and the per-opening
        "prompt_rewards" and "prompt_kls" [eval openings] they average.
      pair_counts: {"openings", "pairs", "same_text", "same_score"}: how the pairs were made
        ("same_text" also counts a pair with an empty continuation: no text to prefer).
      samples: per shown opening {"opening", <policy name>: (continuation, score), ...}.
    """

    rows: list[dict]
    pair_counts: dict[str, int]
    samples: list[dict]


def vader_reward() -> Callable[[str], float]:
    """VADER's compound score of a text, in [−1, 1] (0 for a text with no sentiment words)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda text: float(analyzer.polarity_scores(text)["compound"])


def sentence_end_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the tokens whose text holds one of SENTENCE_ENDS (special tokens excluded)."""
    size = tokenizer.backend.get_vocab_size()
    texts = tokenizer.backend.decode_batch([[i] for i in range(size)], skip_special_tokens=True)
    return tuple(i for i, text in enumerate(texts) if any(end in text for end in SENTENCE_ENDS))


@dataclasses.dataclass(frozen=True)
class _Model:
    """π_ref and what sampling from a model of its kind needs."""

    config: Any
    ref_params: Any
    tokenizer: Any
    stop_ids: tuple[int, ...]
    max_new_tokens: int

    def continue_openings(self, params, prompt_ids, rng) -> tuple[list[list[int]], list[str]]:
        """One temperature-1 continuation per opening: (token ids, text)."""
        completions = evaluation.sample_completions(
            self.config,
            params,
            prompt_ids,
            rng=rng,
            max_new_tokens=self.max_new_tokens,
            eos_id=self.stop_ids,
            pad_id=self.tokenizer.pad_id,
            batch_size=128,
        )
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        return completions, texts


def make_pairs(model: _Model, openings, reward, settings, rng) -> tuple[list[dict], dict]:
    """Two π_ref continuations per opening, labelled by Bradley–Terry on `reward`.

    Returns:
      (pairs as {"prompt", "chosen", "rejected"} records, the counts of SentimentResult).
    """
    prompt_ids = [sampling.encode_prompt(model.tokenizer, o) for o in openings]
    first_rng, second_rng, label_rng = jax.random.split(rng, 3)
    _, first = model.continue_openings(model.ref_params, prompt_ids, first_rng)
    _, second = model.continue_openings(model.ref_params, prompt_ids, second_rng)
    draws = np.asarray(jax.random.uniform(label_rng, (len(openings),)))
    pairs, counts = [], {"openings": len(openings), "same_text": 0, "same_score": 0}
    for opening, a, b, u in zip(openings, first, second, draws, strict=True):
        if a == b or not a.strip() or not b.strip():
            counts["same_text"] += 1
            continue
        margin = settings.reward_scale * (reward(a) - reward(b))
        if margin == 0:
            counts["same_score"] += 1
            continue
        a_wins = u < 1.0 / (1.0 + math.exp(-margin))
        chosen, rejected = (a, b) if a_wins else (b, a)
        pairs.append({"prompt": opening, "chosen": chosen, "rejected": rejected})
    counts["pairs"] = len(pairs)
    return pairs, counts


def score_policy(model: _Model, params, prompt_ids, reward, rng) -> tuple[dict, list[str]]:
    """Mean VADER score and KL(π ‖ π_ref) of one continuation per opening.

    Returns:
      (the CSV fields reward, reward_stderr, kl, kl_stderr with the per-opening
      "prompt_rewards" and "prompt_kls" [openings]; the continuations' texts).
    """
    completions, texts = model.continue_openings(params, prompt_ids, rng)
    rewards = np.array([reward(t) for t in texts])
    kl = evaluation.sequence_kl(
        model.config,
        params,
        model.ref_params,
        prompt_ids,
        completions,
        batch_size=32,
        pad_id=model.tokenizer.pad_id,
    )
    return policy_row(rewards, kl), texts


def _tuning_runs(settings: SentimentSettings, num_pairs: int, pairs_path: str):
    """(method, setting, config fields) of each policy trained from π_ref on the pairs."""
    steps = max(1, settings.epochs * num_pairs // settings.batch_size)
    tune = {
        "data.source": pairs_path,
        "data.eval_source": "",
        "data.batch_size": settings.batch_size,
        "optimizer.learning_rate": settings.learning_rate,
        "sft.num_steps": 0,
        "dpo.num_steps": steps,
    }
    runs = [("DPO (LoRA)", f"beta={beta}", {**tune, "dpo.beta": beta}) for beta in settings.betas]
    return [*runs, ("Preferred-FT (LoRA)", "", {**tune, "dpo.loss_type": "sft"})]


def check_settings(settings: SentimentSettings, base_config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field: too few draws for best-of-N, or no adapters."""
    if settings.reference_draws < max(settings.best_of):
        raise ValueError(
            f"reference_draws={settings.reference_draws} must be >= max(best_of)="
            f"{max(settings.best_of)}: best-of-N reads the first N draws"
        )
    if not base_config.lora.rank:
        raise ValueError(
            "the sentiment experiment tunes LoRA adapters: its base config needs lora.rank >= 1 "
            "(configs/pretrained.py:gemma3_gguf_lora)"
        )


def load_reference(model_path: str, max_new_tokens: int) -> _Model:
    """π_ref from a .gguf file or a Hugging Face directory, with its tokenizer's stop ids."""
    config, params, tokenizer = sampling.load_model(model_path, tokenizer="model")
    stop_ids = tuple(sorted({tokenizer.eos_id, *sentence_end_ids(tokenizer)} - {None}))
    return _Model(config, params, tokenizer, stop_ids, max_new_tokens)


def _run_fields(model_path: str, settings: SentimentSettings) -> dict:
    """The config fields every run shares: the model at `model_path` and its tokenizer, and rows
    that hold an opening (at most PROMPT_TOKENS tokens, bos included) and a continuation with
    eos; a pair that does not fit stops the run, naming it, rather than being cut."""
    source = "gguf" if model_path.endswith(".gguf") else "hf"
    return {
        "model.source": source,
        f"model.{source}_path": model_path,
        "data.tokenizer": "model",
        "data.max_prompt_length": PROMPT_TOKENS,
        "data.max_length": PROMPT_TOKENS + settings.max_new_tokens + 1,
        "data.prompt_too_long": "error",
    }


def run_sentiment(
    base_config: ml_collections.ConfigDict,
    model_path: str,
    out_dir: str,
    settings: SentimentSettings = SentimentSettings(),
) -> SentimentResult:
    """Runs the whole experiment; writes sentiment.csv and sentiment_samples.md to `out_dir`.

    Args:
      base_config: a LoRA config (configs/pretrained.py:gemma3_gguf_lora); optimizer and LoRA
        come from it, the model from `model_path`, the row lengths from `_run_fields`.
      model_path: π_ref, a .gguf file or a Hugging Face model directory (with tokenizer.json).
      out_dir: where the runs (under runs/), pairs.jsonl and the results go.
      settings: the experiment's knobs.

    Raises:
      ValueError: see `check_settings`.
    """
    check_settings(settings, base_config)
    base = derived_config(
        quiet_config(base_config, settings.seed), **_run_fields(model_path, settings)
    )
    model = load_reference(model_path, settings.max_new_tokens)
    reward = vader_reward()
    rng = jax.random.key(settings.seed)
    train_openings = make_openings(settings.num_train_openings, settings.seed)
    eval_openings = make_openings(
        settings.num_eval_openings, settings.seed + 1, exclude=frozenset(train_openings)
    )
    pairs, counts = make_pairs(model, train_openings, reward, settings, jax.random.fold_in(rng, 1))
    os.makedirs(out_dir, exist_ok=True)
    pairs_path = os.path.join(out_dir, "pairs.jsonl")
    write_jsonl(pairs, pairs_path)
    print(f"[sentiment] {counts['pairs']} labelled pairs from {counts['openings']} openings "
          f"({counts['same_text']} with the same or an empty text, {counts['same_score']} with "
          "the same score left out)")  # fmt: skip
    prompt_ids = [sampling.encode_prompt(model.tokenizer, o) for o in eval_openings]
    score_rng = jax.random.fold_in(rng, 2)
    row, ref_texts = score_policy(model, model.ref_params, prompt_ids, reward, score_rng)
    rows = [{"method": "reference", "setting": "", **row}]
    shown = {"reference": ref_texts}
    for method, setting, fields in _tuning_runs(settings, len(pairs), pairs_path):
        name = f"{method.split()[0]}_{setting}".strip("_").replace("=", "")
        _, params = train_and_load(
            derived_config(base, **fields), os.path.join(out_dir, "runs", name)
        )
        row, texts = score_policy(model, params, prompt_ids, reward, score_rng)
        rows.append({"method": method, "setting": setting, **row})
        shown[f"{method} {setting}".strip()] = texts
        print(f"[sentiment] {method} {setting}: reward {row['reward']:.3f}, kl {row['kl']:.3f}")
        del params
    draws = reference_draws(model, prompt_ids, reward, settings, jax.random.fold_in(rng, 3))
    rows += best_of_n(draws, settings.best_of)
    _add_gains(rows)
    samples = _samples(eval_openings, shown, reward, settings.samples_shown)
    result = SentimentResult(rows, counts, samples)
    write_results(result, out_dir)
    return result


def _add_gains(rows: list[dict]) -> None:
    """Each sampled policy's mean VADER gain over the reference, opening by opening, with its
    paired standard error: every policy samples with the same key as the reference, so where it
    has not moved it draws the same continuation (common random numbers), and the paired gain is
    more precise than the difference of the two means. Best-of-N's draws are independent."""
    reference = rows[0]["prompt_rewards"]
    for row in rows:
        if row["method"] != "best-of-N":
            gains = row["prompt_rewards"] - reference
            row["reward_gain"], row["reward_gain_stderr"] = float(gains.mean()), stderr(gains)


def reference_draws(model: _Model, prompt_ids, reward, settings, rng) -> np.ndarray:
    """[reference_draws, openings] VADER scores of independent π_ref continuations."""
    scores = np.zeros((settings.reference_draws, len(prompt_ids)))
    for draw in range(settings.reference_draws):
        draw_rng = jax.random.fold_in(rng, draw)
        _, texts = model.continue_openings(model.ref_params, prompt_ids, draw_rng)
        scores[draw] = [reward(t) for t in texts]
    return scores


def _samples(openings, shown: dict[str, list[str]], reward, count: int) -> list[dict]:
    samples = []
    for i, opening in enumerate(openings[:count]):
        scored = {name: (texts[i], reward(texts[i])) for name, texts in shown.items()}
        samples.append({"opening": opening, **scored})
    return samples


def format_samples(samples: Sequence[dict]) -> str:
    """The samples as Markdown: each opening, then each policy's continuation and its score."""
    lines = []
    for sample in samples:
        lines.append(f"**{sample['opening']}** …")
        for name, value in sample.items():
            if name != "opening":
                text, score = value
                lines.append(f"- {name} ({score:+.2f}): {text.strip()!r}")
        lines.append("")
    return "\n".join(lines)


def format_table(result: SentimentResult) -> str:
    """The rows as a Markdown table: method, setting, mean VADER ± s.e., KL ± s.e."""
    lines = [
        "| method | setting | mean VADER | gain over π_ref (paired) | KL(π ‖ π_ref), nats |",
        "|---|---|---|---|---|",
    ]
    for row in result.rows:
        gain = (
            f"{row['reward_gain']:+.3f} ± {row['reward_gain_stderr']:.3f}"
            if "reward_gain" in row
            else ""
        )
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['reward']:.3f} ± "
            f"{row['reward_stderr']:.3f} | {gain} | {row['kl']:.2f} ± {row['kl_stderr']:.2f} |"
        )
    return "\n".join(lines)


def write_results(result: SentimentResult, out_dir: str) -> None:
    """sentiment.csv (the rows) and sentiment_samples.md (the pair counts and the samples)."""
    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, "sentiment.csv"), CSV_FIELDS, result.rows)
    counts = result.pair_counts
    with open(os.path.join(out_dir, "sentiment_samples.md"), "w") as f:
        f.write("# The sentiment run: every shown sample\n\n")
        f.write(
            f"{counts['pairs']} pairs from {counts['openings']} openings ({counts['same_text']} "
            f"left out with the same or an empty text, {counts['same_score']} with the same "
            "score).\n\n"
        )
        f.write(format_table(result) + "\n\n" + format_samples(result.samples) + "\n")
