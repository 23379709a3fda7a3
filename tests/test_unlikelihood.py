"""Unlikelihood (the DPO paper's baseline): its per-token sum and the step's loss against NumPy
computed from the model's logits, its numerics at π → 1, and training on the synthetic task."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from test_train_step import build, run_steps, tiny_config

from dpo_jax import reference as reference_lib
from dpo_jax import step as step_lib
from dpo_jax.logprobs import logprob_fn
from dpo_jax.losses import UNLIKELIHOOD_FLOOR, dpo_loss_fn, sequence_log_unlikelihoods


def np_log_unlikelihood(logp):
    """log max(1 − e^logp, 1e-5), float64: the per-token term as the docstring defines it."""
    return np.log(np.maximum(1.0 - np.exp(logp), UNLIKELIHOOD_FLOOR))


def test_sequence_sums_match_numpy_on_packed_rows():
    rng = np.random.default_rng(0)
    token_logps = -rng.exponential(1.0, (2, 2, 7))
    token_logps[0, 0, 2] = 0.0  # π = 1: the floor
    token_logps[1, 1, 4] = -1e-9  # π just below 1: the floor too
    scored = rng.uniform(size=(2, 2, 7)) < 0.7
    scored[0, 0, 2] = scored[1, 1, 4] = True
    segment_ids = np.array([1, 1, 1, 2, 2, 2, 0])[None, None, :].repeat(2, 0).repeat(2, 1)
    got = sequence_log_unlikelihoods(
        jnp.asarray(np.where(scored, token_logps, 0.0), jnp.float32),
        jnp.asarray(scored),
        jnp.asarray(segment_ids, jnp.int32),
        num_segments=2,
    )
    expected = np.zeros((2, 2, 2))
    for b, side, t in np.ndindex(2, 2, 7):
        if scored[b, side, t] and segment_ids[b, side, t] > 0:
            slot = segment_ids[b, side, t] - 1
            expected[b, side, slot] += np_log_unlikelihood(token_logps[b, side, t])
    assert got.shape == (2, 2, 2) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_token_the_policy_is_sure_of_is_floored_with_a_finite_gradient():
    # π(y_t) = 1, 1 − 1e-9 and e^−30: the first two floor at log 1e-5, the last is −e^−30.
    logps = jnp.array([[[0.0, -1e-9, -30.0]]] * 2, jnp.float32).reshape(1, 2, 3)
    scored = jnp.ones((1, 2, 3), bool)
    ids = jnp.ones((1, 2, 3), jnp.int32)

    def total(x):
        return sequence_log_unlikelihoods(x, scored, ids, 1).sum()

    value = float(total(logps)) / 2
    np.testing.assert_allclose(value, 2 * math.log(UNLIKELIHOOD_FLOOR) - math.exp(-30), rtol=1e-6)
    grad = jax.grad(total)(logps)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[..., :2], 0.0)  # floored: no gradient
    np.testing.assert_allclose(grad[..., 2], -math.exp(-30), rtol=1e-4)  # d/da log(1 − e^a)


def test_loss_is_nll_of_chosen_minus_alpha_times_rejected_unlikelihood():
    chosen = jnp.array([-3.0, -10.0, -0.5])
    unlikely = jnp.array([-0.2, -4.0, -11.0])
    loss, metrics = dpo_loss_fn(
        chosen,
        chosen - 1.0,
        beta=0.1,
        loss_type="unlikelihood",
        rejected_unlikelihoods=unlikely,
        unlikelihood_alpha=0.5,
    )
    # Per pair −log π(y_w) − α·Σ log(1 − π): 3 + 0.1, 10 + 2, 0.5 + 5.5; y_l's log-prob unread.
    np.testing.assert_allclose(loss, np.mean([3.1, 12.0, 6.0]), rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/unlikelihood"], loss)


def _np_step_loss(hidden, unembedding, batch, alpha):
    """The step's unlikelihood loss from the model's final hidden states, in float64 NumPy:
    log-softmax of the logits, the shift by one, the response mask and the segments by hand."""
    logits = np.einsum("ntd,dv->ntv", hidden, unembedding)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # [2B, T, V]
    size, _, length = batch["tokens"].shape
    rows = {k: np.asarray(batch[k]).reshape(2 * size, length) for k in batch if k != "pair_mask"}
    num_slots = batch["pair_mask"].shape[1]
    sums = np.zeros((2 * size, num_slots, 2))  # [row, slot, (log π, Σ log(1 − π))]
    for row, t in np.ndindex(2 * size, length):
        segment = rows["segment_ids"][row, t]
        if t == 0 or segment == 0 or not rows["response_mask"][row, t]:
            continue
        if rows["segment_ids"][row, t - 1] != segment:
            continue  # a response token opening its segment has no prediction
        logp = log_probs[row, t - 1, rows["tokens"][row, t]]
        sums[row, segment - 1] += (logp, np_log_unlikelihood(logp))
    sums = sums.reshape(size, 2, num_slots, 2)
    per_pair = -sums[:, 0, :, 0] - alpha * sums[:, 1, :, 1]  # [B, S]
    mask = np.asarray(batch["pair_mask"])
    return per_pair[mask].mean()


def test_step_loss_matches_numpy_from_the_model_logits(tmp_path):
    # Packed rows (two pairs a row), so the per-segment sums and the boundaries are exercised.
    config = tiny_config(
        dpo__loss_type="unlikelihood",
        dpo__unlikelihood_alpha=0.7,
        data__pairs_per_row=2,
        data__max_length=36,
    )
    ctx, stage, params = build(config, tmp_path)
    assert isinstance(stage.reference, reference_lib.NoReference)  # reads no reference
    assert stage.options.per_pair_inputs == ("rejected_unlikelihoods",)
    batch = next(stage.train_batches)
    assert batch["pair_mask"].shape[1] == 2 and batch["pair_mask"][:, 1].any()
    loss, metrics = step_lib.loss_and_metrics(
        params, stage.reference, batch, None, apply_fn=ctx.apply_fn, options=stage.options
    )
    size, _, length = batch["tokens"].shape
    hidden, unembedding = ctx.apply_fn(
        params,
        *(batch[k].reshape(2 * size, length) for k in ("tokens", "positions", "segment_ids")),
    )
    expected = _np_step_loss(
        np.asarray(hidden, np.float64), np.asarray(unembedding, np.float64), batch, 0.7
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/unlikelihood"], expected, rtol=1e-5)


def _mean_logps(ctx, params, batch) -> tuple[float, float]:
    """Mean log π(y_w) and log π(y_l) per pair of a batch."""
    logps = np.asarray(logprob_fn(ctx.apply_fn, params, batch).logps)  # [B, 2, S]
    mask = np.asarray(batch["pair_mask"])
    return float(logps[:, 0][mask].mean()), float(logps[:, 1][mask].mean())


def test_training_from_sft_raises_chosen_and_lowers_rejected_log_probs(tmp_path):
    # As the DPO paper starts every method: from a model fine-tuned on the chosen answers (48
    # steps of "sft"), 24 steps of unlikelihood (α = 1) over the same 64 pairs. Measured on a
    # batch of those pairs: log π(y_w) −10.09 → −9.15, log π(y_l) −14.17 → −14.86; 24 more
    # steps of sft alone raise both instead (−7.57, −13.31). On held-out pairs both fall
    # (y_w −11.8 → −13.0): y_l shares all but 1-2 digits with y_w, and the two terms pull the
    # shared tokens' probability in opposite directions.
    model = dict(model__hidden_size=64, model__num_layers=2, optimizer__learning_rate=3e-3)
    ctx, sft_stage, params = build(tiny_config(dpo__loss_type="sft", **model), tmp_path / "sft")
    trained_pairs = next(sft_stage.train_batches)
    sft_state, _ = run_steps(sft_stage, ctx, params, num_steps=48)
    start = jax.device_get(sft_state.params)
    chosen_before, rejected_before = _mean_logps(ctx, start, trained_pairs)
    config = tiny_config(dpo__loss_type="unlikelihood", **model)
    ctx, stage, _ = build(config, tmp_path / "unlikelihood")
    state, history = run_steps(stage, ctx, jax.tree.map(jnp.asarray, start), num_steps=24)
    chosen_after, rejected_after = _mean_logps(ctx, state.params, trained_pairs)
    assert all(np.isfinite(m["loss"]) and not m["nonfinite"] for m in history)
    assert chosen_after > chosen_before + 0.3, (chosen_before, chosen_after)
    assert rejected_after < rejected_before - 0.3, (rejected_before, rejected_after)
