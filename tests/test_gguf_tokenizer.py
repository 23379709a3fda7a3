"""The GGUF tokenizer alone: metadata read without gguf.GGUFReader, against GGUFReader itself."""

import gguf
import numpy as np
import pytest
from test_gemma3_gguf import FRANCE, FRANCE_IDS, _write_tiny_gguf

from dpo_jax.models import convert_gguf
from dpo_jax.models.gguf_metadata import read_gguf_metadata

TEXTS = ["abcd", "ab cd", " abcd\nc", "dcba", "ab<start_of_turn>c"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_metadata_equals_gguf_reader(tiny):
    ours = read_gguf_metadata(tiny)
    reader = gguf.GGUFReader(str(tiny))
    fields = {key: field for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    assert set(ours) == set(fields)
    for key, field in fields.items():
        expected = field.contents()
        if isinstance(expected, list):
            assert list(np.asarray(ours[key]).tolist()) == list(expected), key
        else:
            assert ours[key] == pytest.approx(expected), key


def test_tokenizer_alone_equals_the_full_loader(tiny):
    alone = convert_gguf.load_gguf_tokenizer(tiny)
    _, _, full = convert_gguf.gguf_to_hf(tiny)
    assert (alone.bos_id, alone.eos_id, alone.pad_id, alone.unk_id, alone.add_bos) == (
        full.bos_id,
        full.eos_id,
        full.pad_id,
        full.unk_id,
        full.add_bos,
    )
    assert alone.vocab_size == full.vocab_size
    for text in TEXTS:
        assert alone.encode(text) == full.encode(text), text


def test_damaged_or_foreign_files_are_errors(tiny, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or damaged header"):
        read_gguf_metadata(truncated)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert_gguf.load_gguf_tokenizer(foreign)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        convert_gguf.load_gguf_tokenizer(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_gemma3_tokenizer_alone_gives_the_known_ids(gguf_path):
    tokenizer = convert_gguf.load_gguf_tokenizer(gguf_path)
    assert tokenizer.encode(FRANCE) == FRANCE_IDS
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (2, 1, 0)
    assert tokenizer.add_bos is True and tokenizer.vocab_size == 262_144
