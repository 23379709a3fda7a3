"""The jitted DPO/SFT step: sharded == one device, a frozen reference, precomputed reference
log-probs, gradient accumulation and TR-DPO sync, all through the step that training runs."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from dpo_jax import reference as reference_lib
from dpo_jax.logprobs import logprob_fn
from dpo_jax.run import stage as stage_lib
from dpo_jax.run import train

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"


def tiny_config(**changes):
    """configs/default.py:tiny on one device with `group__field=value` changes (warmup off, so
    the first step already moves the policy)."""
    spec = importlib.util.spec_from_file_location("default_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.optimizer.warmup_steps = 0
    config.sft.warmup_steps = 0
    config.optimizer.decay = "constant"
    config.optimizer.learning_rate = 1e-3
    config.mesh.num_devices = 1
    for dotted, value in changes.items():
        group, key = dotted.split("__")
        config[group][key] = value
    return config


def build(config, workdir):
    """(ctx, DPO stage, initial params) as train_and_evaluate builds them; the reference is the
    initial model (no SFT)."""
    train.check_config(config)
    mesh = train.make_mesh(config)
    tokenizer, model_config, loaded = train.load_model(config, str(workdir))
    ctx = train.make_context(config, mesh, model_config, str(workdir))
    params = train.initial_params(model_config, loaded, ctx, config.seed)
    sources = train.data_sources(config)
    stage = train.make_dpo_stage(config, tokenizer, ctx, sources, params, counts={})
    return ctx, stage, params


def run_steps(stage, ctx, params, num_steps):
    """Runs `num_steps` updates of the stage's compiled step; returns (state, host metrics)."""
    state = stage_lib.init_state(stage, params, ctx)
    rng = jax.random.key(0)
    update, history = None, []
    for _ in range(num_steps):
        host_batch = next(stage.train_batches)
        if update is None:
            update = stage_lib.compile_update(
                stage, ctx, stage_lib.state_shardings_of(state), host_batch
            )
        batch = train.sharding.put_batch(host_batch, ctx.mesh)
        state, metrics = update(state, stage.reference, batch, rng)
        history.append(jax.device_get(metrics))
    return state, history


def test_eight_devices_data_and_fsdp_match_one_device(tmp_path):
    # Float32 throughout; only the order of the reductions differs (the batch and the embed axis
    # are split 8 ways). AdamW's eps is raised to 1e-3 here: with eps = 1e-8 its first update is
    # lr·sign(g), which turns a rounding-level gradient (|g| ~ 1e-9) into a ±lr difference; with
    # eps = 1e-3 the update is smooth in g and the comparison measures the step, not the sign.
    results = {}
    for name, mesh in {"one": dict(num_devices=1), "eight": dict(data=2, fsdp=4)}.items():
        config = tiny_config(optimizer__eps=1e-3, mesh__num_devices=-1)
        for key, value in mesh.items():
            config.mesh[key] = value
        ctx, stage, params = build(config, tmp_path / name)
        assert ctx.mesh.devices.size == (1 if name == "one" else 8)
        reference = jax.device_get(stage.reference.params)
        state, history = run_steps(stage, ctx, params, num_steps=3)
        assert_reference_frozen(stage, state, reference)
        results[name] = (jax.device_get(state.params), history)
    params_one, history_one = results["one"]
    params_eight, history_eight = results["eight"]
    for metrics_one, metrics_eight in zip(history_one, history_eight, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            np.testing.assert_allclose(metrics_eight[key], metrics_one[key], rtol=1e-5, atol=1e-6)
    # The loss moved (not a trivially equal log 2 at every step).
    assert abs(history_one[-1]["loss"] - np.log(2)) > 1e-3
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        params_eight,
        params_one,
    )


def assert_reference_frozen(stage, state, reference):
    """The reference is alive (not donated), bit-identical, and has no optimizer state."""
    assert isinstance(stage.reference, reference_lib.FrozenReference)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(stage.reference.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(stage.reference.params), reference)
    moved = jax.tree.map(lambda a, b: np.any(a != b), jax.device_get(state.params), reference)
    assert any(jax.tree.leaves(moved)), "the policy should have moved"
    # AdamW keeps mu and nu for the policy only: 2 x its params, plus scalar counts.
    num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    opt_sizes = [leaf.size for leaf in jax.tree.leaves(state.opt_state)]
    assert sum(size for size in opt_sizes if size > 1) == 2 * num_params
    assert state.reference_params is None


