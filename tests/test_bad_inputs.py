"""Bad input named: each message says what is wrong and where (file and line, record, tensor,
template), as the main job prints it (`dpo_jax.run.errors.user_message`)."""

import json
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from test_step_options import _tiny_model as tiny_llama  # noqa: E402
from test_train_step import tiny_config  # noqa: E402
from tiny_tokenizers import make_word_tokenizer  # noqa: E402

from dpo_jax import sharding  # noqa: E402
from dpo_jax.data import records  # noqa: E402
from dpo_jax.models import init_params, load_hf, save_hf  # noqa: E402
from dpo_jax.run import build, errors, train  # noqa: E402

ONE_DEVICE = sharding.make_mesh(1, 1, 1, num_devices=1)  # the mesh the data builders read

PAIR = {"prompt": "a", "chosen": "b", "rejected": "c"}
CONVERSATION = {
    "prompt": [{"role": "user", "content": "a"}],
    "chosen": [{"role": "assistant", "content": "b"}],
    "rejected": [{"role": "assistant", "content": "c"}],
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_a_line_that_is_not_utf8_names_the_file_and_line(tmp_path):
    line = json.dumps(PAIR).encode()
    path = _write(tmp_path / "pairs.jsonl", line + b"\n" + line.replace(b'"a"', b'"\xff"') + b"\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not valid UTF-8 \(byte 0xff"):
        records.load_records(path)


def test_a_json_array_file_is_read_and_an_array_line_is_named(tmp_path):
    array = json.dumps([PAIR, PAIR]).encode()
    loaded = records.load_records(_write(tmp_path / "pairs.json", array))
    assert [r.where for r in loaded] == [f"{tmp_path}/pairs.json[0]", f"{tmp_path}/pairs.json[1]"]
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: a JSON array, not an object"):
        records.load_records(_write(tmp_path / "pairs.jsonl", array))


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}{{ m.content }", r"syntax error at line 1: unexpected '}'"),
        (
            "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
            r"recursed without end while rendering",
        ),
    ],
)
def test_a_broken_chat_template_is_named_with_the_record(template, message):
    raw = records.from_sequence([CONVERSATION], name="pairs.jsonl")[0]
    with pytest.raises(ValueError, match=r"pairs.jsonl\[0\]: the chat template .*" + message[:20]):
        records.normalize_record(raw, make_word_tokenizer(chat_template=template))


def test_an_unknown_chat_role_is_named_not_reported_as_a_prefix_mismatch():
    bad = {**CONVERSATION, "prompt": [{"role": "wizard", "content": "a"}]}
    raw = records.from_sequence([bad], name="pairs.jsonl")[0]
    with pytest.raises(ValueError, match=r"pairs.jsonl\[0\]: messages\[0\] has role 'wizard'"):
        records.normalize_record(raw, make_word_tokenizer())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    config = tiny_llama()  # the 1-layer Llama of the step-option tests
    directory = tmp_path_factory.mktemp("hf")
    save_hf(str(directory), config, jax.device_get(init_params(config, jax.random.key(0))))
    return directory


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_safetensors_file_names_its_path(tmp_path, hf_dir, damage):
    weights = tmp_path / "model.safetensors"
    data = (hf_dir / "model.safetensors").read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file"):
        load_hf(str(tmp_path))


def test_a_malformed_config_json_names_its_path(tmp_path, hf_dir):
    (tmp_path / "config.json").write_text("{oops")
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=rf"{tmp_path}/config.json: not valid JSON"):
        load_hf(str(tmp_path))


def test_a_full_disk_is_one_clear_message(tmp_path, hf_dir):
    # config.json is written beside its place, then renamed over it: writing that fails here
    os.symlink("/dev/full", tmp_path / "config.json.tmp")
    config, params = load_hf(str(hf_dir))
    with pytest.raises(OSError) as caught:
        save_hf(str(tmp_path), config, jax.device_get(params))
    assert errors.user_message(caught.value).startswith("no space left on the device")


def _english(path, count):
    with open(path, "w") as f:
        for i in range(count):
            record = {
                "prompt": f"Which colour is the sky on a clear day, number {i}?",
                "chosen": "It is blue.",
                "rejected": "It is green.",
            }
            f.write(json.dumps(record) + "\n")
    return str(path)


def test_a_tokenizer_that_does_not_fit_the_data_is_an_error_with_the_counts(tmp_path):
    # The synthetic task's word-level tokenizer on English: nearly every word is <unk>.
    source = _english(tmp_path / "english.jsonl", 8)
    config = tiny_config(data__source=source, data__eval_source="")
    tokenizer = train.synthetic.make_tokenizer()
    with pytest.raises(ValueError, match=r"english.jsonl: the tokenizer does not fit this data: "):
        build._train_batches(config, tokenizer, source, {}, "dpo", ONE_DEVICE)
    config.data.max_unknown_token_rate = 1.0  # turned off, the pipeline's counts tell the rest:
    with pytest.raises(ValueError, match="dropped: chosen_equals_rejected_after_truncation=8"):
        build._train_batches(
            config, tokenizer, source, {}, "dpo", ONE_DEVICE
        )  # "blue" and "green": <unk>


def test_fewer_records_than_one_batch_is_an_error(tmp_path):
    records_path = tmp_path / "few.jsonl"
    records_path.write_text(
        "".join(json.dumps({**PAIR, "chosen": f"b{i}"}) + "\n" for i in range(3))
    )
    config = tiny_config(data__max_unknown_token_rate=1.0)
    with pytest.raises(ValueError, match=r"few.jsonl: 3 rows of kept pairs, fewer than one batch"):
        build._train_batches(
            config, make_word_tokenizer(), str(records_path), {}, "dpo", ONE_DEVICE
        )
