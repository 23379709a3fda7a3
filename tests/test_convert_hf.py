"""Logits parity with transformers for every family, export back to transformers, and bad input."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dpo_jax.models import ModelConfig, load_hf, logits, params_from_hf_tensors, save_hf

SEQ_LEN = 24
LENGTHS = (24, 15)  # row 1 is right-padded; sequences are longer than the sliding windows (5)
TOLERANCE = 1e-4  # max abs logit difference, float32 on CPU (issue 3)

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# name -> (transformers config class, kwargs): tiny models covering each family's specifics.
TINY_MODELS = {
    "llama": ("LlamaConfig", dict(_COMMON, num_hidden_layers=2)),
    "llama3_rope_tied_bias": (
        "LlamaConfig",
        dict(
            _COMMON,
            num_hidden_layers=2,
            rope_theta=500_000.0,
            # original_max_position_embeddings small enough that all three frequency bands
            # (kept, smoothed, divided by factor) occur at head_dim 16.
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            tie_word_embeddings=True,
            attention_bias=True,
        ),
    ),
    # Every family with a RoPE base other than transformers' default (10,000), as released models
    # have: a reader that falls back to the default then fails the logits test.
    "mistral": (
        "MistralConfig",
        dict(_COMMON, num_hidden_layers=2, sliding_window=5, rope_theta=1_000_000.0),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(_COMMON, num_hidden_layers=2, tie_word_embeddings=True, rope_theta=1_000_000.0),
    ),
    "qwen2_sliding": (
        "Qwen2Config",
        dict(
            _COMMON,
            num_hidden_layers=3,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
            rope_theta=1_000_000.0,
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(_COMMON, num_hidden_layers=2, head_dim=32, rope_theta=1_000_000.0),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            _COMMON,
            num_hidden_layers=4,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            layer_types=[
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "full_attention",
            ],
            rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0,
        ),
    ),
    "gemma3_softcap_linear_rope": (
        "Gemma3TextConfig",
        dict(
            _COMMON,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=5,
            sliding_window_pattern=2,
            rope_scaling=dict(rope_type="linear", factor=4.0),
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
}
_MODEL_CLASS = {
    "LlamaConfig": "LlamaForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
    "Gemma3TextConfig": "Gemma3ForCausalLM",
}


def _randomise(model, seed):
    """Weights large enough that logits are O(1) and every norm weight and bias matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                base = 0.0 if "Gemma" in type(model).__name__ else 1.0
                param.copy_(base + 0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def _hf_model(name, seed=0):
    config_class, kwargs = TINY_MODELS[name]
    config = getattr(transformers, config_class)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, _MODEL_CLASS[config_class])(config).eval()
    _randomise(model, seed)
    return model


def _padded_batch(vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, size=(len(LENGTHS), SEQ_LEN)).astype(np.int32)
    mask = np.arange(SEQ_LEN)[None, :] < np.array(LENGTHS)[:, None]
    tokens = np.where(mask, tokens, 0)
    return tokens, mask


def _hf_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
        )
    return out.logits.float().numpy()


def _our_logits(config, params, tokens, mask):
    positions = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), tokens.shape)
    return np.asarray(
        logits(
            config,
            params,
            jnp.asarray(tokens),
            jnp.asarray(positions),
            jnp.asarray(mask.astype(np.int32)),
        )
    )


def _max_diff_on_real_tokens(a, b, mask):
    return float(np.max(np.abs(a - b)[mask]))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_logits_match_transformers(name, tmp_path):
    model = _hf_model(name)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokens, mask = _padded_batch(model.config.vocab_size)
    expected = _hf_logits(model, tokens, mask)
    assert expected[mask].std() > 0.5, "logits too small for the tolerance to mean anything"

    config, params = load_hf(str(tmp_path))
    actual = _our_logits(config, params, tokens, mask)

    assert np.all(np.isfinite(actual)), "padding rows must not produce NaN"
    diff = _max_diff_on_real_tokens(actual, expected, mask)
    assert diff <= TOLERANCE, f"{name}: max abs logit difference {diff:.2e} > {TOLERANCE}"


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_export_loads_in_transformers_with_same_logits(name, tmp_path):
    model = _hf_model(name, seed=1)
    model.save_pretrained(tmp_path / "original", safe_serialization=True)
    tokens, mask = _padded_batch(model.config.vocab_size, seed=1)
    expected = _hf_logits(model, tokens, mask)

    config, params = load_hf(str(tmp_path / "original"))
    save_hf(str(tmp_path / "exported"), config, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "exported", attn_implementation="eager"
    ).eval()

    assert type(reloaded) is type(model)
    diff = _max_diff_on_real_tokens(_hf_logits(reloaded, tokens, mask), expected, mask)
    assert diff <= TOLERANCE, f"{name}: exported model's logits differ by {diff:.2e}"
    config_again, _ = load_hf(str(tmp_path / "exported"))
    assert config_again == config


def test_sharded_checkpoint_loads(tmp_path):
    model = _hf_model("qwen3")
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    tokens, mask = _padded_batch(model.config.vocab_size)
    config, params = load_hf(str(tmp_path))
    diff = _max_diff_on_real_tokens(
        _our_logits(config, params, tokens, mask), _hf_logits(model, tokens, mask), mask
    )
    assert diff <= TOLERANCE


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps(
            TINY_MODELS["llama"][1]
            | {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "num_hidden_layers": 2,
                "rope_theta": 10_000.0,
            }
        )
    )
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(str(tmp_path))


def test_missing_shard_is_named(tmp_path):
    model = _hf_model("llama")
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_hf(str(tmp_path))


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match="unsupported") as error:
        ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    for supported in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma3ForCausalLM",
    ):
        assert supported in str(error.value)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    model = _hf_model("llama")
    tensors = {name: p.detach().numpy() for name, p in model.state_dict().items()}
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)
    config = ModelConfig.from_hf_config(model.config.to_dict())
    with pytest.raises(ValueError) as error:
        params_from_hf_tensors(config, tensors)
    message = str(error.value)
    assert "model.layers.1.mlp.up_proj.weight" in message
    assert "(100, 64)" in message and "(128, 64)" in message


def test_missing_tensor_is_named():
    model = _hf_model("gemma3")
    tensors = {name: p.detach().numpy() for name, p in model.state_dict().items()}
    del tensors["model.layers.2.self_attn.k_norm.weight"]
    config = ModelConfig.from_hf_config(model.config.to_dict())
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.k_norm\.weight"):
        params_from_hf_tensors(config, tensors)


def test_gemma3_config_reads_layer_pattern_and_rope_bases():
    config = ModelConfig.from_hf_config(
        {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": 262_144,
            "hidden_size": 640,
            "intermediate_size": 2048,
            "num_hidden_layers": 18,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "sliding_window": 512,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
        }
    )
    expected_full = [5, 11, 17]
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == expected_full
    assert config.tie_word_embeddings and config.embed_scale and config.norm_plus_one
    assert config.rope_local_theta == 10_000.0 and config.rope_theta == 1_000_000.0
    assert config.attention_scale == pytest.approx(1 / 16)
