"""Tests of dpo_jax.logprobs against hand-built examples and an independent NumPy reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax.logprobs import (
    LogProbs,
    chunked_token_logps,
    logprob_fn,
    next_token_targets,
    segment_sums,
    token_logps_from_logits,
    unembedded_token_logps,
)

VOCAB, WIDTH, MAX_POSITION = 13, 8, 32


# A toy model: embedding + position embedding, one dense layer, tanh. It is position-wise (each
# position's hidden state depends only on its own token and position), which is all the log-prob
# plumbing needs and what makes "packed == alone" hold without an attention mask.
def init_toy_params(seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    return {
        "embedding": jax.random.normal(keys[0], (VOCAB, WIDTH)),
        "position_embedding": 0.5 * jax.random.normal(keys[1], (MAX_POSITION, WIDTH)),
        "dense": jax.random.normal(keys[2], (WIDTH, WIDTH)) / np.sqrt(WIDTH),
        "bias": 0.1 * jax.random.normal(keys[3], (WIDTH,)),
        "unembedding": 2.0 * jax.random.normal(keys[4], (WIDTH, VOCAB)),
    }


def toy_apply(params, tokens, positions, segment_ids):
    del segment_ids  # position-wise: nothing to isolate
    x = params["embedding"][tokens] + params["position_embedding"][positions]  # [N, T, D]
    hidden = jnp.tanh(x @ params["dense"] + params["bias"][None, None, :])
    return hidden, params["unembedding"]


def pack_pairs(rows, length):
    """rows[b] = list of pairs ((prompt, chosen), (prompt, rejected)) packed in row b."""
    num_rows, num_slots = len(rows), max(len(pairs) for pairs in rows)
    batch = {key: np.zeros((num_rows, 2, length), np.int32) for key in ("tokens", "positions")}
    batch["segment_ids"] = np.zeros((num_rows, 2, length), np.int32)
    batch["response_mask"] = np.zeros((num_rows, 2, length), bool)
    batch["pair_mask"] = np.zeros((num_rows, num_slots), bool)
    for b, pairs in enumerate(rows):
        batch["pair_mask"][b, : len(pairs)] = True
        for p in (0, 1):
            start = 0
            for slot, pair in enumerate(pairs):
                prompt, response = pair[p]
                n = len(prompt) + len(response)
                span = slice(start, start + n)
                batch["tokens"][b, p, span] = prompt + response
                batch["positions"][b, p, span] = np.arange(n)
                batch["segment_ids"][b, p, span] = slot + 1
                batch["response_mask"][b, p, start + len(prompt) : start + n] = True
                start += n
    return {key: jnp.asarray(value) for key, value in batch.items()}


def numpy_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def numpy_reference(params, batch, softcap=None):
    """Separate forwards for chosen and rejected, NumPy log-softmax and an explicit token loop."""
    tokens, segments = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    response_mask = np.asarray(batch["response_mask"])
    num_rows, _, length = tokens.shape
    num_slots = batch["pair_mask"].shape[1]
    logps = np.zeros((num_rows, 2, num_slots))
    lengths = np.zeros((num_rows, 2, num_slots), np.int32)
    for p in (0, 1):
        hidden, unembedding = toy_apply(
            params, batch["tokens"][:, p], batch["positions"][:, p], batch["segment_ids"][:, p]
        )
        logits = np.asarray(hidden, np.float64) @ np.asarray(unembedding, np.float64)
        if softcap is not None:
            logits = softcap * np.tanh(logits / softcap)
        log_probs = numpy_log_softmax(logits)
        for b in range(num_rows):
            for t in range(1, length):
                segment = segments[b, p, t]
                if response_mask[b, p, t] and segment > 0 and segments[b, p, t - 1] == segment:
                    logps[b, p, segment - 1] += log_probs[b, t - 1, tokens[b, p, t]]
                    lengths[b, p, segment - 1] += 1
    return logps, lengths


ROWS = [
    [(([1, 2, 3], [4, 5]), ([1, 2, 3], [6, 7, 8]))],
    [(([9], [10, 11, 12]), ([9], [3]))],
]


def test_next_token_targets_five_tokens():
    # Prompt [10, 11], response [12, 13], one padding token:
    #   position t:      0   1   2   3   4
    #   tokens:         10  11  12  13   0
    #   response_mask:   F   F   T   T   F
    #   segment_ids:     1   1   1   1   0
    # Position t predicts token t + 1, so targets = [11, 12, 13, 0, 0] (0 filled in at the end).
    # Scored where token t + 1 is a response token of t's segment: t = 1 (predicts 12) and t = 2
    # (predicts 13). t = 0 predicts a prompt token, t = 3 predicts padding, t = 4 predicts nothing.
    tokens = jnp.array([[10, 11, 12, 13, 0]])
    response_mask = jnp.array([[False, False, True, True, False]])
    segment_ids = jnp.array([[1, 1, 1, 1, 0]])
    targets, target_mask = next_token_targets(tokens, response_mask, segment_ids)
    np.testing.assert_array_equal(targets, [[11, 12, 13, 0, 0]])
    np.testing.assert_array_equal(target_mask, [[False, True, True, False, False]])


def test_next_token_targets_two_packed_segments_and_padding():
    # Two segments and two padding tokens. The response mask is deliberately wrong on the first
    # token of segment 2 and on the padding, to show the segment ids alone stop those:
    #   position t:      0  1  2  3  4  5  6  7
    #   tokens:          5  6  7  8  9  4  0  0
    #   response_mask:   F  T  T  T  F  T  T  T
    #   segment_ids:     1  1  1  2  2  2  0  0
    # t=0 -> 6 scored; t=1 -> 7 scored; t=2 -> 8 crosses into segment 2: not scored;
    # t=3 -> 9 is a prompt token: not scored; t=4 -> 4 scored; t=5 -> padding: not scored;
    # t=6 -> padding inside padding (segment 0): not scored; t=7 is last: not scored.
    tokens = jnp.array([[5, 6, 7, 8, 9, 4, 0, 0]])
    response_mask = jnp.array([[0, 1, 1, 1, 0, 1, 1, 1]], bool)
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])
    targets, target_mask = next_token_targets(tokens, response_mask, segment_ids)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 4, 0, 0, 0]])
    np.testing.assert_array_equal(target_mask, [[1, 1, 0, 0, 1, 0, 0, 0]])


def test_next_token_targets_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="segment_ids"):
        next_token_targets(jnp.zeros((2, 5), int), jnp.zeros((2, 5), bool), jnp.zeros((2, 4), int))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logps_from_logits_matches_numpy(dtype):
    logits = (10.0 * jax.random.normal(jax.random.key(1), (3, 4, 50))).astype(dtype)
    targets = jax.random.randint(jax.random.key(2), (3, 4), 0, 50)
    result = token_logps_from_logits(logits, targets)
    expected = np.take_along_axis(
        numpy_log_softmax(np.asarray(logits.astype(jnp.float32))),
        np.asarray(targets)[..., None],
        -1,
    )[..., 0]
    assert result.dtype == jnp.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def _random_hidden_problem(num_rows=3, length=8, width=16, vocab=40):
    keys = jax.random.split(jax.random.key(3), 4)
    hidden = jax.random.normal(keys[0], (num_rows, length, width))
    unembedding = jax.random.normal(keys[1], (width, vocab)) / np.sqrt(width) * 3.0
    targets = jax.random.randint(keys[2], (num_rows, length), 0, vocab)
    weights = jax.random.normal(keys[3], (num_rows, length))  # a non-trivial cotangent
    return hidden, unembedding, targets, weights


# N·T = 24: 1, 4 and 24 divide it, 5 and 7 do not, 100 is larger than N·T.
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 7, 24, 100])
def test_chunked_matches_full_values_and_gradients(chunk_size):
    hidden, unembedding, targets, weights = _random_hidden_problem()

    def full(hidden, unembedding):
        return token_logps_from_logits(hidden @ unembedding, targets)

    def chunked(hidden, unembedding):
        return chunked_token_logps(hidden, unembedding, targets, chunk_size=chunk_size)

    np.testing.assert_allclose(
        chunked(hidden, unembedding), full(hidden, unembedding), rtol=1e-5, atol=1e-5
    )
    grads = [
        jax.jit(jax.grad(lambda h, w, f=f: jnp.sum(weights * f(h, w)), argnums=(0, 1)))(
            hidden, unembedding
        )
        for f in (full, chunked)
    ]
    for full_grad, chunked_grad in zip(*grads, strict=True):
        assert float(jnp.abs(full_grad).max()) > 0.1  # the comparison is not between zeros
        np.testing.assert_allclose(chunked_grad, full_grad, rtol=1e-5, atol=1e-5)


def test_unembedded_token_logps_values_exact_and_gradients_match_autodiff():
    # The hand-written backward against autodiff of the plain composition: same values bit for
    # bit, gradients equal to float32 rounding.
    hidden, unembedding, targets, weights = _random_hidden_problem()

    def plain(hidden, unembedding):
        return token_logps_from_logits(hidden @ unembedding, targets)

    def fused(hidden, unembedding):
        return unembedded_token_logps(hidden, unembedding, targets)

    np.testing.assert_array_equal(
        jax.jit(fused)(hidden, unembedding), jax.jit(plain)(hidden, unembedding)
    )
    grads = [
        jax.jit(jax.grad(lambda h, w, f=f: jnp.sum(weights * f(h, w)), argnums=(0, 1)))(
            hidden, unembedding
        )
        for f in (plain, fused)
    ]
    for plain_grad, fused_grad in zip(*grads, strict=True):
        assert float(jnp.abs(plain_grad).max()) > 0.1  # the comparison is not between zeros
        np.testing.assert_allclose(fused_grad, plain_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_chunked_rejects_bad_chunk_size(chunk_size):
    hidden, unembedding, targets, _ = _random_hidden_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logps(hidden, unembedding, targets, chunk_size=chunk_size)


def test_chunked_never_holds_all_logits():
    # XLA's compiled memory analysis is exact and needs no timing: the chunked forward+backward's
    # scratch memory is bounded by a few chunks of logits, the full path's by the whole [N·T, V].
    hidden = jnp.zeros((4, 256, 32))
    unembedding = jnp.zeros((32, 8192))
    targets = jnp.zeros((4, 256), jnp.int32)
    logits_bytes = 4 * 256 * 8192 * 4

    def temp_bytes(chunk_size):
        def loss(hidden, unembedding):
            if chunk_size is None:
                return jnp.sum(token_logps_from_logits(hidden @ unembedding, targets))
            return jnp.sum(chunked_token_logps(hidden, unembedding, targets, chunk_size=chunk_size))

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return step.lower(hidden, unembedding).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(None), temp_bytes(64)
    assert full >= logits_bytes, (full, logits_bytes)
    assert chunked <= 4 * 64 * 8192 * 4 + 32 * 8192 * 4, (chunked, full)


def test_segment_sums_matches_loop():
    values = jnp.arange(1.0, 11.0).reshape(2, 5)
    segment_ids = jnp.array([[1, 1, 2, 2, 0], [3, 1, 1, 0, 0]])
    # Row 0: slot 0 = 1 + 2, slot 1 = 3 + 4, padding (5) dropped. Row 1: slot 0 = 7 + 8, slot 2 = 6.
    np.testing.assert_allclose(
        segment_sums(values, segment_ids, 3), [[3.0, 7.0, 0.0], [15.0, 0.0, 6.0]]
    )
    counts = segment_sums(jnp.ones((2, 5), jnp.int32), segment_ids, 3)
    assert counts.dtype == jnp.int32
    np.testing.assert_array_equal(counts, [[2, 2, 0], [2, 0, 1]])


@pytest.mark.parametrize("logits_chunk_size", [None, 5])
def test_logprob_fn_matches_separate_forwards(logits_chunk_size):
    # One concatenated [2B, T] forward against separate chosen and rejected forwards, each scored
    # by NumPy's log-softmax and an explicit loop over tokens.
    params, batch = init_toy_params(), pack_pairs(ROWS, length=9)
    result = logprob_fn(toy_apply, params, batch, logits_chunk_size=logits_chunk_size)
    expected_logps, expected_lengths = numpy_reference(params, batch)
    assert isinstance(result, LogProbs)
    assert result.logps.shape == (2, 2, 1) and result.logps.dtype == jnp.float32
    assert result.token_logps.shape == (2, 2, 9) and result.lengths.dtype == jnp.int32
    np.testing.assert_allclose(result.logps, expected_logps, rtol=1e-5, atol=1e-5)
    # Lengths count response tokens: chosen 2 and 3, rejected 3 and 1.
    np.testing.assert_array_equal(result.lengths[..., 0], [[2, 3], [3, 1]])
    np.testing.assert_array_equal(result.lengths, expected_lengths)
    # token_logps sit at the scored tokens' own positions and sum to logps.
    np.testing.assert_array_equal(result.token_logps != 0, batch["response_mask"])
    np.testing.assert_allclose(result.token_logps.sum(-1), result.logps[..., 0], rtol=1e-6)


@pytest.mark.parametrize("logits_chunk_size", [None, 5])
def test_logprob_fn_applies_final_logit_softcapping(logits_chunk_size):
    # A soft-capped model's logits are cap·tanh(hidden @ unembedding / cap) (Gemma 2 style;
    # models.transformer.logits_from_hidden). apply_fn returns hidden states, so logprob_fn must
    # apply the cap itself: cap = 1.5 changes these log-probs by far more than the tolerance.
    params, batch = init_toy_params(), pack_pairs(ROWS, length=9)
    capped = logprob_fn(
        toy_apply,
        params,
        batch,
        logits_chunk_size=logits_chunk_size,
        final_logit_softcapping=1.5,
    )
    expected, _ = numpy_reference(params, batch, softcap=1.5)
    uncapped, _ = numpy_reference(params, batch)
    assert np.abs(expected - uncapped).max() > 0.5
    np.testing.assert_allclose(capped.logps, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="final_logit_softcapping=0.0 must be > 0"):
        logprob_fn(toy_apply, params, batch, final_logit_softcapping=0.0)


def test_logprob_fn_chunked_gradients_match_full():
    params, batch = init_toy_params(), pack_pairs(ROWS, length=9)

    def objective(params, chunk_size):
        result = logprob_fn(toy_apply, params, batch, logits_chunk_size=chunk_size)
        return jnp.sum(result.logps[:, 0] - 0.5 * result.logps[:, 1])

    gradient = jax.jit(jax.grad(objective), static_argnums=1)
    full = gradient(params, None)
    for chunk_size in (4, 7, 36):
        chunked = gradient(params, chunk_size)
        for name in params:
            assert float(jnp.abs(full[name]).max()) > 1e-3, name
            np.testing.assert_allclose(chunked[name], full[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("logits_chunk_size", [None, 4])
def test_unscored_positions_never_contribute(logits_chunk_size):
    params, batch = init_toy_params(), pack_pairs(ROWS, length=9)
    reference = logprob_fn(toy_apply, params, batch, logits_chunk_size=logits_chunk_size)

    # Hidden states at every position whose prediction is not scored (prompt positions but the
    # last, the last response token, padding) replaced with large noise: sums unchanged.
    flat = {key: batch[key].reshape(4, 9) for key in ("tokens", "response_mask", "segment_ids")}
    _, target_mask = next_token_targets(flat["tokens"], flat["response_mask"], flat["segment_ids"])
    noise = 100.0 * jax.random.normal(jax.random.key(7), (4, 9, WIDTH))

    def noisy_apply(params, tokens, positions, segment_ids):
        hidden, unembedding = toy_apply(params, tokens, positions, segment_ids)
        return jnp.where(target_mask[:, :, None], hidden, noise), unembedding

    noisy = logprob_fn(noisy_apply, params, batch, logits_chunk_size=logits_chunk_size)
    np.testing.assert_allclose(noisy.logps, reference.logps, rtol=1e-6)
    np.testing.assert_array_equal(noisy.lengths, reference.lengths)

    # Tokens changed at padding and at prompt positions other than the last (the model is
    # position-wise, so only the last prompt token's logits predict a response token).
    changed = dict(batch)
    unscored = (batch["segment_ids"] == 0) | (
        ~batch["response_mask"] & ~jnp.roll(batch["response_mask"], -1, axis=-1)
    )
    changed["tokens"] = jnp.where(unscored, (batch["tokens"] + 5) % VOCAB, batch["tokens"])
    assert not np.array_equal(changed["tokens"], batch["tokens"])
    result = logprob_fn(toy_apply, params, changed, logits_chunk_size=logits_chunk_size)
    np.testing.assert_allclose(result.logps, reference.logps, rtol=1e-6)

    # ...whereas changing one response token does change its pair's log-prob.
    changed["tokens"] = batch["tokens"].at[0, 0, 4].set((batch["tokens"][0, 0, 4] + 1) % VOCAB)
    result = logprob_fn(toy_apply, params, changed, logits_chunk_size=logits_chunk_size)
    assert abs(float(result.logps[0, 0, 0] - reference.logps[0, 0, 0])) > 1e-3


@pytest.mark.parametrize("logits_chunk_size", [None, 6])
def test_packed_pairs_equal_pairs_alone(logits_chunk_size):
    # Two pairs packed in one row give the same per-pair log-probs as each pair alone in its own
    # row. This holds here because the toy model is position-wise and positions restart in each
    # segment; with attention, keeping segments apart is the model's job (via segment_ids).
    params = init_toy_params()
    pairs = [ROWS[0][0], ROWS[1][0]]
    packed = logprob_fn(
        toy_apply, params, pack_pairs([pairs], length=16), logits_chunk_size=logits_chunk_size
    )
    alone = logprob_fn(
        toy_apply,
        params,
        pack_pairs([[pair] for pair in pairs], length=9),
        logits_chunk_size=logits_chunk_size,
    )
    assert packed.logps.shape == (1, 2, 2)
    np.testing.assert_allclose(packed.logps[0].T, alone.logps[:, :, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(packed.lengths[0].T, alone.lengths[:, :, 0])


def test_logprob_fn_rejects_bad_batch():
    params, batch = init_toy_params(), pack_pairs(ROWS, length=9)
    # pair_mask may be left out of an unpacked batch (one pair per row), not of a packed one.
    packed = pack_pairs([[ROWS[0][0], ROWS[1][0]]], length=16)
    with pytest.raises(ValueError, match=r"segment_ids'\] reaches 2 .* no 'pair_mask'"):
        logprob_fn(toy_apply, params, {k: v for k, v in packed.items() if k != "pair_mask"})
    with pytest.raises(ValueError, match="positions"):
        logprob_fn(toy_apply, params, {**batch, "positions": batch["positions"][:, :, :8]})
    with pytest.raises(ValueError, match=r"\[B, 2, T\]"):
        logprob_fn(toy_apply, params, {**batch, "tokens": batch["tokens"][:, :1]})


def _computations(hlo_text):
    """HLO module text -> {computation name: its text}."""
    computations, name = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            name = header.group(1)
            computations[name] = []
        elif name is not None:
            computations[name].append(line)
    return {key: "\n".join(lines) for key, lines in computations.items()}


def test_chunked_on_a_data_mesh_gathers_no_hidden_states():
    # On a data=8 mesh each device holds one of the 8 rows. Chunking along each row's sequence
    # keeps the batch axis sharded: no all-gather (flattening rows across the sharded axis made
    # XLA gather all hidden states and run every chunk on every device); chunk_size=32 rows per
    # device makes each chunk's dot [1 row · 32 positions, 64] @ [64, 512], and the only
    # collectives are one all-reduce of the unembedding's gradient and of the loss (one tuple),
    # outside the loop (XLA's own partitioning of the scan all-reduced [64, 512] in every trip).
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    keys = jax.random.split(jax.random.key(5), 4)
    hidden = jax.device_put(jax.random.normal(keys[0], (8, 256, 64)), rows)
    unembedding = jax.random.normal(keys[1], (64, 512)) / 8.0
    targets = jax.device_put(jax.random.randint(keys[2], (8, 256), 0, 512), rows)
    weights = jax.device_put(jax.random.normal(keys[3], (8, 256)), rows)

    def loss(hidden, unembedding, chunk_size):
        if chunk_size is None:
            logps = token_logps_from_logits(hidden @ unembedding, targets)
        else:
            logps = chunked_token_logps(
                hidden, unembedding, targets, chunk_size=chunk_size, mesh=mesh
            )
        return jnp.sum(weights * logps)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    hlo = step.lower(hidden, unembedding, 32).compile().as_text()
    assert "all-gather" not in hlo
    assert re.search(r"f32\[32,512\]\{1,0\} dot\(", hlo), "per-device chunk dot is not [32, 512]"
    bodies = re.findall(r"while\(.*body=%?([\w.\-]+)", hlo)
    assert bodies, "the chunked head has no loop"
    computations = _computations(hlo)
    for body in bodies:
        assert "all-reduce" not in computations[body], f"collective inside the loop {body}"
    all_reduces = [line for line in hlo.splitlines() if " all-reduce(" in line]
    assert len(all_reduces) == 1 and "f32[64,512]" in all_reduces[0], all_reduces

    (value, grads), (full_value, full_grads) = (
        step(hidden, unembedding, 32),
        step(hidden, unembedding, None),
    )
    np.testing.assert_allclose(value, full_value, rtol=1e-5)
    for grad, full_grad in zip(grads, full_grads, strict=True):
        assert float(jnp.abs(full_grad).max()) > 0.1
        np.testing.assert_allclose(grad, full_grad, rtol=1e-5, atol=1e-5)