def test_precomputed_reference_logps_give_the_in_step_loss(tmp_path):
    in_step = tiny_config()
    precomputed = tiny_config(dpo__reference="precomputed")
    ctx, stage_a, params = build(in_step, tmp_path / "a")
    _, history_a = run_steps(stage_a, ctx, params, num_steps=2)
    ctx_b, stage_b, params_b = build(precomputed, tmp_path / "b")
    assert isinstance(stage_b.reference, reference_lib.PrecomputedReference)
    assert "ref_logps" in stage_b.eval_batches[0]
    _, history_b = run_steps(stage_b, ctx_b, params_b, num_steps=2)
    for metrics_a, metrics_b in zip(history_a, history_b, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
            np.testing.assert_allclose(metrics_b[key], metrics_a[key], rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    results = {}
    for steps in (1, 2):
        # Two devices on the batch axis: each micro-batch is split over both.
        config = tiny_config(optimizer__grad_accum_steps=steps, optimizer__eps=1e-3)
        config.mesh.num_devices = 2
        ctx, stage, params = build(config, tmp_path / str(steps))
        state, history = run_steps(stage, ctx, params, num_steps=2)
        results[steps] = (jax.device_get(state.params), history)
    for metrics_one, metrics_two in zip(results[1][1], results[2][1], strict=True):
        for key in ("loss", "rewards/margins", "grad_norm", "num_pairs"):
            np.testing.assert_allclose(metrics_two[key], metrics_one[key], rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        results[2][0],
        results[1][0],
    )


def test_tr_dpo_soft_update_of_the_reference(tmp_path):
    alpha = 0.25
    config = tiny_config(dpo__reference="moving", dpo__ref_sync_every=2, dpo__ref_sync_alpha=alpha)
    ctx, stage, params = build(config, tmp_path)
    assert stage.reference == reference_lib.MovingReference(sync_every=2, alpha=alpha)
    initial = jax.device_get(params)
    state = stage_lib.init_state(stage, params, ctx)
    batch = next(stage.train_batches)
    update = stage_lib.compile_update(stage, ctx, stage_lib.state_shardings_of(state), batch)
    rng = jax.random.key(0)
    state, _ = update(state, stage.reference, train.sharding.put_batch(batch, ctx.mesh), rng)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.reference_params), initial)
    state, _ = update(state, stage.reference, train.sharding.put_batch(batch, ctx.mesh), rng)
    policy = jax.device_get(state.params)  # after step 2, when the sync is due
    expected = jax.tree.map(lambda p, r: alpha * p + (1 - alpha) * r, policy, initial)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        jax.device_get(state.reference_params),
        expected,
    )


def test_eval_fn_with_the_policy_as_its_own_reference(tmp_path):
    ctx, stage, params = build(tiny_config(), tmp_path)
    batch = stage.eval_batches[0]
    placed = train.sharding.put_batch(batch, ctx.mesh)
    evaluate = stage_lib.compile_eval(stage, ctx, batch)
    metrics = jax.device_get(evaluate(params, stage.reference, None, placed))
    # Policy == reference: every reward is 0 and the loss is log 2.
    np.testing.assert_allclose(metrics["loss"], np.log(2), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], 0.0, atol=1e-6)
    logps = jax.device_get(logprob_fn(ctx.apply_fn, params, placed)).logps
    mask = batch["pair_mask"]
    np.testing.assert_allclose(metrics["logps/chosen"], logps[:, 0][mask].mean(), rtol=1e-6)
    expected_accuracy = np.mean(logps[:, 0][mask] > logps[:, 1][mask])
    np.testing.assert_allclose(metrics["logps/accuracies"], expected_accuracy)
    assert metrics["num_pairs"] == mask.sum()


def test_sft_loss_is_the_nll_per_chosen_token(tmp_path):
    config = tiny_config()
    ctx, _, params = build(config, tmp_path)
    tokenizer = train.synthetic.make_tokenizer()
    stage = train.make_sft_stage(config, tokenizer, ctx, train.data_sources(config), counts={})
    assert isinstance(stage.reference, reference_lib.NoReference)
    batch = stage.eval_batches[0]
    placed = train.sharding.put_batch(batch, ctx.mesh)
    evaluate = stage_lib.compile_eval(stage, ctx, batch)
    metrics = jax.device_get(evaluate(params, stage.reference, None, placed))
    logps = jax.device_get(logprob_fn(ctx.apply_fn, params, placed))
    mask = batch["pair_mask"]
    expected = -logps.logps[:, 0][mask].sum() / logps.lengths[:, 0][mask].sum()
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)
    # A random model over V tokens: about log V nats per token.
    assert abs(metrics["loss"] - np.log(tokenizer.vocab_size)) < 0.5


@pytest.mark.parametrize("loss_type", ["simpo", "bco_pair"])
def test_reference_free_and_stateful_losses_run_through_the_step(tmp_path, loss_type):
    config = tiny_config(dpo__loss_type=loss_type)
    ctx, stage, params = build(config, tmp_path)
    expected = reference_lib.NoReference if loss_type == "simpo" else reference_lib.FrozenReference
    assert isinstance(stage.reference, expected)
    state, history = run_steps(stage, ctx, params, num_steps=2)
    assert all(np.isfinite(m["loss"]) for m in history)
    if loss_type == "bco_pair":
        assert float(state.running["bco_running_count"]) == 2.0
