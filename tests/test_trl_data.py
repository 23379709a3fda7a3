"""Token rows against TRL 1.16's own data code: `DPOTrainer._prepare_dataset` + its collator.

A SentencePiece-style BPE (Metaspace, bos added by the post-processor, as Llama's) is trained here
and wrapped both as a transformers tokenizer (TRL's side) and by `Tokenizer.from_transformers`
(ours). With `boundary="joint"` dpo_jax's rows, response masks and kept records equal TRL's for
explicit, implicit and conversational records, with and without truncation; `"separate"`
differs exactly where a prompt ends in a space. Unpaired (KTO) records equal KTOTrainer's.
"""

import types

import datasets
import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

from dpo_jax.data.batching import collate_rows
from dpo_jax.data.records import from_sequence
from dpo_jax.data.tokenize import tokenize_records, tokenize_unpaired_records
from dpo_jax.tokenizer import Tokenizer

CORPUS = [
    "The sky is blue. The grass is green. Water is wet.",
    "What colour is the sky? It is blue, and at night it is black.",
    "Say yes or no. Yes. No. Maybe.",
] * 20
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
EXPLICIT = [
    {"prompt": "The sky is ", "chosen": "blue.", "rejected": "green."},  # ends in a space
    {"prompt": "What colour is the sky?\n", "chosen": "It is blue.", "rejected": "No."},
    {"prompt": "Say yes or no.", "chosen": " Yes.", "rejected": " No."},
    {"prompt": "Water is", "chosen": " wet.</s>", "rejected": " green."},  # eos already there
]
IMPLICIT = [
    {"chosen": "The grass is green.", "rejected": "The grass is blue."},
    {"chosen": "Say yes or no. Yes.", "rejected": "Say yes or no. Maybe."},
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "What colour is the sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    },
]
# TRL extracts a prompt only when the first record has none: records without one go apart.
CONVERSATIONAL_IMPLICIT = [
    {
        "chosen": [
            {"role": "user", "content": "Say yes or no."},
            {"role": "assistant", "content": "Yes."},
        ],
        "rejected": [
            {"role": "user", "content": "Say yes or no."},
            {"role": "assistant", "content": "Maybe, maybe not."},
        ],
    },
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    special = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special, show_progress=False)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def trl_batch(records, hf_tokenizer, max_length=None):
    """input_ids, attention_mask, completion_mask [2N', T] from TRL's dataset code and collator."""
    stand_in = types.SimpleNamespace(_tokenizer=hf_tokenizer)
    args = types.SimpleNamespace(
        dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start"
    )
    dataset = DPOTrainer._prepare_dataset(
        stand_in, datasets.Dataset.from_list(records), hf_tokenizer, args, "train"
    )
    examples = [
        {key: example[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for example in dataset
    ]
    collator = DataCollatorForPreference(
        pad_token_id=hf_tokenizer.pad_token_id, max_length=max_length
    )
    return {key: value.numpy() for key, value in collator.torch_call(examples).items()}


def our_batch(records, hf_tokenizer, width, boundary, max_length=64):
    """Our rows for the same records, laid out as TRL's [chosen rows; rejected rows]."""
    tokenizer = Tokenizer.from_transformers(hf_tokenizer)
    pairs, stats = tokenize_records(
        from_sequence(records),
        tokenizer,
        max_length=max_length,
        truncation_mode="keep_start",
        boundary=boundary,
        response_marker="",  # TRL's extract_prompt knows no turn marker
    )
    batch = collate_rows(
        [[pair] for pair in pairs],
        num_rows=len(pairs),
        max_length=width,
        pairs_per_row=1,
        pad_id=tokenizer.pad_id,
    )
    stack = lambda x: np.concatenate([x[:, 0], x[:, 1]]).astype(np.int64)  # noqa: E731
    return {
        "input_ids": stack(batch["tokens"]),
        "attention_mask": stack(batch["segment_ids"] > 0),
        "completion_mask": stack(batch["response_mask"]),
    }, stats


@pytest.mark.parametrize(
    "records",
    [EXPLICIT, IMPLICIT, CONVERSATIONAL, CONVERSATIONAL_IMPLICIT],
    ids=["explicit", "implicit", "conversational", "conversational_implicit"],
)
def test_joint_boundary_rows_equal_trl(records, hf_tokenizer):
    expected = trl_batch(records, hf_tokenizer)
    got, stats = our_batch(records, hf_tokenizer, expected["input_ids"].shape[1], "joint")
    assert stats.kept == len(records)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


@pytest.mark.parametrize("max_length", [6, 9])
def test_keep_start_truncation_equals_trl(max_length, hf_tokenizer):
    # TRL cuts each row to its first max_length tokens and drops a record whose prompt fills
    # them; ours cuts each response to max_length − len(prompt) and drops the same records.
    records = EXPLICIT
    expected = trl_batch(records, hf_tokenizer, max_length=max_length)
    got, stats = our_batch(
        records, hf_tokenizer, expected["input_ids"].shape[1], "joint", max_length=max_length
    )
    assert stats.kept == expected["input_ids"].shape[0] // 2
    assert stats.dropped["no_response_tokens"] == len(records) - stats.kept
    for key in ("input_ids", "attention_mask", "completion_mask"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_separate_boundary_differs_where_the_prompt_ends_in_a_space(hf_tokenizer):
    # "The sky is " alone ends in the token "▁" that "The sky is blue." merges into "▁blue":
    # TRL (and joint) score "▁blue", separate keeps "▁" in the prompt and scores "blue" after it.
    record = EXPLICIT[:1]
    expected = trl_batch(record, hf_tokenizer)
    width = expected["input_ids"].shape[1] + 2
    separate, _ = our_batch(record, hf_tokenizer, width, "separate")
    ours_tokenizer = Tokenizer.from_transformers(hf_tokenizer)
    prompt = separate["input_ids"][0][~separate["completion_mask"][0].astype(bool)]
    trl_prompt = expected["input_ids"][0][~expected["completion_mask"][0].astype(bool)]
    assert ours_tokenizer.decode(prompt[prompt != ours_tokenizer.pad_id]).endswith("is ")
    assert len(prompt[prompt != ours_tokenizer.pad_id]) == len(trl_prompt) + 1


KTO_RECORDS = [
    {"prompt": "The sky is ", "completion": "blue.", "label": True},
    {"prompt": "The grass is", "completion": " red.", "label": False},
    {"prompt": "Say yes or no.", "completion": " Yes.", "label": True},
    {"prompt": "Water is", "completion": " dry.", "label": False},
    {"prompt": "What colour is the sky?", "completion": " Green.", "label": False},
]


def test_unpaired_records_equal_trl_kto(hf_tokenizer):
    # KTOTrainer's dataset code: prompt + completion as one text, eos added, completions rotated
    # by one within each run of per_device_train_batch_size records for the KL term.
    stand_in = types.SimpleNamespace(
        _tokenizer=hf_tokenizer, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0
    )
    args = types.SimpleNamespace(
        dataset_num_proc=None, max_length=None, per_device_train_batch_size=2
    )
    dataset = KTOTrainer._prepare_dataset(
        stand_in, datasets.Dataset.from_list(KTO_RECORDS), hf_tokenizer, args, "train"
    )
    pairs, _ = tokenize_unpaired_records(
        from_sequence(KTO_RECORDS),
        Tokenizer.from_transformers(hf_tokenizer),
        max_length=64,
        kl_group_size=2,
        boundary="joint",
    )
    for example, pair in zip(dataset, pairs, strict=True):
        assert pair.prompt_ids.tolist() == example["prompt_ids"]
        assert pair.chosen_ids.tolist() == example["completion_ids"]
        assert pair.rejected_ids.tolist() == example["KL_completion_ids"]
        assert pair.label is example["label"]
