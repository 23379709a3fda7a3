"""QLoRA: a GGUF's Linear weights and embedding kept in their quantised blocks and dequantised by
the model where read (`dpo_jax.models.linear.Quantized`), with LoRA adapters trained over them.

The tiny GGUF here mixes Q8_0 and Q5_0 across the layers of one kernel, as the packaged Gemma 3
270M mixes Q5_0/Q8_0 (attn_v) and Q4_K/Q6_K (ffn_down), so the per-layer type switch runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors
import transformers
from test_convert_hf import _hf_model, _our_logits, _padded_batch
from test_gemma3_gguf import _TINY, _write_tiny_gguf
from test_train_step import tiny_config

from dpo_jax import lora
from dpo_jax.models import convert_gguf, convert_hf, linear, load_hf, quantize
from dpo_jax.models.safetensors_files import RowBlocks, write_safetensors_streamed
from dpo_jax.models.transformer import logits
from dpo_jax.run import train

# The tiny random Llama's logits (max |logit| 5.0) quantised against float: measured 0.165
# (Q8_0), 1.08 (Q5_0) and 2.12 (Q4_0), the bits' steps; bounds 1.5x that. A random model of
# width 64 is far more sensitive than a trained one (Gemma 3 270M's file: docs/lora.md).
HF_LOGIT_BOUND = {"Q8_0": 0.25, "Q5_0": 1.6, "Q4_0": 3.2}
KERNELS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _plan(skip=()):
    """{tensor: type}: each kernel alternates Q8_0 and Q5_0 over the layers."""
    return {
        f"blk.{layer}.{name}.weight": ("Q8_0", "Q5_0")[(layer + index) % 2]
        for layer in range(_TINY["layers"])
        for index, name in enumerate(KERNELS)
        if name not in skip
    }


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return _write_tiny_gguf(tmp_path_factory.mktemp("qlora") / "tiny.gguf", quantize=_plan())


def _tokens(vocab_size):
    return jnp.asarray(np.random.default_rng(0).integers(1, vocab_size, (2, 12)), jnp.int32)


def test_the_quantised_model_is_the_dequantised_one(tiny_gguf):
    config, params, _ = convert_gguf.load_gguf(tiny_gguf, quantized=True)
    _, float_params, _ = convert_gguf.load_gguf(tiny_gguf)
    v_kernel = params["layers"]["attn"]["v_kernel"]
    assert isinstance(v_kernel, linear.Quantized) and v_kernel.type_names == ("Q8_0", "Q5_0")
    assert v_kernel.shape == float_params["layers"]["attn"]["v_kernel"].shape
    assert isinstance(params["embedding"], linear.Quantized)
    # The blocks are the file's bytes; dequantised, they are the float loader's weights exactly.
    import gguf

    tensor = next(t for t in gguf.GGUFReader(tiny_gguf).tensors if t.name == "blk.1.attn_v.weight")
    raw = np.asarray(tensor.data).view(np.uint8).reshape(tensor.data.shape[0], -1)
    np.testing.assert_array_equal(np.asarray(v_kernel.data[1])[:, : raw.shape[1]], raw)
    jax.tree.map(np.testing.assert_array_equal, linear.dense_params(params), float_params)
    tokens = _tokens(config.vocab_size)
    got = logits(config, jax.device_put(params), tokens)
    want = logits(config, float_params, tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("chunk_values", [1 << 22, 96], ids=["one_chunk", "many_chunks"])
def test_a_whole_table_decodes_in_either_layout(tiny_gguf, monkeypatch, tmp_path, chunk_values):
    """An unstacked kernel (the tied embedding, one layer's slice of a stacked kernel) decoded
    chunk by chunk into its own layout or its transpose is the float loader's array exactly."""
    monkeypatch.setattr(linear, "_DECODE_CHUNK_VALUES", chunk_values)
    _, params, _ = convert_gguf.load_gguf(tiny_gguf, quantized=True)
    _, float_params, _ = convert_gguf.load_gguf(tiny_gguf)
    table, want = params["embedding"], np.asarray(float_params["embedding"])  # [V, D]
    assert linear._row_chunks(*want.shape) > (1 if chunk_values == 96 else 0)
    np.testing.assert_array_equal(linear.dense(table, jnp.float32), want)
    np.testing.assert_array_equal(linear.dense_transposed(table, jnp.float32), want.T)
    # A Linear weight's rows are its outputs: one layer of v_kernel [D, K, Dh], and an untied
    # head read as [D, V] from rows [V, D] (the same blocks, marked transposed).
    v_layer = jax.tree.map(lambda a: a[1], params["layers"]["attn"]["v_kernel"])
    want_v = np.asarray(float_params["layers"]["attn"]["v_kernel"][1])
    np.testing.assert_array_equal(linear.dense(v_layer, jnp.float32), want_v)
    head = linear.Quantized(
        table.data, table.type_index, table.type_names, want.shape[::-1], transposed=True
    )
    np.testing.assert_array_equal(linear.dense(head, jnp.float32), want.T)
    np.testing.assert_array_equal(linear.dense_transposed(head, jnp.float32), want)
    # The export's blocks of rows, and the file written from them.
    blocks = [np.asarray(block) for block in linear.dense_row_blocks(table, jnp.float32)]
    assert len(blocks) == linear._row_chunks(*want.shape)
    np.testing.assert_array_equal(np.concatenate(blocks), want)
    config = convert_gguf.load_gguf(tiny_gguf, quantized=True)[0]
    convert_hf.save_hf(str(tmp_path), config, params)
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), "np") as written:
        np.testing.assert_array_equal(written.get_tensor("model.embed_tokens.weight"), want)


