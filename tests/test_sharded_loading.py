"""Sharded loading: HF tensors go from the file straight to their shards, in the asked dtype."""

import itertools

import jax
import numpy as np
import pytest
import torch
import transformers

from dpo_jax import sharding
from dpo_jax.models import init_params, load_hf, logical_axes, safetensors_files
from dpo_jax.run.stage import Context
from dpo_jax.run.train import initial_params

# hidden 64 and MLP 128 divide by 8, so the FSDP rules split every matrix over the 8 devices.
_TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=64,
)
FSDP_RULES = (
    ("embed", "fsdp"),
    ("vocab", None),
    ("heads", None),
    ("kv_heads", None),
    ("mlp", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)
TENSOR_RULES = (("embed", None), ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"))
TENSOR_RULES += (("mlp", "tensor"), ("head_dim", None), ("norm", None), ("layers", None))


def _save_hf_model(directory, torch_dtype, family="llama", **overrides):
    config_class = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}[family]
    model_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**_TINY, **overrides})
    model = getattr(transformers, model_class)(config).to(torch_dtype)
    model.save_pretrained(directory)
    return {name: tensor.float().numpy() for name, tensor in model.state_dict().items()}


def _context(model_config, mesh, rules) -> Context:
    shapes = jax.eval_shape(init_params, model_config, jax.random.key(0))
    shardings = sharding.logical_to_sharding(logical_axes(model_config), shapes, mesh, rules)
    return Context(
        mesh=mesh,
        apply_fn=None,
        param_shardings=shardings,
        workdir="",
        seed=0,
        checkpoint_every=1,
        checkpoint_keep=1,
        log_every=1,
        eval_every=0,
        num_eval_batches=0,
        progress_bar=False,
        tensorboard=False,
    )


def _recording_reads(monkeypatch):
    """Records the shape of every block read from a safetensors file."""
    reads = []
    original = safetensors_files.LazyTensor.__getitem__

    def recording(self, index):
        block = original(self, index)
        reads.append((self.name, block.shape, self.shape))
        return block

    monkeypatch.setattr(safetensors_files.LazyTensor, "__getitem__", recording)
    return reads


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp_loading_places_only_shards_and_reads_only_slices(tmp_path, monkeypatch, dtype):
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    reference = _save_hf_model(tmp_path, torch_dtype)
    model_config, lazy = load_hf(str(tmp_path), lazy=True)  # the checkpoint's dtype
    assert model_config.param_dtype == dtype
    mesh = sharding.make_mesh(1, 8, 1)
    ctx = _context(model_config, mesh, FSDP_RULES)
    reads = _recording_reads(monkeypatch)
    params = initial_params(model_config, lazy, ctx, seed=0)

    eager = load_hf(str(tmp_path), param_dtype="float32")[1]  # the whole-tensor path
    for (path, array), where in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree.leaves(ctx.param_shardings),
        strict=True,
    ):
        name = jax.tree_util.keystr(path)
        assert array.dtype == np.dtype(dtype), name
        assert array.sharding == where, name
        shard_shape = where.shard_shape(array.shape)
        for shard in array.addressable_shards:
            assert shard.data.shape == shard_shape, name
        if not where.is_fully_replicated:  # a sharded tensor: no device holds all of it
            assert all(s.data.size * 8 == array.size for s in array.addressable_shards), name
        expected = np.asarray(_leaf(eager, path), np.float32)
        np.testing.assert_array_equal(np.asarray(array, np.float32), expected, err_msg=name)
    # every block read from the file is one shard of one layer, never the whole tensor, except
    # for the norms, which the rules replicate.
    for name, block_shape, file_shape in reads:
        if name.endswith("norm.weight"):
            assert block_shape == file_shape, name
        else:
            assert np.prod(block_shape) * 8 == np.prod(file_shape), (name, block_shape)
    # and the values are the checkpoint's, in its dtype (bf16 bits widen exactly to float32)
    np.testing.assert_array_equal(
        np.asarray(params["embedding"], np.float32), reference["model.embed_tokens.weight"]
    )


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_bf16_checkpoint_loads_as_asked(tmp_path):
    reference = _save_hf_model(tmp_path, torch.bfloat16)
    config_bf16, params_bf16 = load_hf(str(tmp_path), param_dtype="bfloat16")
    config_f32, params_f32 = load_hf(str(tmp_path), param_dtype="float32")
    assert (config_bf16.param_dtype, config_f32.param_dtype) == ("bfloat16", "float32")
    assert params_bf16["embedding"].dtype == np.dtype("bfloat16")
    assert params_f32["embedding"].dtype == np.dtype("float32")
    np.testing.assert_array_equal(
        np.asarray(params_f32["layers"]["mlp"]["up_kernel"][1]),
        reference["model.layers.1.mlp.up_proj.weight"].T,
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lazy_slices_equal_the_converted_tensors(tmp_path, family):
    """Every param, every slice a tensor-parallel or FSDP mesh asks for, against the eager
    conversion (`params_from_hf_tensors`, checked against transformers' logits elsewhere)."""
    _save_hf_model(tmp_path, torch.float32, family=family)
    model_config, lazy = load_hf(str(tmp_path), lazy=True)
    eager = load_hf(str(tmp_path))[1]
    for path, leaf in jax.tree_util.tree_leaves_with_path(lazy):
        full = np.asarray(_leaf(eager, path))
        assert leaf.shape == full.shape, path
        # two pieces along every axis at once (incl. heads splitting a fused H*Dh axis)
        halves = [
            [slice(0, n // 2), slice(n // 2, n)] if n > 1 else [slice(None)] for n in full.shape
        ]
        for index in itertools.product(*halves):
            np.testing.assert_array_equal(leaf[index], full[index], err_msg=str((path, index)))
    # and tensor-parallel placement gives the same arrays
    mesh = sharding.make_mesh(1, 1, 2, num_devices=2)
    params = initial_params(model_config, lazy, _context(model_config, mesh, TENSOR_RULES), 0)
    for (path, array), full in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(eager), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(array), np.asarray(full), err_msg=str(path))


def test_gguf_loads_sharded_and_dequantises_each_tensor_once(tmp_path, monkeypatch):
    from test_gemma3_gguf import _write_tiny_gguf

    from dpo_jax.models import convert_gguf

    path = _write_tiny_gguf(tmp_path / "tiny.gguf")
    eager = convert_gguf.load_gguf(path)[1]  # the whole-tensor path, checked against transformers
    dequantised = []
    original = convert_gguf._dequantize
    monkeypatch.setattr(
        convert_gguf,
        "_dequantize",
        lambda tensor, shape, name: dequantised.append(name) or original(tensor, shape, name),
    )
    model_config, lazy, _ = convert_gguf.load_gguf(path, lazy=True)
    assert not dequantised  # nothing is read before placement
    num_devices = 2 if model_config.hidden_size % 8 else 8
    mesh = sharding.make_mesh(1, num_devices, 1, num_devices=num_devices)
    params = initial_params(model_config, lazy, _context(model_config, mesh, FSDP_RULES), 0)
    assert sorted(dequantised) == sorted(set(dequantised))  # each tensor once, all shards
    for (path_, array), full in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(eager), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(array), np.asarray(full), err_msg=str(path_))
