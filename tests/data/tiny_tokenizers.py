"""Tiny word-level tokenizers for the data tests, built in code (no download).

Ids are positions in VOCAB: <pad>=0 <bos>=1 <eos>=2 <unk>=3, then the words from 4 on, so a
test can write its expected ids by hand.
"""

import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from dpo_jax.tokenizer import Tokenizer

VOCAB = (
    "<pad> <bos> <eos> <unk> "  # 0-3
    "a b c d e f g h "  # 4-11
    "Human: Assistant: <user> <assistant> <end>"  # 12-16
).split()
ID = {token: i for i, token in enumerate(VOCAB)}
# Each turn is "<role> content <end>"; the generation prompt opens the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_word_tokenizer(*, add_bos=True, chat_template=CHAT_TEMPLATE, eos=True):
    backend = tokenizers.Tokenizer(WordLevel(dict(ID), unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<bos>", "<eos>", "<unk>"])
    return Tokenizer(
        backend,
        bos_token="<bos>" if add_bos else None,
        eos_token="<eos>" if eos else None,
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos=add_bos,
        chat_template=chat_template,
    )


def ids(text):
    """Ids of whitespace-separated tokens, for writing expectations."""
    return [ID[token] for token in text.split()]
