"""Damaged checkpoints, a workdir of another config, and non-finite weights: each refused or
worked around with a message that names it."""

import glob
import os
import shutil

import jax
import numpy as np
import pytest
from test_train_step import build, tiny_config

from dpo_jax.models import save_hf
from dpo_jax.run import checkpoint, errors, run_config, train
from dpo_jax.run import stage as stage_lib


def _truncate_files(step_dir):
    for path in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


def _garbage_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write("{not json")


def _missing_state(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))


def _empty_step_dir(step_dir):
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


def _garbage_data_state(step_dir):
    with open(os.path.join(step_dir, "data", "metadata"), "w") as f:
        f.write("[[[")


DAMAGE = {
    "truncated files": _truncate_files,
    "garbage metadata": _garbage_metadata,
    "missing state/": _missing_state,
    "empty step directory": _empty_step_dir,
    "garbage data-iterator state": _garbage_data_state,
}


def _four_steps_config():
    return tiny_config(checkpoint__every_steps=2, checkpoint__keep=2, dpo__num_steps=4)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """(workdir, metrics) of an uninterrupted 4-step run checkpointed at steps 2 and 4; each
    test damages its own copy of the workdir."""
    workdir = tmp_path_factory.mktemp("straight")
    ctx, stage, params = build(_four_steps_config(), workdir)
    return workdir, stage_lib.run_stage(stage, params, ctx)[1]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(
    tmp_path, capsys, straight_run, damage
):
    config = _four_steps_config()
    straight_workdir, straight_history = straight_run
    shutil.copytree(straight_workdir, tmp_path, dirs_exist_ok=True)
    checkpoints = tmp_path / "dpo" / "checkpoints"
    assert sorted(os.listdir(checkpoints), key=int) == ["2", "4"]
    DAMAGE[damage](str(checkpoints / "4"))

    ctx, rerun, params = build(config, tmp_path)
    _, history = stage_lib.run_stage(rerun, params, ctx)
    printed = capsys.readouterr().err
    assert f"checkpoint {checkpoints / '4'} is damaged (" in printed
    assert "falling back to the previous checkpoint" in printed
    # Resumed from step 2: steps 3 and 4 again, with the numbers of the uninterrupted run.
    assert [m["step"] for m in history] == [3, 4]
    for got, want in zip(history, straight_history[2:], strict=True):
        assert got["loss"] == want["loss"]
    assert len(os.listdir(tmp_path / "dpo" / "damaged_checkpoints")) == 1
    assert sorted(os.listdir(checkpoints), key=int) == ["2", "4"]  # 4 written anew


def test_a_workdir_of_another_model_or_config_is_refused_naming_the_fields(tmp_path):
    config = tiny_config()
    run_config.check_workdir(config, str(tmp_path))  # the first run writes its config
    run_config.check_workdir(config, str(tmp_path))  # the same config resumes
    free = tiny_config(log__every_steps=7, mesh__num_devices=2, model__remat=True)
    run_config.check_workdir(free, str(tmp_path))  # how it runs, not what: allowed
    wider = tiny_config(model__hidden_size=48)
    with pytest.raises(
        ValueError, match=r"another model .*model.hidden_size: 32 -> 48.*new --work"
    ):
        run_config.check_workdir(wider, str(tmp_path))
    other = tiny_config(dpo__beta=0.5, data__shuffle_seed=3)
    with pytest.raises(
        ValueError, match=r"data.shuffle_seed: 0 -> 3; dpo.beta: 0.1 -> 0.5.*allow_changed_config"
    ):
        run_config.check_workdir(other, str(tmp_path))
    other.checkpoint.allow_changed_config = True
    run_config.check_workdir(other, str(tmp_path))  # explicitly allowed: goes on
    with pytest.raises(ValueError, match="another model"):  # but never for the model
        wider.checkpoint.allow_changed_config = True
        run_config.check_workdir(wider, str(tmp_path))


def test_nan_weights_are_refused_on_load_on_save_and_on_export(tmp_path):
    config = tiny_config()
    ctx, stage, params = build(config, tmp_path)
    model_config = train.load_model(config, str(tmp_path))[1]
    host = jax.device_get(params)
    host["final_norm"]["scale"] = np.full_like(host["final_norm"]["scale"], np.nan)
    save_hf(str(tmp_path / "nan_model"), model_config, host)
    loaded = train.load_hf(str(tmp_path / "nan_model"))[1]
    with pytest.raises(errors.NonFiniteParams, match=r"the loaded model: .*\['final_norm'\]"):
        train.initial_params(model_config, loaded, ctx, seed=0)
    with pytest.raises(errors.NonFiniteParams, match=r"the export to .*final_norm"):
        checkpoint.export_hf(str(tmp_path / "export"), model_config, host)
    assert not (tmp_path / "export").exists()
    state = stage_lib.init_state(stage, params, ctx).replace(params=host)
    manager = checkpoint.make_manager(str(tmp_path / "ckpt"), keep=1, every_steps=1)
    with pytest.raises(errors.NonFiniteParams, match=r"checkpoint of step 1: .*final_norm"):
        checkpoint.save(manager, 1, state, jax.random.key(0), {}, force=True)
    assert not os.listdir(tmp_path / "ckpt")


def test_a_synchronous_save_is_written_when_save_returns_and_restores(tmp_path):
    # config.checkpoint.async_save=False (the Gemma configs on a CPU host): the checkpoint is
    # committed before the next step starts, so the saved state is never alive beside the next.
    ctx, stage, params = build(tiny_config(), tmp_path / "run")
    state = stage_lib.init_state(stage, params, ctx)
    manager = checkpoint.make_manager(
        str(tmp_path / "ckpt"), keep=1, every_steps=1, async_save=False
    )
    assert checkpoint.save(manager, 1, state, jax.random.key(0), {"position": 3}, force=True)
    assert os.path.exists(tmp_path / "ckpt" / "1" / "state" / "_METADATA")  # no wait needed
    assert manager.all_steps() == [1]
    restored, _, data_state = stage_lib.restore_or_init(manager, stage, params, ctx)
    assert int(restored.step) == int(state.step) and data_state == {"position": 3}
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(restored.params),
        jax.device_get(state.params),
    )
