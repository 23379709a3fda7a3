"""Evaluation: sequence log-probs, the KL estimate, exact match and win rate, against references."""

import itertools

import jax
import numpy as np
import pytest
from test_models import _random_params

from dpo_jax import evaluation, sampling
from dpo_jax.data import synthetic
from dpo_jax.models import ModelConfig, logits

_SMALL = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
_SYNTHETIC = ModelConfig(
    family="llama", vocab_size=len(synthetic.VOCAB), head_dim=8, eos_token_id=2, **_SMALL
)


_ROW = 16  # reference rows are right-padded to this length, so the forward compiles once


def _full_logits(config, params, ids):
    """[len(ids), V] logits of the full forward over one right-padded row (jitted per config)."""
    row = np.zeros((1, _ROW), np.int32)
    row[0, : len(ids)] = ids
    segment_ids = (np.arange(_ROW) < len(ids)).astype(np.int32)[None]
    forward = jax.jit(logits, static_argnums=0)
    return np.asarray(forward(config, params, row, None, segment_ids))[0, : len(ids)]


def _reference_logps(config, params, prompt, completion):
    """log π(completion | prompt) from the full forward's logits, log-softmax in float64."""
    z = _full_logits(config, params, list(prompt) + list(completion)).astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return sum(logp[len(prompt) + t - 1, tok] for t, tok in enumerate(completion))


def test_sequence_logps_match_the_full_forward():
    config = _SYNTHETIC
    params = _random_params(config)
    prompts = [[1, 4, 9, 17], [1, 5, 10, 11, 12, 17], [1, 6, 8, 17]]  # odd N: one row twice
    completions = [[9, 2], [12, 11, 10, 2], [8, 8, 8]]
    ours = evaluation.sequence_logps(config, params, prompts, completions, batch_size=2)
    theirs = [
        _reference_logps(config, params, p, c) for p, c in zip(prompts, completions, strict=True)
    ]
    assert ours.shape == (3,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_kl_estimate_matches_the_enumerated_kl():
    # Vocabulary 5, two new tokens, no eos: 25 possible completions, so the exact KL is a sum.
    config = ModelConfig(family="llama", vocab_size=5, head_dim=8, **_SMALL)
    policy, ref = _random_params(config, seed=0), _random_params(config, seed=3)
    prompt = [1, 3, 0]
    every = [list(y) for y in itertools.product(range(5), repeat=2)]
    logp = evaluation.sequence_logps(config, policy, [prompt] * 25, every)
    logq = evaluation.sequence_logps(config, ref, [prompt] * 25, every)
    np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=1e-5)
    exact = float(np.sum(np.exp(logp) * (logp - logq)))
    assert exact > 0.05, "the two random models should differ"

    samples = evaluation.sample_completions(
        config,
        policy,
        [prompt] * 4000,
        rng=jax.random.key(0),
        max_new_tokens=2,
        eos_id=None,
        pad_id=0,
        batch_size=1000,
    )
    estimate = evaluation.sequence_kl(
        config, policy, ref, [prompt] * 4000, samples, batch_size=1000
    )
    assert abs(estimate.mean - exact) < 4 * estimate.stderr, (estimate.mean, exact, estimate.stderr)
    assert estimate.stderr < 0.2 * exact
    same = evaluation.sequence_kl(config, policy, policy, [prompt] * 8, samples[:8])
    assert same.mean == 0.0 and np.all(same.log_ratios == 0.0)


