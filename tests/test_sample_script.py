"""scripts/sample.py and sampling.load_model: a workdir, an HF directory, and bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
from test_models import _random_params

from dpo_jax import sampling
from dpo_jax.data import synthetic
from dpo_jax.models import ModelConfig, save_hf

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "sample.py")
_CONFIG = ModelConfig(
    family="llama",
    vocab_size=len(synthetic.VOCAB),
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    max_position_embeddings=24,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir as train_and_evaluate leaves it: the final policy in hf/."""
    path = tmp_path_factory.mktemp("workdir")
    params = _random_params(_CONFIG)
    save_hf(str(path / "hf"), _CONFIG, params)
    return path, params


def _run(*args):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300
    )


def test_load_model_reads_a_workdir_and_an_hf_directory(workdir):
    path, params = workdir
    for where in (path, path / "hf"):
        config, loaded, tokenizer = sampling.load_model(str(where))
        assert config.vocab_size == len(synthetic.VOCAB) and tokenizer.eos_id == 2
        np.testing.assert_array_equal(loaded["embedding"], params["embedding"])


def test_script_prints_the_greedy_completions_of_generate(workdir):
    path, params = workdir
    prompts = ["sort 3 1 2 =", "copy 4 4 4 4 ="]
    result = _run(f"--model={path}", *(f"--prompt={p}" for p in prompts), "--max_new_tokens=5")
    assert result.returncode == 0, result.stderr
    tokenizer = synthetic.make_tokenizer()
    out = sampling.generate(
        _CONFIG,
        params,
        [sampling.encode_prompt(tokenizer, p) for p in prompts],
        max_new_tokens=5,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    expected = [
        f"{p!r} -> {tokenizer.decode(c, skip_special_tokens=True)!r}"
        for p, c in zip(prompts, out.completions(), strict=True)
    ]
    assert result.stdout.strip().splitlines() == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model=/nonexistent/run"], "/nonexistent/run: no checkpoint here"),
        (["--prompt="], "is empty"),
        (["--top_p=1.5"], r"top_p=1.5 must be in (0, 1]"),
        (["--prompt=" + "copy " * 30 + "="], "the model's context is 24"),
    ],
)
def test_script_bad_input_is_one_line_and_exit_1(workdir, args, message):
    path, _ = workdir
    result = _run(f"--model={path}", "--prompt=sort 1 2 =", *args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_evaluate_script_of_a_policy_against_itself(workdir):
    path, _ = workdir
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "evaluate.py")
    result = subprocess.run(
        [sys.executable, script, f"--policy={path}", f"--reference={path}", "--num_prompts=6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    values = dict(line.split() for line in result.stdout.strip().splitlines())
    assert float(values["kl/mean"]) == 0.0 and float(values["num_prompts"]) == 6
    assert values["exact_match/policy"] == values["exact_match/reference"]
