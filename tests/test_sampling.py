"""Generation with the KV cache against recomputing the full forward at every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import DECODE_CONFIGS
from test_models import _random_params

from dpo_jax import sampling
from dpo_jax.models import logits_from_hidden, make_apply_fn
from dpo_jax.sampling import SamplingOptions

_PROMPTS = ([5, 17, 3, 99, 42, 7, 1], [8, 250], [31, 4, 4, 4, 60])  # left-padded to 7
_NEW = 8


def _forward_next_logits(config, params, length):
    """A jitted full forward over a right-padded row: logits [V] of position `last`."""
    apply_fn = make_apply_fn(config)

    @jax.jit
    def next_logits(params, row, last):
        tokens = row[None]
        positions = jnp.arange(length, dtype=jnp.int32)[None]
        segment_ids = (positions <= last).astype(jnp.int32)  # padding after `last`: segment 0
        hidden, unembedding = apply_fn(params, tokens, positions, segment_ids)
        return logits_from_hidden(config, hidden[:, last][:, None], unembedding)[0, 0]

    return next_logits


def _recompute(config, params, prompt, steps, rng=None, options=sampling.GREEDY):
    """Continuation by a full forward over prompt + generated so far at each step (no cache)."""
    length = len(prompt) + steps
    next_logits = _forward_next_logits(config, params, length)
    ids = list(prompt)
    for t in range(steps):
        row = jnp.asarray(ids + [0] * (length - len(ids)), jnp.int32)
        logits = next_logits(params, row, len(ids) - 1)[None]
        key = None if rng is None else jax.random.fold_in(rng, t)
        ids.append(int(sampling.next_token(logits, key, options)[0]))
    return ids[len(prompt) :]


@pytest.mark.parametrize("name", sorted(DECODE_CONFIGS))
def test_greedy_with_cache_equals_full_recompute(name):
    config = DECODE_CONFIGS[name]
    params = _random_params(config)
    out = sampling.generate(config, params, _PROMPTS, max_new_tokens=_NEW, eos_id=())
    assert out.tokens.shape == (3, _NEW) and out.tokens.dtype == np.int32
    np.testing.assert_array_equal(out.lengths, [_NEW] * 3)
    assert not out.finished.any()
    for row, prompt in zip(out.tokens, _PROMPTS, strict=True):
        assert row.tolist() == _recompute(config, params, prompt, _NEW)
    assert len({tuple(row) for row in out.tokens}) == 3, "rows should differ"


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_sampling_with_cache_equals_full_recompute_with_the_same_keys(name):
    config = DECODE_CONFIGS[name]
    params = _random_params(config)
    options = SamplingOptions(temperature=0.8, top_k=50, top_p=0.9)
    rng = jax.random.key(7)
    prompt = _PROMPTS[0]
    out = sampling.generate(
        config, params, [prompt], max_new_tokens=_NEW, rng=rng, options=options, eos_id=()
    )
    assert out.tokens[0].tolist() == _recompute(config, params, prompt, _NEW, rng, options)
    again = sampling.generate(
        config, params, [prompt], max_new_tokens=_NEW, rng=rng, options=options, eos_id=()
    )
    np.testing.assert_array_equal(again.tokens, out.tokens)
    other = sampling.generate(
        config,
        params,
        [prompt],
        max_new_tokens=_NEW,
        rng=jax.random.key(8),
        options=options,
        eos_id=(),
    )
    assert other.tokens.tolist() != out.tokens.tolist()


def test_rows_stop_at_eos_and_pad_after():
    config = DECODE_CONFIGS["llama"]
    params = _random_params(config)
    free = sampling.generate(config, params, _PROMPTS, max_new_tokens=_NEW, eos_id=())
    eos = int(free.tokens[0, 2])  # row 0's third greedy token becomes the eos
    out = sampling.generate(config, params, _PROMPTS, max_new_tokens=_NEW, eos_id=eos, pad_id=0)
    for row, free_row, length, finished in zip(
        out.tokens, free.tokens, out.lengths, out.finished, strict=True
    ):
        hits = np.flatnonzero(free_row == eos)
        expected = int(hits[0]) + 1 if hits.size else _NEW
        assert length == expected and finished == bool(hits.size)
        np.testing.assert_array_equal(row[:length], free_row[:length])
        assert np.all(row[length:] == 0)
    assert out.lengths[0] == 3 and out.completions()[0] == free.tokens[0, :3].tolist()


def test_generation_stops_early_when_every_row_has_ended():
    config = DECODE_CONFIGS["llama"]
    params = _random_params(config)
    free = sampling.generate(config, params, [_PROMPTS[0]], max_new_tokens=_NEW, eos_id=())
    eos = int(free.tokens[0, 0])
    out = sampling.generate(config, params, [_PROMPTS[0]], max_new_tokens=_NEW, eos_id=eos)
    assert out.lengths.tolist() == [1] and out.finished.tolist() == [True]


def _numpy_filter(logits, temperature, top_k, top_p):
    """Reference: sort, keep the top k, then the smallest prefix reaching top_p."""
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(z.shape, bool)
    probs = np.exp(z[order] - z.max())
    k = top_k or z.size
    probs[k:] = 0
    probs /= probs.sum()
    mass = 0.0
    for rank, token in enumerate(order[:k]):
        if mass >= top_p:
            break
        keep[token] = True
        mass += probs[rank]
    return np.where(keep, z, -np.inf)


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.0, 0, 0.7), (2.0, 4, 0.5)]
)
def test_filter_logits_matches_numpy(temperature, top_k, top_p):
    logits = np.log(np.array([[0.05, 0.5, 0.02, 0.15, 0.3, 0.01, 0.04, 0.1]], np.float64))
    logits = logits.astype(np.float32)
    options = SamplingOptions(temperature, top_k, top_p)
    ours = np.asarray(sampling.filter_logits(jnp.asarray(logits), options))[0]
    theirs = _numpy_filter(logits[0].astype(np.float64), temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    finite = np.isfinite(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6)


def test_sampled_frequencies_follow_the_filtered_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None].repeat(20_000, 0), jnp.float32)  # [20000, 4]
    draws = np.asarray(sampling.next_token(logits, jax.random.key(0), SamplingOptions(1.0, 0, 0.7)))
    # top_p 0.7 keeps {0.5, 0.3}: frequencies 0.625, 0.375 (standard error 0.0034).
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
    draws = np.asarray(sampling.next_token(logits, jax.random.key(1), SamplingOptions(1.0, 0, 1.0)))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / draws.size, probs, atol=0.015)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[list(range(1, 40))]), "context is 32"),
        (dict(max_new_tokens=30), r"exceeds the model's context of 32"),
        (dict(options=SamplingOptions(1.0, 0, 0.0)), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(options=SamplingOptions(1.0, 0, 1.5)), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(options=SamplingOptions(1.0, -1, 1.0)), "top_k=-1"),
        (dict(options=SamplingOptions(-1.0)), "temperature=-1.0"),
        (dict(options=SamplingOptions(1.0), rng=None), "needs an rng key"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
    ],
)
def test_bad_input_is_refused(kwargs, message):
    config = DECODE_CONFIGS["llama"].replace(max_position_embeddings=32)
    params = _random_params(config)
    call = dict(prompts=[[1, 2, 3]] * 2, max_new_tokens=4, rng=jax.random.key(0))
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sampling.generate(config, params, call.pop("prompts"), **call)


# gemma3_270m: the real model, read once per session (conftest).


@pytest.mark.slow
def test_gemma3_270m_greedy_with_cache_equals_full_recompute_past_its_window(gemma3_270m):
    config, params, tokenizer = gemma3_270m
    assert config.sliding_window == 512
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    long_prompt = [tokenizer.bos_id] + tokenizer.encode(text)[:540]  # 541 tokens > the window
    short_prompt = [tokenizer.bos_id] + tokenizer.encode("The capital of France is")
    steps = 4
    out = sampling.generate(config, params, [long_prompt, short_prompt], max_new_tokens=steps)
    assert out.tokens[0].tolist() == _recompute(config, params, long_prompt, steps)
    assert out.completions()[1] == _recompute(config, params, short_prompt, steps)
    assert tokenizer.decode(out.completions()[1]) == " the capital of the"  # FACTS.md
