"""A run checkpointed on 8 devices resumes on 4, and one on 4 resumes on 8: the same data order
and the same metrics (to float32 reduction-order tolerance) as an uninterrupted run."""

import jax
import numpy as np
import pytest
from test_train_step import build, tiny_config

from dpo_jax.run import stage as stage_lib


def _config(num_devices: int, num_steps: int):
    # AdamW's eps raised as in the 8 == 1 device test: with 1e-8 its first update is lr·sign(g),
    # which turns rounding-level gradient differences into ±lr ones.
    config = tiny_config(
        checkpoint__every_steps=2, checkpoint__keep=1, optimizer__eps=1e-3, mesh__data=-1
    )
    config.mesh.num_devices = num_devices
    config.dpo.num_steps = num_steps
    return config


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(8, 4), (4, 8)])
def test_resume_on_another_device_count(tmp_path, before, after):
    ctx, straight, params = build(_config(before, 4), tmp_path / "straight")
    _, history_straight = stage_lib.run_stage(straight, params, ctx)

    ctx, first, params = build(_config(before, 2), tmp_path / "moved")
    stage_lib.run_stage(first, params, ctx)
    ctx, second, params = build(_config(after, 4), tmp_path / "moved")
    assert ctx.mesh.devices.size == after
    state, history = stage_lib.run_stage(second, params, ctx)

    assert [m["step"] for m in history] == [3, 4]
    for got, want in zip(history, history_straight[2:], strict=True):
        for name in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # The params live on the new mesh.
    leaf = jax.tree.leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == after
    # Same data order: the next batch after step 4 is the uninterrupted run's next batch.
    next_straight, next_moved = next(straight.train_batches), next(second.train_batches)
    for key in next_straight:
        np.testing.assert_array_equal(next_moved[key], next_straight[key])
