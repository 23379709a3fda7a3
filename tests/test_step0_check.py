"""The step-0 check: a DPO stage's first step must find the policy equal to its reference."""

import jax
import jax.numpy as jnp
import pytest
from test_train_step import build, tiny_config

from dpo_jax import reference as reference_lib
from dpo_jax.run import errors, train
from dpo_jax.run import stage as stage_lib


def test_the_default_config_passes_with_a_zero_gap(tmp_path):
    ctx, stage, params = build(tiny_config(), tmp_path)
    assert ctx.step0_tolerance == train.STEP0_TOLERANCE["float32"]
    _, history = stage_lib.run_stage(stage, params, ctx)
    assert history[0]["logps/ref_abs_diff"] <= 1e-6 * abs(history[0]["logps/chosen"])
    assert abs(history[0]["rewards/margins"]) < 1e-6


@pytest.mark.parametrize("how", ["another model", "bfloat16 reference params"])
def test_a_reference_that_is_not_the_starting_policy_stops_the_run(tmp_path, how):
    config = tiny_config()
    ctx, stage, params = build(config, tmp_path)
    if how == "another model":  # a different initialisation of the same architecture
        model_config = train.load_model(config, str(tmp_path))[1]
        other = train.initial_params(model_config, None, ctx, seed=config.seed + 1)
    else:  # the same weights stored in bfloat16: the reference forward sees rounded weights
        # (scaled up, so that this random model's log-probs depend on them as a trained one's do)
        params = jax.tree.map(lambda p: 30.0 * p, params)
        other = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    stage.reference = reference_lib.FrozenReference(other)
    with pytest.raises(errors.ReferenceMismatch, match=r"step 1: the policy is not its reference"):
        stage_lib.run_stage(stage, params, ctx)


def test_the_check_can_be_turned_off(tmp_path):
    config = tiny_config(guards__check_step0=False)
    ctx, stage, params = build(config, tmp_path)
    assert ctx.step0_tolerance is None
    other = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    stage.reference = reference_lib.FrozenReference(other)
    stage_lib.run_stage(stage, params, ctx)  # no error: the user turned it off
