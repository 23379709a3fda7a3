"""The "cached" reference: a precomputed pass written to disk by fingerprint and read back."""

import os
import sys

import jax
import numpy as np
import pytest
from test_train_step import build, run_steps, tiny_config

from dpo_jax import reference as reference_lib
from dpo_jax.run import ref_cache, ref_logps, train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from tiny_tokenizers import make_word_tokenizer  # noqa: E402


@pytest.fixture
def count_passes(monkeypatch):
    """Counts the reference forwards of the precomputed pass (one call per batch)."""
    calls = {"batches": 0}
    original = ref_logps.precompute

    def counting(table, batches, compute_fn):
        def counted(batch):
            calls["batches"] += 1
            return compute_fn(batch)

        return original(table, batches, counted)

    monkeypatch.setattr(ref_logps, "precompute", counting)
    return calls


def _cached_config(cache_dir, **changes):
    config = tiny_config(dpo__reference="cached", **changes)
    config.dpo.ref_cache_dir = str(cache_dir)
    return config


def test_a_second_run_reads_the_cache_and_runs_no_reference_forward(tmp_path, count_passes, capsys):
    cache = tmp_path / "cache"
    _, first, _ = build(_cached_config(cache), tmp_path / "a")
    computed = count_passes["batches"]
    assert computed > 0 and reference_lib.kind_name(first.reference) == "cached"
    assert os.path.exists(first.reference.cache)
    ctx, second, params = build(_cached_config(cache), tmp_path / "b")
    assert count_passes["batches"] == computed  # no reference forward this time
    assert "read from the cache" in capsys.readouterr().out
    assert second.reference.cache == first.reference.cache
    # The cached log-probs give the in-step reference's numbers.
    _, history_cached = run_steps(second, ctx, params, num_steps=2)
    ctx, frozen, params = build(tiny_config(), tmp_path / "c")
    _, history_frozen = run_steps(frozen, ctx, params, num_steps=2)
    for cached, in_step in zip(history_cached, history_frozen, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm"):
            np.testing.assert_allclose(cached[key], in_step[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "changes, component",
    [
        (dict(data__max_length=16), "data settings"),
        (dict(data__num_train_pairs=48), "data 0"),
    ],
)
def test_a_change_gives_a_new_fingerprint_and_says_what_changed(
    tmp_path, count_passes, capsys, changes, component
):
    cache = tmp_path / "cache"
    build(_cached_config(cache), tmp_path / "a")
    computed = count_passes["batches"]
    capsys.readouterr()
    _, changed, _ = build(_cached_config(cache, **changes), tmp_path / "b")
    assert count_passes["batches"] > computed  # recomputed
    printed = capsys.readouterr().out
    assert f"changed since the newest cache: {component}" in printed
    assert len(os.listdir(cache)) == 2


def test_the_tokenizer_and_the_weights_are_in_the_fingerprint(tmp_path):
    config = tiny_config()
    ctx, stage, params = build(config, tmp_path)
    sources = train.data_sources(config)
    common = dict(sources=sources, data_settings={"max_length": 18}, scoring={})
    synthetic = train.synthetic.make_tokenizer()
    base = ref_cache.fingerprint(ref_params=params, tokenizer=synthetic, **common)
    other_tokenizer = ref_cache.fingerprint(
        ref_params=params, tokenizer=make_word_tokenizer(), **common
    )
    moved = jax.tree.map(lambda p: p + 1e-3, params)
    other_weights = ref_cache.fingerprint(ref_params=moved, tokenizer=synthetic, **common)
    assert [k for k in base if base[k] != other_tokenizer[k]] == ["tokenizer"]
    assert [k for k in base if base[k] != other_weights[k]] == ["reference weights"]


def test_a_damaged_cache_file_is_a_clear_error(tmp_path):
    cache = tmp_path / "cache"
    _, stage, _ = build(_cached_config(cache), tmp_path / "a")
    with open(stage.reference.cache, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="not a readable reference log-prob cache.*delete it"):
        build(_cached_config(cache), tmp_path / "b")
