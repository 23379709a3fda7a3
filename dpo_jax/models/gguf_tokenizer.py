"""The tokenizer of a GGUF file: its SentencePiece BPE pieces as a `tokenizers` BPE, and the
project's `Tokenizer` around it (split from `convert_gguf`, which reads the weights)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers

from dpo_jax.tokenizer import Tokenizer

SUPPORTED_TOKENIZERS = ("llama",)  # SentencePiece BPE: scores rank the pieces, no merges list

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_MAX_VOCAB = 1 << 22  # a header claiming more pieces is damaged, not a vocabulary


def load_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a GGUF file alone, in seconds: only the metadata is read (no tensors, no
    `GGUFReader`), then the same `Tokenizer` as `load_gguf` returns is built.

    Raises:
      FileNotFoundError: no file at `path`.
      ValueError: not a GGUF file, a damaged header, or an unsupported tokenizer.
    """
    from dpo_jax.models.gguf_metadata import read_gguf_metadata

    path = os.fspath(path)
    metadata = read_gguf_metadata(path)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key not in metadata:
            raise ValueError(f"{path}: GGUF metadata has no {key!r}")
    return tokenizer_from_pieces(
        list(metadata["tokenizer.ggml.tokens"]),
        np.asarray(metadata["tokenizer.ggml.scores"], np.float32),
        np.asarray(metadata["tokenizer.ggml.token_type"], np.int64),
        metadata,
        path,
    )


def tokenizer_from_pieces(tokens, scores, types, metadata: dict[str, Any], path: str) -> Tokenizer:
    """The `Tokenizer` of a GGUF's pieces [V], scores [V], token types [V] and its metadata.

    Raises:
      ValueError: an unsupported tokenizer model, mismatched lengths, an absurd vocabulary size or
        a special-token id outside it (each naming `path`).
    """
    model = metadata.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZERS:
        raise ValueError(
            f"{path}: tokenizer.ggml.model={model!r} is not supported "
            f"(supported: {list(SUPPORTED_TOKENIZERS)})"
        )
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(
            f"{path}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} token types"
        )
    if not 0 < len(tokens) <= _MAX_VOCAB:
        raise ValueError(f"{path}: vocabulary size {len(tokens)} must be in [1, {_MAX_VOCAB}]")

    def special(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary")
        return tokens[token_id]

    backend = sentencepiece_bpe(
        tokens,
        scores,
        types,
        unk_token=special("unknown_token_id"),
        add_space_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
    )
    return Tokenizer(
        backend,
        bos_token=special("bos_token_id"),
        eos_token=special("eos_token_id"),
        pad_token=special("padding_token_id"),
        unk_token=special("unknown_token_id"),
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
        chat_template_source=f"{path}'s tokenizer.chat_template",
    )


def sentencepiece_bpe(
    tokens: list[str],
    scores: np.ndarray,
    token_types: np.ndarray,
    *,
    unk_token: str | None,
    add_space_prefix: bool = False,
) -> tokenizers.Tokenizer:
    """A `tokenizers` BPE that encodes as SentencePiece's BPE does, from a piece list alone.

    SentencePiece BPE repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring normal piece; GGUF keeps the pieces and scores but no merges list. So every
    split of a normal piece into two normal pieces becomes a merge, ranked by the merged piece's
    score (then by id). Spaces become "▁" (no pre-tokenizer: pieces may span words), characters
    outside the vocabulary fall back to <0xNN> byte pieces, control pieces (<bos>, <start_of_turn>)
    are special added tokens and user-defined pieces ("\\n\\n", "<b>") are added tokens matched
    whole, as SentencePiece matches them before merging.

    Args:
      tokens: [V] piece strings; the id of a piece is its index.
      scores: [V] float32, higher merges first.
      token_types: [V] int, GGUF token types (1 normal, 3 control, 4 user-defined, 6 byte).
      unk_token: the unknown piece, or None.
      add_space_prefix: prepend "▁" to the text (Llama 2 style); Gemma 3 does not.

    Returns:
      The `tokenizers.Tokenizer`.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"the vocabulary has {len(tokens) - len(vocab)} duplicate pieces")
    normal = {token: index for token, index in vocab.items() if token_types[index] == _NORMAL}
    ranked = []
    for token, index in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-float(scores[index]), index, normal[left], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    backend = tokenizers.Tokenizer(
        models.BPE(vocab, merges, unk_token=unk_token, byte_fallback=True, fuse_unk=True)
    )
    replace = normalizers.Replace(" ", "▁")
    backend.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), replace]) if add_space_prefix else replace
    )
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode_steps)
    # Added tokens are matched in the raw text, before spaces become "▁": user-defined pieces of
    # spaces ("  ") then match runs of spaces, as SentencePiece matches them.
    backend.add_tokens(
        [
            AddedToken(tokens[index], special=token_types[index] == _CONTROL, normalized=False)
            for index in range(len(tokens))
            if token_types[index] in (_CONTROL, _USER_DEFINED)
        ]
    )
    return backend
