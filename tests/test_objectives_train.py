"""The new objectives through training's own stage and step: reference-free ones hold no
reference params, and every loss option of config.dpo reaches the loss."""

import jax
import numpy as np
import pytest
from test_train_step import build, run_steps, tiny_config

from dpo_jax import reference as reference_lib
from dpo_jax.losses import LOSS_VARIANTS
from dpo_jax.run import train


# simpo alone: tests/test_train_step.py.
@pytest.mark.parametrize("loss_type", ["orpo,sft", "cpo,sft"])
def test_reference_free_objectives_hold_no_reference_params(tmp_path, loss_type):
    config = tiny_config(dpo__loss_type=loss_type)
    ctx, stage, params = build(config, tmp_path)
    assert isinstance(stage.reference, reference_lib.NoReference)
    assert not reference_lib.holds_params(stage.reference)
    assert jax.tree.leaves(stage.reference) == []  # no array of any kind
    state, history = run_steps(stage, ctx, params, num_steps=2)
    assert state.reference_params is None
    assert all(np.isfinite(m["loss"]) for m in history)
    names = loss_type.split(",")
    assert all(not LOSS_VARIANTS[name].reads_reference for name in names)


@pytest.mark.parametrize(
    "changes",
    [
        dict(dpo__f_divergence_type="alpha_divergence", dpo__f_alpha_divergence_coef=0.5),
        dict(dpo__loss_type="bco_pair", dpo__bco_reward_shift="none"),
    ],
    ids=["alpha", "bco_none"],
)
def test_loss_options_reach_the_step(tmp_path, changes):
    config = tiny_config(**changes)
    ctx, stage, params = build(config, tmp_path)
    for key, value in changes.items():
        field = key.split("__")[1]
        expected = tuple(value.split(",")) if field == "loss_type" else value
        assert getattr(stage.options, field) == expected
    state, history = run_steps(stage, ctx, params, num_steps=1)
    assert np.isfinite(history[0]["loss"])
    # Before any update π = π_ref: every f-divergence score margin is 0, so sigmoid gives ln 2.
    if config.dpo.loss_type == "sigmoid":
        np.testing.assert_allclose(history[0]["loss"], np.log(2.0), rtol=1e-6)
    if "dpo__bco_reward_shift" in changes:
        assert "bco/running_mean" not in history[0]


def test_kto_trains_on_unpaired_records_through_the_stage(tmp_path):
    # Each synthetic pair becomes a desirable and an undesirable record (2 × 64 here); the batch
    # carries their labels. Before any update π = π_ref and z₀ = 0: every term is 1 − σ(0).
    config = tiny_config(dpo__loss_type="kto")
    ctx, stage, params = build(config, tmp_path)
    assert isinstance(stage.reference, reference_lib.FrozenReference)
    batch = next(stage.train_batches)
    assert batch["kto_labels"].shape == batch["pair_mask"].shape
    assert 0 < batch["kto_labels"].sum() < batch["pair_mask"].sum()
    state, history = run_steps(stage, ctx, params, num_steps=2)
    np.testing.assert_allclose(history[0]["loss"], 0.5, rtol=1e-6)
    assert history[0]["kl"] == 0.0 and np.isfinite(history[1]["loss"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(data__boundary="merged"), "config.data: boundary='merged' must be one of"),
        (dict(dpo__f_divergence_type="kl"), "f_divergence_type='kl' is not one of"),
        (
            dict(dpo__f_divergence_type="alpha_divergence", dpo__f_alpha_divergence_coef=0.0),
            "f_alpha_divergence_coef=0.0 must be > 0",
        ),
        (dict(dpo__loss_type="exo_pair"), "label_smoothing=0.0 must be in (0, 0.5]"),
        (dict(dpo__loss_type="kto", dpo__kto_desirable_weight=-1.0), "desirable_weight=-1.0"),
    ],
)
def test_bad_loss_and_data_settings_are_refused_before_anything_is_built(changes, message):
    with pytest.raises(ValueError) as error:
        train.check_config(tiny_config(**changes))
    assert message in str(error.value) and "config." in str(error.value)


def test_wpo_weighting_reaches_the_step_and_refuses_aot(tmp_path):
    config = tiny_config(dpo__use_weighting=True)
    ctx, stage, params = build(config, tmp_path)
    assert stage.options.use_weighting
    _, history = run_steps(stage, ctx, params, num_steps=1)
    assert np.isfinite(history[0]["loss"])
    with pytest.raises(ValueError, match="wpo_log_weights with loss_type=\\['aot'\\]"):
        train.check_config(tiny_config(dpo__use_weighting=True, dpo__loss_type="aot"))
