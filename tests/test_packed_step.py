"""Packed equals padded through the real step: the same pairs, one per row or three to a row,
give the same per-pair log-probs, loss, metrics and gradients from the training step itself."""

import dataclasses
import os
import sys

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_train_step import build, tiny_config  # noqa: E402

from dpo_jax.data import synthetic  # noqa: E402
from dpo_jax.data.batching import collate_rows  # noqa: E402
from dpo_jax.data.pipeline import make_rows, tokenize_source  # noqa: E402
from dpo_jax.logprobs import logprob_fn  # noqa: E402
from dpo_jax.run import stage as stage_lib  # noqa: E402
from dpo_jax.run import train  # noqa: E402

PADDED_LENGTH = 18  # T of one pair per row (the tiny config's max_length)
PACKED_LENGTH = 40  # T of a packed row: up to 3 of these pairs


def _batches(pairs_per_row):
    """(padded batch, packed batch, where each padded pair i sits in the packed one: (b, k))."""
    records = synthetic.make_records(12, seed=3, split="train")
    pairs, _ = tokenize_source(records, synthetic.make_tokenizer(), max_length=PADDED_LENGTH)
    lengths = sorted({pair.lengths for pair in pairs})
    assert len(lengths) >= 4, f"the pairs should vary in length, found {lengths}"
    pad_id = synthetic.make_tokenizer().pad_id
    padded = collate_rows(
        [[pair] for pair in pairs],
        num_rows=len(pairs),
        max_length=PADDED_LENGTH,
        pairs_per_row=1,
        pad_id=pad_id,
    )
    rows = make_rows(
        pairs, max_length=PACKED_LENGTH, pairs_per_row=pairs_per_row, seed=0, shuffle=True
    )
    assert len(rows) < len(pairs) and max(map(len, rows)) == pairs_per_row
    packed = collate_rows(
        rows,
        num_rows=len(rows),
        max_length=PACKED_LENGTH,
        pairs_per_row=pairs_per_row,
        pad_id=pad_id,
    )
    index = {id(pair): i for i, pair in enumerate(pairs)}
    where = {index[id(pair)]: (b, k) for b, row in enumerate(rows) for k, pair in enumerate(row)}
    return padded, packed, [where[i] for i in range(len(pairs))]


def _step(stage, ctx, params, policy, host_batch):
    """One real update (update_fn, compiled as training compiles it) with SGD at rate 1, so
    the change of the params is minus the gradient."""
    stage = dataclasses.replace(stage, tx=optax.sgd(1.0))
    state = stage_lib.init_state(stage, params, ctx)
    placed = jax.tree.map(lambda p, old: jax.device_put(p, old.sharding), policy, state.params)
    state = state.replace(params=placed)
    update = stage_lib.compile_update(stage, ctx, stage_lib.state_shardings_of(state), host_batch)
    batch = train.sharding.put_batch(host_batch, ctx.mesh)
    new_state, metrics = update(state, stage.reference, batch, jax.random.key(0))
    grads = jax.tree.map(lambda old, new: old - new, policy, jax.device_get(new_state.params))
    return jax.device_get(metrics), grads


@pytest.mark.parametrize("pairs_per_row", [2, 3])
def test_packed_pairs_equal_padded_pairs_through_the_real_step(tmp_path, pairs_per_row):
    config = tiny_config()
    ctx, stage, params = build(config, tmp_path)
    # The policy moved away from the reference (the initial params), so the rewards, margins
    # and the loss's gradient all depend on the log-probs being right.
    leaves, treedef = jax.tree.flatten(jax.device_get(params))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    policy = jax.tree.unflatten(
        treedef,
        [
            leaf + 0.2 * np.asarray(jax.random.normal(k, leaf.shape))
            for leaf, k in zip(leaves, keys, strict=True)
        ],
    )
    padded, packed, where = _batches(pairs_per_row)
    rows, slots = np.array(where).T

    alone = logprob_fn(ctx.apply_fn, policy, padded).logps[:, :, 0]  # [N, 2]
    together = logprob_fn(ctx.apply_fn, policy, packed).logps[rows, :, slots]  # [N, 2]
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert np.ptp(np.asarray(alone)) > 1.0  # the pairs' log-probs differ: the map is checked

    padded_metrics, padded_grads = _step(stage, ctx, params, policy, padded)
    packed_metrics, packed_grads = _step(stage, ctx, params, policy, packed)
    assert padded_metrics["num_pairs"] == packed_metrics["num_pairs"] == len(where)
    assert abs(padded_metrics["loss"] - np.log(2)) > 1e-3  # the policy is not the reference
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(
            packed_metrics[name], padded_metrics[name], rtol=1e-5, err_msg=name
        )
    # Packing puts fewer, longer rows through the model: the same real tokens either way.
    assert packed_metrics["num_tokens"] == padded_metrics["num_tokens"]
    assert padded_metrics["grad_norm"] > 0.1
    np.testing.assert_allclose(packed_metrics["grad_norm"], padded_metrics["grad_norm"], rtol=1e-5)
    for (path, packed_grad), padded_grad in zip(
        jax.tree_util.tree_leaves_with_path(packed_grads),
        jax.tree.leaves(padded_grads),
        strict=True,
    ):
        scale = np.abs(padded_grad).max()
        np.testing.assert_allclose(
            packed_grad, padded_grad, atol=1e-5 * scale + 1e-7, err_msg=jax.tree_util.keystr(path)
        )