def test_row_blocks_that_do_not_fill_the_tensor_are_named(tmp_path):
    path = str(tmp_path / "t.safetensors")
    blocks = RowBlocks((4, 2), np.float32, [np.zeros((3, 2), np.float32)])
    with pytest.raises(ValueError, match=r"t.safetensors: the blocks of 'w' hold 3 rows of 4"):
        write_safetensors_streamed(path, [("w", (4, 2), np.float32)], [("w", blocks)], {})


def _qlora_config(tiny_gguf, **changes):
    settings = dict(
        model__source="gguf", model__gguf_path=str(tiny_gguf), model__quantized=True,
        data__tokenizer="model", data__max_length=48, data__max_prompt_length=24,
        lora__rank=4, dpo__reference="adapters_off", sft__num_steps=0,
    )  # fmt: skip
    return tiny_config(**{**settings, **changes})


def _train_losses(workdir):
    records = map(json.loads, (workdir / "dpo" / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["split"] == "train"]


def test_qlora_dpo_trains_and_both_exports_load(tiny_gguf, tmp_path):
    """The main job over the quantised base: the loss falls (8 steps on one batch of 8 pairs),
    each step's loss is LoRA's over the float (dequantised) base, the merged export (dequantised
    base + adapters, float) reads in transformers, and PEFT's adapters over the exported base
    give its logits."""
    changes = dict(
        checkpoint__export_hf=True, optimizer__learning_rate=1e-3, lora__dropout=0.05,
        dpo__num_steps=8, data__num_train_pairs=8, data__batch_size=8, log__every_steps=1,
    )  # fmt: skip
    train.train_and_evaluate(_qlora_config(tiny_gguf, **changes), str(tmp_path / "q"))
    losses = _train_losses(tmp_path / "q")
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    float_config = _qlora_config(tiny_gguf, **changes)
    float_config.model.quantized = False
    train.train_and_evaluate(float_config, str(tmp_path / "f"))
    np.testing.assert_allclose(losses, _train_losses(tmp_path / "f"), rtol=1e-5)
    tmp_path = tmp_path / "q"
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf_base", attn_implementation="eager"
    ).eval()
    with_adapters = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    import torch

    tokens = np.asarray(_tokens(merged.config.vocab_size))
    with torch.no_grad():
        want = merged(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
        got = with_adapters(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-4)
    _, float_base, _ = convert_gguf.load_gguf(tiny_gguf)
    # The exported base is the file's weights dequantised.
    np.testing.assert_array_equal(
        base.model.embed_tokens.weight.detach().numpy(), float_base["embedding"]
    )


def test_bad_qlora_settings_are_one_line(tiny_gguf, tmp_path):
    with pytest.raises(ValueError, match=r"config.model.quantized=True keeps the base frozen"):
        train.check_config(_qlora_config(tiny_gguf, lora__rank=0, dpo__reference="frozen"))
    with pytest.raises(ValueError, match=r"quantized=True needs a pretrained base"):
        train.check_config(tiny_config(model__quantized=True, lora__rank=4))
    # A block type gguf_blocks does not decode is named, with the supported ones.
    q4_1 = _write_tiny_gguf(
        tmp_path / "q4_1.gguf", quantize={**_plan(), "blk.2.ffn_up.weight": "Q4_1"}
    )
    with pytest.raises(ValueError) as error:
        convert_gguf.load_gguf(q4_1, quantized=True)
    assert str(error.value) == (
        f"{q4_1}: tensor 'blk.2.ffn_up.weight' is Q4_1, a block type the quantised base cannot "
        "keep (supported: F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K, Q6_K)"
    )
    # A target stored as floats in the file is not a quantised kernel.
    float_up = _write_tiny_gguf(tmp_path / "float_up.gguf", quantize=_plan(skip=("ffn_up",)))
    _, params, _ = convert_gguf.load_gguf(float_up, quantized=True)
    spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("mlp/(up|down)_kernel",))
    with pytest.raises(ValueError) as error:
        lora.check_quantized_targets(params, spec)
    kernels = "k_kernel, o_kernel, q_kernel, v_kernel, mlp/down_kernel, mlp/gate_kernel"
    assert str(error.value) == (
        "config.lora.targets: layers/mlp/up_kernel is stored as F32, not a quantised kernel "
        "(config.model.quantized=True adapts quantised kernels; this model's: "
        + ", ".join(f"layers/{'attn/' if 'mlp' not in k else ''}{k}" for k in kernels.split(", "))
        + ")"
    )


