"""What DPO did to a model: exact-match of greedy answers, sequence KL, reward win rate.

All of it reads completions the policy generates (`dpo_jax.sampling`) and scores them with
`dpo_jax.logprobs.logprob_fn`, the function training uses, under the policy and the reference:

- `exact_match_rate`: greedy completions equal to the record's chosen answer (on the synthetic
  task the chosen answer is the right one, so this is accuracy).
- `sequence_kl`: KL(π_θ ‖ π_ref) ≈ mean over y ~ π_θ(·|x) of log π_θ(y|x) − log π_ref(y|x),
  summed over the completion's tokens (eos included), averaged over prompts.
- `win_rate`: how often the policy's completion gets a higher reward than the reference's,
  under a reward function named in `REWARD_FUNCTIONS`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from dpo_jax import sampling
from dpo_jax.data import synthetic
from dpo_jax.data.records import load_records, normalize_record
from dpo_jax.logprobs import logprob_fn
from dpo_jax.models import ModelConfig, make_apply_fn

_LENGTH_MULTIPLE = 8  # rows are padded to a multiple of this, so few shapes are compiled


def _normalized(text: str) -> str:
    return " ".join(text.split())


def load_prompts_and_answers(records: Any, tokenizer: Any) -> tuple[list[str], list[str]]:
    """(prompt texts, chosen texts) of preference records of any shape `load_records` reads."""
    texts = [normalize_record(raw, tokenizer) for raw in load_records(records)]
    return [text.prompt for text in texts], [text.chosen for text in texts]


def greedy_completions(
    model_config: ModelConfig,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions of text prompts, decoded without special tokens (batched)."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids = [sampling.encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        out = sampling.generate(
            model_config,
            params,
            ids,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )
        texts += [tokenizer.decode(c, skip_special_tokens=True) for c in out.completions()]
    return texts


def exact_match_rate(
    model_config: ModelConfig,
    params: Any,
    tokenizer: Any,
    records: Any,
    *,
    max_new_tokens: int = synthetic.MAX_RESPONSE_LENGTH,
    batch_size: int = 64,
) -> float:
    """Fraction of records whose greedy completion is the chosen answer (whitespace-normalised).

    Args:
      model_config: the model.
      params: its params.
      tokenizer: the `Tokenizer` the model was trained with (bos added as in training).
      records: preference records (a path or a list of dicts; see `data.records.load_records`).
      max_new_tokens: the most tokens generated per prompt.
      batch_size: prompts per generation call.

    Raises:
      ValueError: no records, or a record without a prompt or chosen answer.
    """
    prompts, answers = load_prompts_and_answers(records, tokenizer)
    completions = greedy_completions(
        model_config,
        params,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    hits = [_normalized(c) == _normalized(a) for c, a in zip(completions, answers, strict=True)]
    return float(np.mean(hits))


def _scoring_batch(prompts, completions, pad_id) -> dict[str, np.ndarray]:
    """Rows prompt + completion, two rows to a 'pair' slot: [ceil(N/2), 2, T] arrays."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    if len(rows) % 2:  # the pair axis wants an even count: score the last row twice
        rows.append(rows[-1])
        prompts = [*prompts, prompts[-1]]
    length = _LENGTH_MULTIPLE * math.ceil(max(map(len, rows)) / _LENGTH_MULTIPLE)
    tokens = np.full((len(rows), length), pad_id, np.int32)
    response_mask = np.zeros((len(rows), length), bool)
    segment_ids = np.zeros((len(rows), length), np.int32)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        tokens[i, : len(row)] = row
        response_mask[i, len(prompt) : len(row)] = True
        segment_ids[i, : len(row)] = 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    pairs = len(rows) // 2
    batch = dict(
        tokens=tokens, response_mask=response_mask, positions=positions, segment_ids=segment_ids
    )
    batch = {key: value.reshape(pairs, 2, length) for key, value in batch.items()}  # [B, 2, T]
    batch["pair_mask"] = np.ones((pairs, 1), bool)
    return batch


@functools.lru_cache(maxsize=8)
def _compiled_logps(model_config: ModelConfig):
    fn = functools.partial(
        logprob_fn,
        make_apply_fn(model_config),
        final_logit_softcapping=model_config.final_logit_softcapping,
    )
    return jax.jit(lambda params, batch: fn(params, batch).logps[..., 0])  # [B, 2]


