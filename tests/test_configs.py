"""Every config loads; a misspelled key is an error; bad values fail early with clear messages."""

import importlib.util
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from dpo_jax.run import train

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.py"))


def _load_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _all_variants():
    for path in CONFIG_FILES:
        for variant in getattr(_load_module(path), "VARIANTS", ("",)):
            yield pytest.param(path, variant, id=f"{path.stem}:{variant or 'default'}")


@pytest.mark.parametrize("path, variant", list(_all_variants()))
def test_every_config_loads_locked_and_commented(path, variant):
    config = _load_module(path).get_config(variant or None)
    assert config.is_locked
    for group in ("model", "data", "sft", "dpo", "optimizer", "mesh", "checkpoint", "log"):
        assert group in config, f"{path.name}:{variant} has no '{group}' group"
    train.loss_names(config.dpo.loss_type)  # parses


def test_every_default_field_has_a_comment():
    """STYLE rule 12: each field of the one source of defaults says its units and values."""
    source = (CONFIG_DIR / "default.py").read_text()
    body = source[source.index("def get_config") : source.index("def _apply_variant")]
    fields = [line.strip() for line in body.splitlines() if line.strip().startswith("config.")]
    fields = [line for line in fields if " = " in line and "ConfigDict()" not in line]
    assert len(fields) > 50
    for line in fields:
        assert "  # " in line, f"configs/default.py: field without a comment: {line}"


def test_default_config_is_the_scripts_default():
    script = (CONFIG_DIR.parent / "scripts" / "train.py").read_text()
    assert '"configs", "default.py"' in script


def test_misspelled_key_is_an_error():
    config = _load_module(CONFIG_DIR / "default.py").get_config()
    with pytest.raises(AttributeError, match="betaa"):
        config.dpo.betaa = 0.3
    with pytest.raises(KeyError):
        config.dpo["betaa"]


def _parse(argv):
    """Parses `argv` as scripts/train.py would (override flags are found at definition time)."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", str(CONFIG_DIR / "default.py"), flag_values=flag_values, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


def test_command_line_overrides_and_typos():
    config = _parse(["prog", "--config.dpo.beta=0.3", "--config.mesh.fsdp=2"])
    assert config.dpo.beta == 0.3
    assert config.mesh.fsdp == 2
    with pytest.raises(AttributeError, match='Did you mean "beta" instead of "betaa"'):
        _parse(["prog", "--config.dpo.betaa=0.3"])


def test_variant_selection_and_unknown_variant():
    config = _parse(["prog", f"--config={CONFIG_DIR / 'default.py'}:tiny"])
    assert config.model.num_layers == 1
    with pytest.raises(ValueError, match="unknown variant 'tinny'.*tiny"):
        _load_module(CONFIG_DIR / "default.py").get_config("tinny")


def _default(**changes):
    config = _load_module(CONFIG_DIR / "default.py").get_config("tiny")
    for dotted, value in changes.items():
        group, key = dotted.split("__")
        config[group][key] = value
    return config


def test_batch_size_not_divisible_by_the_batch_shards():
    config = _default(data__batch_size=6, mesh__data=2, mesh__fsdp=4)
    with pytest.raises(ValueError, match=r"batch_size.*=6 must be divisible .* 2 × 4 = 8"):
        train.make_mesh(config)


def test_eval_batch_size_not_divisible():
    config = _default(data__eval_batch_size=12, mesh__data=8)
    with pytest.raises(ValueError, match=r"eval_batch_size=12 must be divisible .* = 8"):
        train.make_mesh(config)


def test_mesh_that_does_not_fit_the_devices():
    config = _default(mesh__data=3, mesh__fsdp=1)
    with pytest.raises(ValueError, match="needs 3 devices but 8 are used"):
        train.make_mesh(config)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(dpo__loss_type="sigmod"), r"unknown loss 'sigmod'; known: \[.*'sigmoid'"),
        (dict(dpo__loss_type="sigmoid,nope"), r"unknown loss 'nope'"),
        (dict(dpo__loss_type=""), r"unknown loss ''"),
        (dict(model__source="s3"), r"model.source='s3'; allowed"),
        (dict(model__source="hf"), r"needs config.model.hf_path"),
        (dict(dpo__reference="disk"), r"dpo.reference='disk'; allowed"),
        (
            dict(dpo__reference="precomputed", dpo__ref_sync_every=4),
            r"ref_sync_every=4 with config.dpo.reference='precomputed': TR-DPO is",
        ),
        (dict(dpo__ref_sync_alpha=1.5), r"ref_sync_alpha=1.5 must be in \[0, 1\]"),
        (dict(optimizer__grad_accum_steps=3), r"batch_size=8 must be divisible by .*=3"),
        (dict(dpo__num_steps=-1), r"dpo.num_steps=-1 must be >= 0"),
        # Issue 17: each of these failed only after SFT had trained, or was not checked at all.
        (dict(dpo__label_smoothing=0.7), r"config.dpo \(loss_type='sigmoid'\): label_smoothing"),
        (dict(dpo__loss_weights="1,2"), r"config.dpo \(loss_type='sigmoid'\): .*loss_weights"),
        (dict(dpo__loss_weights="a,b"), r"config.dpo.loss_weights='a,b': 'a' is not a number"),
        (dict(optimizer__learning_rate=0.0), r"config.optimizer: learning_rate=0.0 must be > 0"),
        (dict(sft__learning_rate=-1.0), r"config.sft: learning_rate=-1.0 must be > 0"),
        (dict(log__every_steps=0), r"config.log.every_steps=0 must be >= 1"),
        (dict(optimizer__b1=1.5), r"config.optimizer.b1=1.5 must be in \[0, 1\)"),
        (dict(optimizer__eps=0.0), r"config.optimizer.eps=0.0 must be > 0"),
        (dict(dpo__beta=0.0), r"config.dpo \(loss_type='sigmoid'\): beta=0.0"),
        (dict(data__max_length=1), r"config.data: max_length=1 must be an int >= 2"),
        (dict(data__truncation_mode="middle"), r"config.data: truncation_mode='middle'"),
        (
            dict(data__on_boundary_problem="warn"),
            r"config.data: on_boundary_problem='warn' must be one of \('error', 'skip'\)",
        ),
        (dict(guards__on_nonfinite="ignore"), r"config.guards.on_nonfinite='ignore'; allowed"),
        (dict(checkpoint__keep=0), r"config.checkpoint.keep=0 must be >= 1"),
        (dict(model__dtype="float16"), r"config.model.dtype='float16'; allowed"),
    ],
)
def test_bad_config_values_fail_before_anything_is_built(changes, message):
    with pytest.raises(ValueError, match=message):
        train.check_config(_default(**changes))
