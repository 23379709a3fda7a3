"""The step benchmark builds and runs the training step, and counts FLOPs as worked out by hand.

No timing is asserted anywhere: times depend on the machine and its load.
"""

import importlib.util
import math
import os

import pytest

from dpo_jax.benchmarks import data_effects, step_benchmark
from dpo_jax.models import ModelConfig

_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _bench_cpu_model() -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=32_000,
        hidden_size=512,
        intermediate_size=1376,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
    )


def test_flops_of_bench_cpu_match_a_hand_count():
    # Per layer: q 512·(8·64) = 262,144; k and v 512·(4·64) = 131,072 each; o 262,144;
    # gate, up, down 3·512·1376 = 2,113,536; sum 2,899,968. Four layers: 11,599,872. Untied
    # unembedding 512·32,000 = 16,384,000. P = 27,983,872 (the embedding lookup is no matmul).
    # Tokens: 8 pairs · 2 rows · 257 = 4,112. Dense: 8 · P · 4,112 = 920,557,453,312.
    # Attention: (6 + 2) · 2 · 257² · 512 · 4 layers · 16 rows = 34,628,698,112.
    flops = step_benchmark.model_flops(
        _bench_cpu_model(), num_rows=16, row_length=257, reference_in_step=True
    )
    assert flops["matmul_params"] == 27_983_872
    assert flops["tokens"] == 4_112
    assert flops["dense_flops"] == 920_557_453_312
    assert flops["attention_flops"] == 34_628_698_112
    assert flops["attention_flops_causal_half"] == 17_314_349_056
    assert flops["total_flops"] == 920_557_453_312 + 34_628_698_112


def test_flops_without_reference_drop_the_reference_forward():
    model = _bench_cpu_model()
    shape = dict(num_rows=16, row_length=257)
    with_ref = step_benchmark.model_flops(model, **shape, reference_in_step=True)
    without = step_benchmark.model_flops(model, **shape, reference_in_step=False)
    assert without["dense_flops"] * 8 == with_ref["dense_flops"] * 6
    assert without["attention_flops"] * 8 == with_ref["attention_flops"] * 6


def test_flops_of_llama_1b_match_the_peers_count():
    # FACTS.md: 1.236B matmul params incl. the tied unembedding; about 82 TFLOP a step.
    model = ModelConfig(
        family="llama",
        vocab_size=128_256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    )
    flops = step_benchmark.model_flops(model, num_rows=16, row_length=512, reference_in_step=True)
    assert flops["matmul_params"] == 16 * (2048 * 2048 * 2 + 2 * 2048 * 512 + 3 * 2048 * 8192) + (
        2048 * 128_256
    )
    assert math.isclose(flops["matmul_params"], 1.236e9, rel_tol=1e-3)
    assert math.isclose(flops["total_flops"], 82e12, rel_tol=0.02)


@pytest.mark.parametrize("name", ["bench_cpu", "bench_gpu_1b"])
def test_bench_configs_load_with_the_issue_shapes(name):
    config = _load_config(name)
    assert config.data.max_length == config.bench.prompt_length + config.bench.response_length
    assert config.data.batch_size == 8
    for variant in config.bench.variants.split(","):
        step_benchmark.with_variant(config, variant)  # every listed variant is known


def _tiny_config(**bench):
    config = _load_config("bench_cpu", "quick")
    with config.unlocked():
        config.model.vocab_size = 64
        config.model.hidden_size = 16
        config.model.intermediate_size = 32
        config.model.num_layers = 1
        config.model.num_heads = 2
        config.model.num_kv_heads = 1
        config.model.head_dim = 8
        config.data.batch_size = 2
        config.data.max_length = 10
        config.data.max_prompt_length = 4
        config.bench.prompt_length = 4
        config.bench.response_length = 6
        config.bench.warmup_steps = 0
        config.bench.timed_steps = 1
        config.bench.peak_matmul_size = 32
        config.bench.peak_repeats = 1
        config.bench.update(bench)
    return config


@pytest.mark.parametrize("variant", ["default", "precomputed_ref", "chunked", "remat", "lora"])
def test_one_step_of_a_tiny_config_runs_and_reports(variant):
    config = step_benchmark.with_variant(_tiny_config(chunk_size=8), variant)
    result = step_benchmark.measure_variant(config)
    expected = step_benchmark.model_flops(
        ModelConfig(
            family="llama",
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=8,
        ),
        num_rows=4,
        row_length=10,
        reference_in_step=variant != "precomputed_ref",
    )
    assert result["total_flops"] == expected["total_flops"]
    assert result["tokens"] == 40
    assert math.isfinite(result["loss_after"])
    assert result["step_s"] > 0 and result["peak"]["flops_per_s"] > 0
    assert result["xla_peak_bytes"] > 0
    # Held between steps (each buffer once): the params, AdamW's two moments and the frozen
    # reference, 4 copies, plus the small batch; LoRA holds the base once, plus adapters.
    params_held = result["held_bytes"] / result["param_bytes"]
    if variant == "default":
        assert 4.0 <= params_held < 4.2, params_held
    if variant == "lora":
        assert result["reference_kind"] == "adapters_off" and params_held > 1.0


