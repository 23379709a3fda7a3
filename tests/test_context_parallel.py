"""Context parallelism: rows split along T over the "sequence" mesh axis give the unsharded step.

The reference is the same loss and gradient computed with no mesh at all (one device, whole
rows). The batch is built so that every boundary case is crossed: a response that starts in one
shard and ends two shards later, packed rows whose second pair starts mid-shard, padding, and
(for Gemma 3) a sliding window of 4 over shards of 8 tokens, so local layers read keys across
the boundary.
"""

import dataclasses
import os
import re
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_models import CONFIGS  # noqa: E402
from test_train_step import build, run_steps, tiny_config  # noqa: E402

from dpo_jax import reference as reference_lib  # noqa: E402
from dpo_jax import sharding  # noqa: E402
from dpo_jax.logprobs import logprob_fn  # noqa: E402
from dpo_jax.models import ModelConfig, context_parallel, init_params, make_apply_fn  # noqa: E402
from dpo_jax.run import ppo_train, train  # noqa: E402
from dpo_jax.run import stage as stage_lib  # noqa: E402
from dpo_jax.step import LossOptions, loss_and_metrics  # noqa: E402

LENGTH = 32  # T: 4 shards of 8 tokens under sequence=4, 2 of 16 under sequence=2
# Per row, chosen and rejected: (prompt length, response length) of each packed pair.
ROWS = [
    ([(5, 15)], [(5, 9)]),  # a response over shards 0 -> 2; padding after
    ([(6, 7), (4, 10)], [(6, 3), (4, 12)]),  # packed: pair 2 starts mid-shard
    ([(7, 25)], [(3, 29)]),  # the whole row, no padding
    ([(2, 6), (9, 11)], [(2, 4), (9, 9)]),  # packed, then padding
]


def _batch(vocab_size: int) -> dict[str, np.ndarray]:
    """[B, 2, T] tokens, response_mask, positions, segment_ids and pair_mask [B, 2] of ROWS."""
    rng = np.random.default_rng(0)
    shape = (len(ROWS), 2, LENGTH)
    batch = {
        "tokens": rng.integers(1, vocab_size, shape).astype(np.int32),
        "response_mask": np.zeros(shape, bool),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "pair_mask": np.zeros((len(ROWS), 2), bool),
    }
    for b, row in enumerate(ROWS):
        for side, pairs in enumerate(row):
            start = 0
            for k, (prompt, response) in enumerate(pairs):
                end = start + prompt + response
                batch["segment_ids"][b, side, start:end] = k + 1
                batch["positions"][b, side, start:end] = np.arange(end - start)
                batch["response_mask"][b, side, start + prompt : end] = True
                batch["pair_mask"][b, k] = True
                start = end
            batch["tokens"][b, side, start:] = 0  # padding
    return batch


def _loss_and_grads(config, params, ref_params, batch, chunk):
    options = LossOptions(
        beta=0.5,
        logits_chunk_size=chunk,
        final_logit_softcapping=config.final_logit_softcapping,
    )
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
    return grad_fn(
        params,
        reference_lib.FrozenReference(ref_params),
        batch,
        None,
        apply_fn=make_apply_fn(config),
        options=options,
    )