def sequence_logps(
    model_config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    batch_size: int = 64,
    pad_id: int = 0,
) -> np.ndarray:
    """[N] float32 log π(completion | prompt), summed over the completion's tokens.

    Args:
      model_config: the model.
      params: its params.
      prompts: N token-id prompts (bos included), each non-empty.
      completions: N token-id completions (eos included where the row stopped), each non-empty.
      batch_size: rows per forward pass.
      pad_id: the id written on padding (never scored).

    Raises:
      ValueError: lengths of prompts and completions differ, or one is empty (naming its index).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if not len(prompt) or not len(completion):
            raise ValueError(f"row {i}: prompt and completion must both be non-empty")
    compute = _compiled_logps(model_config)
    scores = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        batch = _scoring_batch(prompts[start:end], completions[start:end], pad_id)
        scores.append(np.asarray(compute(params, batch)).reshape(-1)[: len(prompts[start:end])])
    return np.concatenate(scores).astype(np.float32)


class KLEstimate(NamedTuple):
    """A Monte Carlo estimate of KL(π_θ ‖ π_ref) in nats per sequence.

    Attributes:
      mean: the estimate, mean over samples of log π_θ(y|x) − log π_ref(y|x).
      stderr: its standard error (sample standard deviation / sqrt(N)).
      log_ratios: [N] float32 per-sample log π_θ(y|x) − log π_ref(y|x).
    """

    mean: float
    stderr: float
    log_ratios: np.ndarray


def sequence_kl(
    model_config: ModelConfig,
    policy_params: Any,
    ref_params: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    batch_size: int = 64,
    pad_id: int = 0,
) -> KLEstimate:
    """KL(π_θ ‖ π_ref) from completions sampled from the policy.

    The estimate is unbiased only when `completions` are exact samples of π_θ (temperature 1,
    no top-k / top-p, not truncated by max_new_tokens); greedy or filtered completions measure
    a log-ratio, not the KL. Summed over each completion's tokens, so the KL is per sequence.

    Args:
      model_config: the model (policy and reference share it).
      policy_params: π_θ's params.
      ref_params: π_ref's params.
      prompts: N token-id prompts.
      completions: N completions sampled from π_θ given each prompt.
      batch_size: rows per forward pass.
      pad_id: the id written on padding.
    """
    kwargs = dict(batch_size=batch_size, pad_id=pad_id)
    policy = sequence_logps(model_config, policy_params, prompts, completions, **kwargs)
    ref = sequence_logps(model_config, ref_params, prompts, completions, **kwargs)
    log_ratios = policy - ref
    stderr = (
        float(np.std(log_ratios, ddof=1) / np.sqrt(len(log_ratios))) if len(log_ratios) > 1 else 0.0
    )
    return KLEstimate(float(np.mean(log_ratios)), stderr, log_ratios)


def synthetic_digit_reward(prompt: str, completion: str) -> float:
    """The synthetic task's reward: the fraction of the right answer's digits in place.

    The right answer comes from `synthetic.answer` on the prompt `"<task> d1 ... dn ="`; a
    completion of another length loses a point per missing or extra digit.
    """
    words = prompt.split()
    if len(words) < 3 or words[0] not in synthetic.TASKS or words[-1] != "=":
        raise ValueError(f"prompt {prompt!r} is not a synthetic task prompt ('<task> d1 ... dn =')")
    right = synthetic.answer(words[0], words[1:-1])
    given = completion.split()
    matches = sum(a == b for a, b in zip(right, given, strict=False))
    return matches / max(len(right), len(given))


def synthetic_exact_reward(prompt: str, completion: str) -> float:
    """1.0 when the completion is the synthetic task's right answer, else 0.0."""
    return float(synthetic_digit_reward(prompt, completion) == 1.0)


def high_digit_reward(prompt: str, completion: str) -> float:
    """The fraction of the completion's words that are digits 5-9 (0 for an empty completion).

    A property of the completion alone, as the DPO paper's sentiment score is: the reference's
    answers to the synthetic task score about 1/2, and a policy can raise it only by moving
    away from the right answer, so reward trades against KL. `prompt` is not read.
    """
    words = completion.split()
    return sum(w in ("5", "6", "7", "8", "9") for w in words) / len(words) if words else 0.0


REWARD_FUNCTIONS: dict[str, Callable[[str, str], float]] = {
    "synthetic_digits": synthetic_digit_reward,
    "synthetic_exact": synthetic_exact_reward,
    "high_digits": high_digit_reward,
}


