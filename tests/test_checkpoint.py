"""Checkpoints: an interrupted and resumed stage continues exactly (params and data order), and the
exported policy loads back as a Hugging Face model directory."""

import os

import jax
import numpy as np
from test_train_step import build, tiny_config

from dpo_jax.models import load_hf
from dpo_jax.run import checkpoint, train
from dpo_jax.run import stage as stage_lib


def test_resume_continues_exactly_and_export_loads_back(tmp_path):
    config = tiny_config(checkpoint__every_steps=2, checkpoint__keep=1)

    ctx, straight, params = build(config, tmp_path / "straight")
    straight.num_steps = 4
    state_straight, history_straight = stage_lib.run_stage(straight, params, ctx)

    ctx, first_half, params = build(config, tmp_path / "resumed")
    first_half.num_steps = 2
    stage_lib.run_stage(first_half, params, ctx)
    saved = os.listdir(tmp_path / "resumed" / "dpo" / "checkpoints")
    assert saved == ["2"]
    # A fresh build in the same workdir, as a restarted job does: resumes at step 2.
    ctx, second_half, params = build(config, tmp_path / "resumed")
    second_half.num_steps = 4
    state_resumed, history_resumed = stage_lib.run_stage(second_half, params, ctx)

    assert [m["step"] for m in history_resumed] == [3, 4]
    for resumed, straight_metrics in zip(history_resumed, history_straight[2:], strict=True):
        assert resumed["loss"] == straight_metrics["loss"]
        assert resumed["logps/chosen"] == straight_metrics["logps/chosen"]
    # Same compiled step, same inputs: bit-identical params, optimizer state and step.
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(state_resumed), jax.device_get(state_straight)
    )
    # The data iterators stand at the same place: the next batches are the same.
    next_straight, next_resumed = next(straight.train_batches), next(second_half.train_batches)
    for key in next_straight:
        np.testing.assert_array_equal(next_resumed[key], next_straight[key])
    # Checkpoints hold no frozen reference.
    assert state_resumed.reference_params is None

    export_dir = tmp_path / "hf"
    model_config = train.load_model(config, str(tmp_path))[1]
    checkpoint.export_hf(str(export_dir), model_config, state_resumed.params)
    loaded_config, loaded_params = load_hf(str(export_dir))
    assert loaded_config.hidden_size == config.model.hidden_size
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(loaded_params),
        jax.device_get(state_resumed.params),
    )
