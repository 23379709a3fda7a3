"""dpo_jax.tokenizer against transformers' own tokenizer and chat-template renderer."""

import json
import types

import jinja2
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from dpo_jax.tokenizer import Tokenizer, check_tokenizer_fits

_CORPUS = [
    "The capital of France is Paris.",
    "Preference pairs hold a chosen and a rejected answer.",
    "Hello there! How are you today? I am fine, thank you.",
    "Direct preference optimisation needs a frozen reference model.",
] * 20

_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]

# Exercises what transformers' environment provides: trim_blocks/lstrip_blocks, loop controls,
# raise_exception, tojson (without HTML escaping), the special token variables, extra variables.
_CHAT_TEMPLATE = """{{ bos_token }}
{% if tools %}
<|tools|>{{ tools | tojson }}
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' and skip_system %}
        {% continue %}
    {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "  Be brief & <polite>.  "},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": 'Say "yes".'},
    ],
    [{"role": "user", "content": "Ünïcödé — ok? 😀"}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def backend():
    """A byte-level BPE trained here on a tiny corpus, with bos/eos/pad/unk special tokens."""
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    # Like Llama's tokenizer.json: the post-processor adds bos when special tokens are requested.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    return tokenizer


@pytest.fixture(scope="module")
def ours(backend):
    return Tokenizer(
        backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos=True,
        chat_template=_CHAT_TEMPLATE,
    )


@pytest.fixture(scope="module")
def reference(backend):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=_CHAT_TEMPLATE,
    )


def test_special_ids_and_sizes(ours, backend):
    assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id) == (0, 1, 2, 3)
    assert ours.add_bos is True
    assert ours.vocab_size == backend.get_vocab_size() == 300


@pytest.mark.parametrize("text", _CORPUS[:4] + ["unseen wörds, 123!", "", "  two  spaces "])
def test_encode_decode_match_transformers(ours, reference, text):
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ours.bos_id not in ids  # encode never adds special tokens
    assert ours.decode(ids) == reference.decode(ids) == text


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", _CONVERSATIONS)
def test_chat_template_matches_transformers(ours, reference, conversation, add_generation_prompt):
    got = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    want = reference.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert got == want
    assert got.startswith("<bos>\n<|")
    assert got.endswith("<|assistant|>\n") == add_generation_prompt


def test_chat_template_extra_variables_and_tools(ours, reference):
    conversation = _CONVERSATIONS[1]
    tools = [{"name": "lookup", "description": "finds <things> & more"}]
    got = ours.apply_chat_template(conversation, skip_system=True, tools=tools)
    want = reference.apply_chat_template(
        conversation, skip_system=True, tools=tools, tokenize=False
    )
    assert got == want
    assert "Be brief" not in got
    assert '<|tools|>[{"name": "lookup", "description": "finds <things> & more"}]' in got


def test_chat_template_builtins(backend):
    template = "{{ strftime_now('%Y') }}|{{ messages | length }}|{{ eos_token }}"
    tokenizer = Tokenizer(backend, eos_token="<eos>", chat_template=template)
    year, count, eos = tokenizer.apply_chat_template(_CONVERSATIONS[1]).split("|")
    assert (len(year), year.isdigit(), count, eos) == (4, True, "4", "<eos>")


def test_chat_template_is_sandboxed(backend):
    # The immutable sandbox refuses to reach Python internals or mutate the messages.
    escape = Tokenizer(backend, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        escape.apply_chat_template(_CONVERSATIONS[0])
    mutate = Tokenizer(backend, chat_template="{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        mutate.apply_chat_template(_CONVERSATIONS[0])


def test_chat_template_raise_exception(ours, reference):
    conversation = [{"role": "tool", "content": "42"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role: tool"):
        ours.apply_chat_template(conversation)
    with pytest.raises(jinja2.TemplateError, match="unknown role: tool"):
        reference.apply_chat_template(conversation, tokenize=False)


@pytest.mark.parametrize(
    "messages, match",
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant"}],
            r"messages\[1\] has no 'content'",
        ),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user", "content": "hi"}, "hello"], r"messages\[1\] must be a dict"),
        ("hello", "messages must be a list"),
    ],
)
def test_chat_template_rejects_bad_messages(ours, messages, match):
    with pytest.raises(ValueError, match=match):
        ours.apply_chat_template(messages)


def test_no_chat_template(backend):
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(backend).apply_chat_template(_CONVERSATIONS[0])


def test_unknown_special_token(backend):
    with pytest.raises(ValueError, match="eos_token='</s>' is not in the tokenizer's vocabulary"):
        Tokenizer(backend, eos_token="</s>")


def _save_dir(backend, path, config):
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_from_dir_matches_transformers(backend, tmp_path):
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"content": "<bos>", "__type": "AddedToken"},  # the older, dict form
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "chat_template": _CHAT_TEMPLATE,
    }
    path = _save_dir(backend, tmp_path / "tok", config)
    ours = Tokenizer.from_dir(path)
    reference = transformers.AutoTokenizer.from_pretrained(path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (2, 1, 0, True)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    text = _CORPUS[2]
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)
    assert [ours.bos_id] + ours.encode(text) == reference.encode(text)
    for conversation in _CONVERSATIONS:
        assert ours.apply_chat_template(conversation, True) == reference.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )


@pytest.mark.parametrize("post_processor_adds_bos", [True, False])
def test_from_dir_infers_add_bos_from_post_processor(backend, tmp_path, post_processor_adds_bos):
    # Llama 3 and Qwen configs do not say add_bos_token; the post-processor decides.
    backend = tokenizers.Tokenizer.from_str(backend.to_str())
    if not post_processor_adds_bos:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"bos_token": "<bos>", "eos_token": "<eos>"}
    ours = Tokenizer.from_dir(_save_dir(backend, tmp_path / "tok", config))
    assert ours.add_bos is post_processor_adds_bos
    assert ours.pad_id == ours.eos_id == 1  # no pad token: falls back to eos
    assert ours.chat_template is None


def test_from_dir_chat_template_list_and_file(backend, tmp_path):
    config = {
        "chat_template": [
            {"name": "tool_use", "template": "x"},
            {"name": "default", "template": "d"},
        ]
    }
    assert Tokenizer.from_dir(_save_dir(backend, tmp_path / "a", config)).chat_template == "d"
    path = _save_dir(backend, tmp_path / "b", {})
    (path / "chat_template.jinja").write_text("from file")
    assert Tokenizer.from_dir(path).chat_template == "from file"


@pytest.mark.parametrize("missing", ["tokenizer.json", "tokenizer_config.json"])
def test_from_dir_missing_file(backend, tmp_path, missing):
    path = _save_dir(backend, tmp_path / "tok", {"eos_token": "<eos>"})
    (path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=str(path / missing)):
        Tokenizer.from_dir(path)


def test_from_dir_bad_special_token(backend, tmp_path):
    path = _save_dir(backend, tmp_path / "tok", {"eos_token": 7})
    with pytest.raises(ValueError, match="tokenizer_config.json: eos_token"):
        Tokenizer.from_dir(path)


def test_check_tokenizer_fits(ours):
    check_tokenizer_fits(ours, types.SimpleNamespace(vocab_size=300))
    check_tokenizer_fits(ours, types.SimpleNamespace(vocab_size=320))  # padded embedding: fine
    with pytest.raises(ValueError, match="tokenizer vocabulary size 300 .* vocab_size 256"):
        check_tokenizer_fits(ours, types.SimpleNamespace(vocab_size=256))


def test_from_transformers_matches_the_tokenizer_it_wraps(backend, tmp_path):
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": _CHAT_TEMPLATE,
    }
    reference = transformers.AutoTokenizer.from_pretrained(
        _save_dir(backend, tmp_path / "t", config)
    )
    reference.backend_tokenizer.enable_truncation(4)  # a setting on the original, not the copy
    ours = Tokenizer.from_transformers(reference)
    reference.backend_tokenizer.no_truncation()
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
        reference.unk_token_id,
    )
    assert ours.add_bos is True  # the post-processor adds bos
    for text in _CORPUS[:4]:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False)
        assert [ours.bos_id] + ours.encode(text) == reference.encode(text)
    for conversation in _CONVERSATIONS:
        assert ours.apply_chat_template(conversation, True) == reference.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )


def test_from_transformers_reads_add_bos_token_and_refuses_slow_tokenizers(reference):
    assert Tokenizer.from_transformers(types.SimpleNamespace(
        backend_tokenizer=reference.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
        add_bos_token=False,
    )).add_bos is False  # fmt: skip
    with pytest.raises(TypeError, match="needs a fast tokenizer .* found SimpleNamespace"):
        Tokenizer.from_transformers(types.SimpleNamespace(bos_token="<bos>"))