def reward_fn(name: str) -> Callable[[str, str], float]:
    """The reward function `name` of `REWARD_FUNCTIONS`; an unknown name lists the known ones."""
    if name not in REWARD_FUNCTIONS:
        raise ValueError(f"reward={name!r} is not known; known: {sorted(REWARD_FUNCTIONS)}")
    return REWARD_FUNCTIONS[name]


def win_rate(policy_rewards: Sequence[float], ref_rewards: Sequence[float]) -> float:
    """Fraction of prompts where the policy's reward beats the reference's; ties count 1/2.

    Raises:
      ValueError: the two lists differ in length or are empty.
    """
    policy, ref = np.asarray(policy_rewards, float), np.asarray(ref_rewards, float)
    if policy.shape != ref.shape or policy.size == 0:
        raise ValueError(
            f"policy_rewards ({policy.size}) and ref_rewards ({ref.size}) must be equally long "
            "and non-empty"
        )
    return float(np.mean((policy > ref) + 0.5 * (policy == ref)))


def sample_completions(
    model_config: ModelConfig,
    params: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    rng: jax.Array,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    batch_size: int = 64,
    temperature: float = 1.0,
) -> list[list[int]]:
    """One sample per prompt, batched: at temperature 1 (the default) an exact sample of π (no
    top-k / top-p), at τ a sample of softmax(logits / τ), at 0 the greedy completion."""
    completions = []
    for start in range(0, len(prompt_ids), batch_size):
        out = sampling.generate(
            model_config,
            params,
            prompt_ids[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            rng=jax.random.fold_in(rng, start),
            options=sampling.SamplingOptions(temperature=temperature),
            eos_id=eos_id,
            pad_id=pad_id,
        )
        completions += out.completions()
    return completions


def compare_to_reference(
    model_config: ModelConfig,
    policy_params: Any,
    ref_params: Any,
    tokenizer: Any,
    records: Any,
    *,
    rng: jax.Array,
    reward: str | None = "synthetic_digits",
    max_new_tokens: int = synthetic.MAX_RESPONSE_LENGTH,
    batch_size: int = 64,
) -> dict[str, float]:
    """The closing comparison of a DPO run on held-out prompts.

    Args:
      model_config: the model (policy and reference share it).
      policy_params: π_θ's params (after DPO).
      ref_params: π_ref's params (the SFT model, or the pretrained one).
      tokenizer: the model's tokenizer.
      records: held-out preference records (path or list of dicts).
      rng: the key of the policy's and the reference's samples.
      reward: a name in `REWARD_FUNCTIONS` for the win rate, or None for no win rate.
      max_new_tokens: the most tokens per completion.
      batch_size: prompts per call.

    Returns:
      {"exact_match/reference", "exact_match/policy"}: greedy exact-match rates;
      {"kl/mean", "kl/stderr"}: KL(π_θ ‖ π_ref) per sequence from one sample per prompt;
      "win_rate": policy samples against reference samples under `reward` (if given);
      "num_prompts".
    """
    prompts, _ = load_prompts_and_answers(records, tokenizer)
    common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    result = {
        "exact_match/reference": exact_match_rate(
            model_config, ref_params, tokenizer, records, **common
        ),
        "exact_match/policy": exact_match_rate(
            model_config, policy_params, tokenizer, records, **common
        ),
    }
    prompt_ids = [sampling.encode_prompt(tokenizer, p) for p in prompts]
    sample = functools.partial(
        sample_completions,
        model_config,
        prompt_ids=prompt_ids,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        **common,
    )
    policy_rng, ref_rng = jax.random.split(rng)
    policy_samples = sample(policy_params, rng=policy_rng)
    kl = sequence_kl(
        model_config,
        policy_params,
        ref_params,
        prompt_ids,
        policy_samples,
        batch_size=batch_size,
        pad_id=tokenizer.pad_id,
    )
    result.update({"kl/mean": kl.mean, "kl/stderr": kl.stderr})
    if reward is not None:
        score = reward_fn(reward)
        ref_samples = sample(ref_params, rng=ref_rng)

        def rewards(samples):
            texts = [tokenizer.decode(s, skip_special_tokens=True) for s in samples]
            return [score(p, t) for p, t in zip(prompts, texts, strict=True)]

        result["win_rate"] = win_rate(rewards(policy_samples), rewards(ref_samples))
    result["num_prompts"] = len(prompts)
    return result