def _policy_and_reference(config):
    ref_params = init_params(config, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(ref_params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    moved = [
        leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, moved), ref_params


def _sharded_step(config, params, ref_params, batch, chunk, mesh):
    """The same function, jitted over `mesh` with the batch placed as training places it."""
    replicated = sharding.replicated(mesh)
    shardings = sharding.batch_shardings(batch, mesh)
    placed = {key: jax.device_put(value, shardings[key]) for key, value in batch.items()}
    step = jax.jit(
        lambda p, r, b: _loss_and_grads(config, p, r, b, chunk),
        in_shardings=(replicated, replicated, shardings),
    )
    with jax.set_mesh(mesh):
        lowered = step.lower(params, ref_params, placed)
        return jax.device_get(step(params, ref_params, placed)), lowered


# Each model on both meshes, the full-logits head on one and the chunked head on the other.
@pytest.mark.parametrize(
    "name, chunk, mesh_sizes",
    [
        ("llama", None, dict(sequence=4)),
        ("llama", 16, dict(data=4, sequence=2)),
        ("gemma3", 16, dict(sequence=4)),
        ("gemma3", None, dict(data=4, sequence=2)),
    ],
)
def test_split_rows_give_the_unsharded_step(name, chunk, mesh_sizes):
    config = CONFIGS[name]
    params, ref_params = _policy_and_reference(config)
    batch = _batch(config.vocab_size)
    (loss, metrics), grads = jax.device_get(
        jax.jit(lambda p, r, b: _loss_and_grads(config, p, r, b, chunk))(params, ref_params, batch)
    )
    data, sequence = mesh_sizes.get("data", 1), mesh_sizes["sequence"]
    mesh = sharding.make_mesh(data, 1, 1, sequence=sequence, num_devices=data * sequence)
    ((split_loss, split_metrics), split_grads), _ = _sharded_step(
        config, params, ref_params, batch, chunk, mesh
    )
    assert np.isfinite(loss) and abs(float(loss) - np.log(2)) > 1e-3, "the policy has moved"
    np.testing.assert_allclose(split_loss, loss, rtol=1e-5, atol=1e-6)
    assert set(split_metrics) == set(metrics)
    for key, value in metrics.items():
        np.testing.assert_allclose(split_metrics[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    # The per-pair log-probs are in the metrics as sums; check them by pair as well.
    flat, split_flat = jax.tree.leaves(grads), jax.tree.leaves(split_grads)
    for grad, split_grad in zip(flat, split_flat, strict=True):
        scale = float(np.abs(grad).max())
        np.testing.assert_allclose(split_grad, grad, rtol=1e-4, atol=1e-5 * max(scale, 1.0))
    assert max(float(np.abs(g).max()) for g in flat) > 1e-3


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_the_zigzag_layout_and_its_inverse(shards):
    # Shard s holds row blocks s and 2C - 1 - s; to_zigzag and from_zigzag move [N, T, D] rows
    # between the two orders on the devices (one ppermute per half).
    bad = 4 * shards + 2  # two tokens over whole blocks
    with pytest.raises(ValueError, match=rf"row length {bad} must be .* 2 x .*\({2 * shards}\)"):
        context_parallel.zigzag_order(bad, shards)
    order = context_parallel.zigzag_order(64, shards)
    length, block = len(order), len(order) // (2 * shards)
    for s in range(shards):
        held = order[2 * s * block : 2 * (s + 1) * block] // block
        assert list(np.unique(held)) == [s, 2 * shards - 1 - s]
    mesh = sharding.make_mesh(8 // shards, 1, 1, sequence=shards)
    rows = np.arange(8 // shards * 2 * length * 3, dtype=np.float32).reshape(-1, length, 3)
    spec = jax.sharding.PartitionSpec(sharding.BATCH_AXES, sharding.SEQUENCE_AXIS, None)
    placed = jax.device_put(rows, jax.sharding.NamedSharding(mesh, spec))
    with jax.set_mesh(mesh):
        zigzag = jax.jit(lambda x: context_parallel.to_zigzag(x, mesh))(placed)
        back = jax.jit(lambda x: context_parallel.from_zigzag(x, mesh))(zigzag)
    np.testing.assert_array_equal(np.asarray(zigzag), rows[:, order])
    np.testing.assert_array_equal(np.asarray(back), rows)


def _logprobs(config, params, batch, chunk, mesh=None):
    fn = jax.jit(
        lambda p, b: logprob_fn(make_apply_fn(config), p, b, logits_chunk_size=chunk, mesh=mesh)
    )
    if mesh is None:
        return jax.device_get(fn(params, batch))
    shardings = sharding.batch_shardings(batch, mesh)
    placed = {key: jax.device_put(value, shardings[key]) for key, value in batch.items()}
    with jax.set_mesh(mesh):
        return jax.device_get(fn(params, placed))


@pytest.mark.parametrize("block_size", [0, 2])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_per_pair_log_probs_of_split_rows(name, block_size):
    # Each pair's summed response log-prob adds the contributions of several shards (ROWS[0]'s
    # response spans shards 0-2; ROWS[1]'s second pair starts mid-shard), and the first target
    # of each shard is the next shard's first token.
    config = CONFIGS[name]
    params, _ = _policy_and_reference(config)
    batch = _batch(config.vocab_size)
    whole = _logprobs(config, params, batch, 16)
    mesh = sharding.make_mesh(1, 1, 1, sequence=4, num_devices=4)
    # block_size=2: each shard's two zigzag blocks of 4 tokens attend in blocks of 2.
    split_config = dataclasses.replace(config, attention_block_size=block_size)
    split = _logprobs(split_config, params, batch, 16, mesh)
    np.testing.assert_array_equal(split.lengths, whole.lengths)
    np.testing.assert_allclose(split.logps, whole.logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(split.token_logps, whole.token_logps, rtol=1e-5, atol=1e-5)
    # The shard boundaries (tokens 8, 16, 24) are scored inside responses.
    scored = np.asarray(whole.token_logps != 0)
    assert scored[0, 0, [7, 15]].all() and scored[2, 1, [7, 15, 23]].all()
    assert (whole.lengths > 0).sum() == 12  # every pair of ROWS, chosen and rejected


# A model whose hidden size D (48) and row length T (64) occur in no other axis of the step, so
# a full-length activation on a device is any array with D and T, or D and N·T, in its shape.
_HLO_CONFIG = ModelConfig(
    family="llama",
    vocab_size=200,
    hidden_size=48,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
    remat=True,
)
_HLO_LENGTH, _HLO_ROWS = 64, 8  # 4 pairs: N = 8 rows of 64 tokens, 16 per shard


def test_split_step_holds_no_full_length_activation_on_any_device():
    config = _HLO_CONFIG
    params, ref_params = _policy_and_reference(config)
    rng = np.random.default_rng(0)
    shape = (_HLO_ROWS // 2, 2, _HLO_LENGTH)
    batch = {
        "tokens": rng.integers(1, config.vocab_size, shape).astype(np.int32),
        "response_mask": np.broadcast_to(np.arange(_HLO_LENGTH) >= 20, shape).copy(),
        "positions": np.broadcast_to(np.arange(_HLO_LENGTH, dtype=np.int32), shape).copy(),
        "segment_ids": np.ones(shape, np.int32),
        "pair_mask": np.ones((_HLO_ROWS // 2, 1), bool),
    }
    mesh = sharding.make_mesh(1, 1, 1, sequence=4, num_devices=4)
    _, lowered = _sharded_step(config, params, ref_params, batch, 16, mesh)
    hlo = lowered.compile().as_text()
    d, t, n = config.hidden_size, _HLO_LENGTH, _HLO_ROWS
    shapes = {tuple(map(int, dims.split(","))) for dims in re.findall(r"\[(\d+(?:,\d+)+)\]", hlo)}
    full = [s for s in shapes if d in s and (t in s or n * t in s)]
    assert not full, f"full-length activations on a device: {sorted(full)}"
    # The per-device slices are there: [N, T / 4, D] or the flat [T / 4 · N, D] of the GEMMs.
    assert (n * t // 4, d) in shapes or (n, t // 4, d) in shapes
    assert "all-gather" in hlo  # keys and values gathered along "sequence"


def test_a_row_length_that_does_not_divide_over_the_sequence_axis_is_one_line():
    mesh = sharding.make_mesh(1, 1, 1, sequence=4, num_devices=4)
    batch = _batch(256)
    batch = {k: (v[..., :30] if k in sharding.TOKEN_KEYS else v) for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"batch\['tokens'\] length=30 .* sequence axis \(8\)"):
        sharding.put_batch(batch, mesh)
    # Checked against the resolved axis before any model is built (train.make_mesh), also when
    # the axis is -1 (the rest of the devices: 4 here).
    for sequence, data in ((4, 1), (-1, 2)):
        mesh = dict(mesh__sequence=sequence, mesh__data=data, mesh__num_devices=data * 4)
        config = tiny_config(**mesh, data__max_length=18)
        train.check_config(config)
        with pytest.raises(ValueError, match=r"max_length=18 tokens a row .* 2 x .* \(8\)"):
            train.make_mesh(config)
        config = tiny_config(**mesh, data__max_length=24, model__attention_block_size=2)
        with pytest.raises(ValueError, match=r"attention_block_size=2 must divide the 3 tokens"):
            train.make_mesh(config)


def test_ppo_with_a_sequence_axis_is_one_line():
    config = tiny_config(mesh__sequence=2, mesh__num_devices=2, mesh__data=1)
    config.ppo.true_reward = "synthetic_digits"
    with pytest.raises(ValueError, match=r"mesh.sequence=2: PPO does not split rows"):
        ppo_train.check_reward_source(config)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_a_sequence_axis_with_an_attention_it_does_not_support_is_one_line(impl):
    config = tiny_config(mesh__sequence=2, model__attention_impl=impl)
    with pytest.raises(ValueError, match=rf"sequence=2 with .*attention_impl='{impl}'.* 'xla'"):
        train.check_config(config)


# Training with the sequence axis composed with the run's other parts: packing, gradient
# accumulation, the precomputed and the cached reference, LoRA. AdamW's eps is raised as in
# tests/test_train_step.py (eps = 1e-8 turns rounding-level gradients into ±lr updates).
COMPOSED = {
    "packed_accumulated": dict(
        data__pairs_per_row=2, data__max_length=36, data__batch_size=16,
        optimizer__grad_accum_steps=2, mesh__sequence=2, mesh__data=2,
    ),
    "precomputed": dict(dpo__reference="precomputed", data__max_length=24, mesh__sequence=4),
    "cached": dict(dpo__reference="cached", data__max_length=24, mesh__sequence=4, mesh__data=2),
    "lora": dict(
        lora__rank=4, lora__alpha=8.0, dpo__reference="adapters_off", data__max_length=24,
        optimizer__learning_rate=3e-2,  # adapters start at B = 0: a larger rate moves them
        mesh__sequence=4, mesh__data=2,
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPOSED))
def test_training_with_split_rows_gives_the_one_device_run(tmp_path, name):
    histories = {}
    for devices in ("one", "split"):
        changes = dict(COMPOSED[name], optimizer__eps=1e-3)
        if devices == "one":
            changes = {k: v for k, v in changes.items() if not k.startswith("mesh__")}
        config = tiny_config(**changes, mesh__num_devices=1 if devices == "one" else -1)
        if devices == "split":
            config.mesh.data = config.mesh.data if "mesh__data" in changes else 1
            config.mesh.num_devices = config.mesh.data * config.mesh.sequence
        ctx, stage, params = build(config, tmp_path / devices)
        assert sharding.sequence_shards(ctx.mesh) == (
            1 if devices == "one" else config.mesh.sequence
        )
        _, histories[devices] = run_steps(stage, ctx, params, num_steps=3)
    for one, split in zip(histories["one"], histories["split"], strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            np.testing.assert_allclose(split[key], one[key], rtol=2e-5, atol=1e-6, err_msg=key)
    assert abs(histories["one"][-1]["loss"] - np.log(2)) > 1e-3


@pytest.mark.slow
def test_a_run_on_split_rows_resumes_on_another_mesh(tmp_path):
    def config(num_steps, **mesh):
        config = tiny_config(
            data__max_length=24, checkpoint__every_steps=2, checkpoint__keep=1,
            optimizer__eps=1e-3, mesh__num_devices=-1, dpo__num_steps=num_steps, **mesh,
        )  # fmt: skip
        config.mesh.num_devices = config.mesh.data * config.mesh.sequence
        return config

    split = dict(mesh__data=2, mesh__sequence=4)
    ctx, straight, params = build(config(4, **split), tmp_path / "straight")
    _, history_straight = stage_lib.run_stage(straight, params, ctx)
    ctx, first, params = build(config(2, **split), tmp_path / "moved")
    stage_lib.run_stage(first, params, ctx)
    # Resumed with whole rows on 4 devices (data only), then the check is the same metrics.
    ctx, second, params = build(config(4, mesh__data=4, mesh__sequence=1), tmp_path / "moved")
    assert sharding.sequence_shards(ctx.mesh) == 1
    _, history = stage_lib.run_stage(second, params, ctx)
    assert [m["step"] for m in history] == [3, 4]
    for got, want in zip(history, history_straight[2:], strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=key)