def test_the_gemma3_workload_compares_full_fine_tuning_with_lora():
    config = _load_config("bench_cpu", "gemma3")
    assert config.bench.variants == "default,lora"
    assert config.model.source == "gguf" and config.data.batch_size == 8
    assert config.data.max_length == 512
    assert step_benchmark.with_variant(config, "lora").lora.rank == 8


def test_cudnn_is_not_available_on_cpu():
    config = step_benchmark.with_variant(_tiny_config(), "cudnn")
    assert "GPU" in step_benchmark.variant_available(config)


def test_unknown_variant_is_an_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="known: .*precomputed_ref"):
        step_benchmark.with_variant(_tiny_config(), "fast")


def test_varied_batches_pad_or_pack_the_same_kind_of_pairs():
    shape = dict(
        rows=4, max_length=40, prompt_length=12, response_length=8, min_length=2, vocab_size=64
    )
    padded = data_effects.varied_batch(pairs_per_row=1, seed=0, **shape)
    packed = data_effects.varied_batch(pairs_per_row=3, seed=0, **shape)
    assert padded["tokens"].shape == packed["tokens"].shape == (4, 2, 40)
    assert padded["pair_mask"].sum() == 4 and packed["pair_mask"].sum() > 4
    # Padded: the first 4 of the drawn pairs, one a row, each 3..20 tokens a side.
    pairs = data_effects.varied_pairs(
        24, prompt_range=(2, 12), response_range=(2, 8), vocab_size=64, seed=0
    )
    assert data_effects.real_tokens(padded) == sum(sum(pair.lengths) for pair in pairs[:4])
    assert data_effects.real_tokens(packed) > data_effects.real_tokens(padded)


@pytest.mark.parametrize("variant", ["padded_varied", "packed_varied"])
def test_the_varied_variants_report_real_tokens(variant):
    config = step_benchmark.with_variant(_tiny_config(min_length=1), variant)
    with config.unlocked():
        config.data.max_length = 20  # room to pack pairs of up to 4 + 6 tokens a side
    result = step_benchmark.measure_variant(config)
    expected = data_effects.varied_batch(
        rows=2,
        max_length=20,
        pairs_per_row=config.data.pairs_per_row,
        prompt_length=4,
        response_length=6,
        min_length=1,
        vocab_size=64,
        seed=config.seed,
    )
    assert result["real_tokens"] == data_effects.real_tokens(expected)
    assert result["real_tokens"] < result["tokens"] == 2 * 2 * 20
    assert math.isclose(result["real_tokens_per_s"], result["real_tokens"] / result["step_s"])


def test_a_cache_hit_reads_what_the_miss_computed(capsys):
    config = _tiny_config(cache_pairs=16, cache_max_length=24)
    result = data_effects.measure_cache_hit(config)
    assert result["pairs"] == 16 and result["cache_bytes"] > 0
    assert math.isclose(result["saved_s"], result["miss_s"] - result["hit_s"])
    printed = capsys.readouterr().out
    assert "no reference log-prob cache for this fingerprint" in printed
    assert "reference log-probs of 16 pairs read from the cache" in printed
    lines = data_effects.format_lines({"variants": {}, "ref_cache": result})
    assert lines[0].startswith("Reference-log-prob cache, 16 pairs: miss (reference pass + write)")


def test_packing_is_timed_alternately_and_counts_real_tokens():
    config = _tiny_config(min_length=1, timed_steps=2)
    with config.unlocked():
        config.data.max_length = 20
    result = data_effects.measure_packing(config)
    shape = dict(rows=2, max_length=20, prompt_length=4, response_length=6, min_length=1)
    for name, per_row in (("padded", 1), ("packed", 3)):
        batch = data_effects.varied_batch(pairs_per_row=per_row, vocab_size=64, seed=0, **shape)
        assert result[f"{name}_real_tokens"] == data_effects.real_tokens(batch)
    assert result["tokens"] == 2 * 2 * 20 and len(result["ratios"]) == 2
    assert math.isclose(result["ratio"], sum(result["ratios"]) / 2)  # the median of two
    lines = data_effects.format_lines({"packing": result})
    assert lines[-1].startswith(f"  packed / padded real-token throughput: {result['ratio']:.2f}x")