@pytest.mark.parametrize("type_name", quantize.HF_TYPES)
def test_a_float_checkpoint_is_quantised_on_load_by_gguf_s_quantiser(type_name, tmp_path):
    import gguf

    model = _hf_model("llama", seed=2)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = load_hf(str(tmp_path), quantized_type=type_name)
    _, float_params = load_hf(str(tmp_path))
    q_kernel = params["layers"]["attn"]["q_kernel"]
    assert isinstance(q_kernel, linear.Quantized) and q_kernel.type_names == (type_name,)
    # The blocks are gguf's quantiser's, and read back as gguf's dequantiser reads them.
    kind = gguf.GGMLQuantizationType[type_name]
    weight = model.state_dict()["model.layers.1.self_attn.q_proj.weight"].numpy()
    raw = gguf.quants.quantize(weight, kind)
    np.testing.assert_array_equal(np.asarray(q_kernel.data[1]), raw)
    dequantized = linear.dense_params(params)["layers"]["attn"]["q_kernel"][1]
    expected = gguf.quants.dequantize(raw, kind).T.reshape(q_kernel.kernel_shape)
    np.testing.assert_array_equal(np.asarray(dequantized), expected)
    tokens, mask = _padded_batch(config.vocab_size, seed=2)
    got = _our_logits(config, jax.device_put(params), tokens, mask)
    want = _our_logits(config, float_params, tokens, mask)
    diff = np.max(np.abs(got - want)[mask])
    print(f"{type_name}: max |logit difference| {diff:.4f} of max |logit| {np.abs(want).max():.2f}")
    assert diff <= HF_LOGIT_BOUND[type_name]


@pytest.mark.slow
def test_gemma3_270m_over_its_own_blocks_gives_the_dequantised_model_s_logits(
    gguf_path, gemma3_270m
):
    """The packaged file's Q4_K_M blocks (Q8_0, Q5_0, Q4_K, Q6_K) read by the model against the
    float32 model dequantised on load: measured 9.3e-5 at most over logits up to 26.9 (float32
    rounding of the same weights summed in another order), the same greedy tokens."""
    config, params, tokenizer = convert_gguf.load_gguf(gguf_path, quantized=True)
    float_config, float_params, _ = gemma3_270m
    assert {name for kernel in jax.tree.leaves(params, is_leaf=linear.is_node)
            if isinstance(kernel, linear.Quantized) for name in kernel.type_names} == {
        "Q8_0", "Q5_0", "Q4_K", "Q6_K"}  # fmt: skip
    ids = tokenizer.encode("The capital of France is the city of lights, and")
    tokens = jnp.asarray([ids], jnp.int32)
    got = np.asarray(logits(config, jax.device_put(params), tokens))
    want = np.asarray(logits(float_config, float_params, tokens))
    diff = np.max(np.abs(got - want))
    print(
        f"Gemma 3 270M blocks vs float32: max |logit difference| {diff:.2e}, "
        f"max |logit| {np.max(np.abs(want)):.1f}"
    )  # fmt: skip  (docs/lora.md quotes it)
    assert diff <= 2e-4
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