def test_exact_match_rate_counts_greedy_answers_equal_to_chosen():
    config = _SYNTHETIC
    params = _random_params(config)
    tokenizer = synthetic.make_tokenizer()
    prompts = [r["prompt"] for r in synthetic.make_records(8, split="eval")]
    # The answers the model gives, by an independent greedy loop over the full forward.
    given = []
    for prompt in prompts:
        ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        for _ in range(synthetic.MAX_RESPONSE_LENGTH):
            token = int(np.argmax(_full_logits(config, params, ids)[-1]))
            ids.append(token)
            if token == tokenizer.eos_id:
                break
        given.append(
            tokenizer.decode(ids[len(tokenizer.encode(prompt)) + 1 :], skip_special_tokens=True)
        )
    # Records 0, 2, 4, 6 say the model's answer is right; 1, 3, 5, 7 expect something else.
    records = [
        {"prompt": p, "chosen": g if i % 2 == 0 else g + " 9 9", "rejected": "x"}
        for i, (p, g) in enumerate(zip(prompts, given, strict=True))
    ]
    rate = evaluation.exact_match_rate(config, params, tokenizer, records, batch_size=3)
    assert rate == 0.5


def test_synthetic_rewards_and_win_rate():
    assert evaluation.synthetic_digit_reward("sort 3 1 2 =", "1 2 3") == 1.0
    assert evaluation.synthetic_digit_reward("sort 3 1 2 =", "1 2 4") == pytest.approx(2 / 3)
    assert evaluation.synthetic_digit_reward("reverse 3 1 2 =", "2 1") == pytest.approx(2 / 3)
    assert evaluation.synthetic_digit_reward("copy 3 1 2 =", "3 1 2 5") == pytest.approx(3 / 4)
    assert evaluation.synthetic_exact_reward("copy 3 1 2 =", "3 1 2") == 1.0
    assert evaluation.synthetic_exact_reward("copy 3 1 2 =", "3 1") == 0.0
    assert evaluation.high_digit_reward("copy 1 2 =", "5 1 9 0") == 0.5
    assert evaluation.high_digit_reward("copy 1 2 =", "") == 0.0
    assert evaluation.reward_fn("high_digits") is evaluation.high_digit_reward
    assert evaluation.win_rate([1.0, 0.5, 0.0, 0.2], [0.0, 0.5, 1.0, 0.1]) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError, match="not a synthetic task prompt"):
        evaluation.synthetic_digit_reward("hello", "1")
    with pytest.raises(ValueError, match="known: "):
        evaluation.reward_fn("sentiment")
    with pytest.raises(ValueError, match="equally long"):
        evaluation.win_rate([1.0], [])


def test_compare_to_reference_of_a_policy_with_itself():
    config = _SYNTHETIC
    params = _random_params(config)
    tokenizer = synthetic.make_tokenizer()
    records = synthetic.make_records(6, split="eval")
    result = evaluation.compare_to_reference(
        config, params, params, tokenizer, records, rng=jax.random.key(0)
    )
    assert result["kl/mean"] == 0.0 and result["num_prompts"] == 6
    assert result["exact_match/policy"] == result["exact_match/reference"]
    assert 0.0 <= result["win_rate"] <= 1.0


def test_bad_scoring_input_is_refused():
    params = _random_params(_SYNTHETIC)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        evaluation.sequence_logps(_SYNTHETIC, params, [[1], [1]], [[2]])
    with pytest.raises(ValueError, match="row 1"):
        evaluation.sequence_logps(_SYNTHETIC, params, [[1], [1]], [[2], []])
    with pytest.raises(ValueError, match="is empty"):
        sampling.encode_prompt(synthetic.make_tokenizer(), "")


def test_generation_and_scoring_take_params_sharded_as_training_leaves_them():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    config = _SYNTHETIC
    params = _random_params(config)
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    placed = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))  # replicated over 8
    prompts, completions = [[1, 4, 9, 17], [1, 5, 17]], [[9, 2], [5, 5, 2]]
    ours = evaluation.sequence_logps(config, placed, prompts, completions)
    np.testing.assert_array_equal(
        ours, evaluation.sequence_logps(config, params, prompts, completions)
    )
    sharded = sampling.generate(config, placed, prompts, max_new_tokens=4, eos_id=())
    plain = sampling.generate(config, params, prompts, max_new_tokens=4, eos_id=())
    np.testing.assert_array_equal(sharded.tokens, plain.tokens)
