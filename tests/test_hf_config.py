"""config.json as transformers 4.57 and 5.x write it: both RoPE formats read alike, the defaults
transformers' own, and a missing or unknown RoPE setting a one-line error naming the file.

tests/hf_configs/ holds, for each tiny model of test_convert_hf.py, the config.json that
transformers 4.57.1 and 5.25 each wrote (tests/hf_configs/generate.py). This file runs in both
test environments (constraints.txt and scripts/test_newest_versions.sh), so each version's own
save is checked against the committed file of its format, and the two formats against each other.
"""

import json
import os
import subprocess
import sys

import pytest
import transformers
from test_convert_hf import TINY_MODELS, _hf_model

from dpo_jax.models import ModelConfig, load_hf
from dpo_jax.models.hf_config import HF_DEFAULTS

HF_CONFIGS = os.path.join(os.path.dirname(__file__), "hf_configs")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSFORMERS_MAJOR = transformers.__version__.split(".")[0]
_CONFIG_CLASS = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma3_text": "Gemma3TextConfig",
}


def _saved_config(name, major):
    with open(os.path.join(HF_CONFIGS, f"{name}.transformers{major}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_both_formats_read_as_the_same_model(name):
    old, new = _saved_config(name, 4), _saved_config(name, 5)
    assert "rope_parameters" not in old and "rope_theta" not in new  # the two formats, really
    config = ModelConfig.from_hf_config(old)
    assert ModelConfig.from_hf_config(new) == config
    # So the export, written from the config alone, is one file whichever version saved the
    # checkpoint; test_convert_hf loads it in the installed transformers, in both environments.
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_installed_transformers_writes_the_committed_format(name, tmp_path):
    """The committed file of this version's format is what this transformers saves now (else
    regenerate it with tests/hf_configs/generate.py)."""
    _hf_model(name).save_pretrained(tmp_path, safe_serialization=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    committed = _saved_config(name, TRANSFORMERS_MAJOR)
    ignore = {"transformers_version"}
    assert {k: v for k, v in saved.items() if k not in ignore} == {
        k: v for k, v in committed.items() if k not in ignore
    }


@pytest.mark.parametrize("family", sorted(HF_DEFAULTS))
def test_defaults_are_those_of_transformers_config_classes(family):
    hf_class = getattr(transformers, _CONFIG_CLASS[family])()
    values = {**hf_class.to_dict(), **vars(hf_class)}
    # Where transformers stores a derived value rather than its argument's default (module
    # docstring of dpo_jax.models.hf_config): the window is dropped when use_sliding_window is
    # off, and Gemma 3 keeps the pattern under a private name.
    derived = {("qwen2", "sliding_window"), ("qwen3", "sliding_window")}
    aliases = {"sliding_window_pattern": "_sliding_window_pattern"}
    for key, ours in HF_DEFAULTS[family].items():
        if (family, key) in derived:
            assert values[key] is None and not values["use_sliding_window"]
            continue
        theirs = values.get(key, values.get(aliases.get(key), "<absent>"))
        assert theirs == ours, f"{family}.{key}: ours {ours!r}, transformers {theirs!r}"


def _rope_free(config):
    keys = ("rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq")
    return {k: v for k, v in config.items() if k not in keys}


def _bad_configs():
    llama = _saved_config("llama3_rope_tied_bias", 5)
    gemma = _saved_config("gemma3", 5)
    return {
        "unknown_rope_type": (
            {**llama, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
            r"rope_parameters\.rope_type='yarn' is not supported",
        ),
        "no_rope_keys": (_rope_free(llama), r"no RoPE settings"),
        "no_rope_keys_gemma3": (_rope_free(gemma), r"no RoPE settings"),
        "llama3_without_its_factors": (
            {**llama, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
            r"rope_parameters \(rope_type='llama3'\) has no 'factor'",
        ),
        "the_formats_disagree": (
            {**llama, "rope_theta": 10_000.0, "rope_scaling": None},
            r"the RoPE settings disagree",
        ),
        "gemma3_flat_rope_parameters": (
            {**_rope_free(gemma), "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
            r"rope_parameters has no 'full_attention' entry",
        ),
        "gemma3_scaled_local_layers": (
            {
                **gemma,
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2},
                },
            },
            r"scaled RoPE on sliding-window layers is not supported",
        ),
    }


@pytest.mark.parametrize("case", sorted(_bad_configs()))
def test_bad_rope_settings_are_one_line_naming_the_file(case, tmp_path):
    config, message = _bad_configs()[case]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as error:
        load_hf(str(tmp_path))
    text = str(error.value)
    assert text.startswith(str(tmp_path / "config.json") + ": ") and "\n" not in text


def test_the_main_job_reports_an_unknown_rope_type_in_one_line(tmp_path):
    config = _saved_config("llama3_rope_tied_bias", 5)
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "--config=configs/default.py:tiny",
            f"--workdir={tmp_path / 'run'}",
            "--config.model.source=hf",
            f"--config.model.hf_path={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 2 and lines[1] == "(run with --verbose for the traceback)", lines
    assert lines[0].startswith(f"error: {tmp_path / 'config.json'}: "), lines
    assert "'yarn'" in lines[0]
