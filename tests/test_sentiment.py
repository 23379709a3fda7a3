"""The sentiment experiment (dpo_jax.experiments.sentiment): its openings, its stop tokens, and a
tiny version of the whole run end to end, on a model and a word-level tokenizer built here."""

import csv
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
import tokenizers

from dpo_jax.experiments import review_openings, sentiment
from dpo_jax.models import ModelConfig, init_params, save_hf
from dpo_jax.tokenizer import Tokenizer

_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
# Sentiment words the tiny model can say, and plain ones: what VADER scores and what it ignores.
_POSITIVE = ("good", "great", "wonderful", "lovely", "fun", "brilliant", "beautiful", "happy")
_NEGATIVE = ("bad", "awful", "terrible", "boring", "dull", "ugly", "sad", "worst")
_PLAIN = ("the", "film", "was", "it", "and", "very", "a", "story", "scene", "actor", "really")


def _vocabulary() -> list[str]:
    """Special tokens, every word of the openings, the sentiment and plain words, '.'."""
    pre = tokenizers.pre_tokenizers.Whitespace()
    words = {
        piece
        for opening in review_openings.make_openings(2000, 0)
        for piece, _ in pre.pre_tokenize_str(opening)
    }
    words |= {*_POSITIVE, *_NEGATIVE, *_PLAIN, "."}
    return ["<pad>", "<eos>", "<bos>", "<unk>", *sorted(words)]


def _write_tiny_model(directory) -> str:
    """A tiny random Llama with a word-level tokenizer, as a Hugging Face directory."""
    vocab = _vocabulary()
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    special = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    (directory / "tokenizer_config.json").write_text(json.dumps({**special, "add_bos_token": True}))
    config = ModelConfig(
        family="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, bos_token_id=2, eos_token_id=1,
        pad_token_id=0,
    )  # fmt: skip
    save_hf(str(directory), config, jax.device_get(init_params(config, jax.random.key(0))))
    return str(directory)


def test_openings_are_distinct_neutral_and_the_held_out_ones_new():
    train = review_openings.make_openings(400, 0)
    held_out = review_openings.make_openings(100, 1, exclude=frozenset(train))
    assert len(set(train)) == 400 and len(set(held_out)) == 100
    assert not set(train) & set(held_out)
    reward = sentiment.vader_reward()
    assert all(reward(opening) == 0.0 for opening in train + held_out)


def test_vader_scores_are_the_published_lexicons():
    reward = sentiment.vader_reward()
    assert reward("This movie was wonderful and moving.") == pytest.approx(0.5719)
    assert reward("the film was awful") < 0 < reward("the film was great")


def test_sentence_end_ids_are_the_tokens_holding_a_sentence_end(tmp_path):
    tokenizer = Tokenizer.from_dir(_write_tiny_model(tmp_path / "model"))
    vocab = _vocabulary()
    ends = sentiment.sentence_end_ids(tokenizer)
    assert [vocab[i] for i in ends] == sorted(
        w for w in vocab if any(end in w for end in sentiment.SENTENCE_ENDS)
    )
    assert vocab.index(".") in ends and vocab.index("<eos>") not in ends


@pytest.mark.slow
def test_a_tiny_sentiment_run_end_to_end(tmp_path):
    """The README's run at toy size: pairs labelled by VADER, DPO and Preferred-FT with LoRA,
    best-of-N, scored by VADER and KL; the reference's row is exactly KL 0, best-of-1 is one
    reference draw, and DPO moves the mean VADER score up."""
    spec = importlib.util.spec_from_file_location("configs_pretrained", _CONFIGS / "pretrained.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = module.get_config("lora")
    with base.unlocked():
        base.model.logits_chunk_size = 0
        base.model.remat = False
        base.optimizer.learning_rate = 1e-1
        base.optimizer.warmup_steps = 0
    settings = sentiment.SentimentSettings(
        num_train_openings=256, num_eval_openings=64, max_new_tokens=8, betas=(0.1,), epochs=4,
        batch_size=16, learning_rate=1e-1, best_of=(1, 4), reference_draws=4, samples_shown=2,
    )  # fmt: skip
    model_dir = _write_tiny_model(tmp_path / "model")
    out = tmp_path / "out"
    result = sentiment.run_sentiment(base, model_dir, str(out), settings)

    rows = {(row["method"], row["setting"]): row for row in result.rows}
    assert list(rows) == [
        ("reference", ""), ("DPO (LoRA)", "beta=0.1"), ("Preferred-FT (LoRA)", ""),
        ("best-of-N", "N=1"), ("best-of-N", "N=4"),
    ]  # fmt: skip
    reference, dpo = rows["reference", ""], rows["DPO (LoRA)", "beta=0.1"]
    assert reference["kl"] == 0.0 and np.all(reference["prompt_kls"] == 0.0)
    best_of_4 = rows["best-of-N", "N=4"]
    assert best_of_4["kl_bound"] == pytest.approx(np.log(4) - 3 / 4)
    assert 0.0 < best_of_4["kl"] <= best_of_4["kl_bound"]  # ties only lower it
    assert best_of_4["reward"] >= rows["best-of-N", "N=1"]["reward"]
    for row in result.rows:
        assert np.all(np.abs(row["prompt_rewards"]) <= 1.0)
    counts = result.pair_counts
    assert counts["pairs"] + counts["same_text"] + counts["same_score"] == 256
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == counts["pairs"]
    assert dpo["kl"] > 0.0
    assert dpo["reward"] > reference["reward"]  # 0.058 against 0.019 (2026-12-04)
    with open(out / "sentiment.csv") as f:
        written = list(csv.DictReader(f))
    rewards = [row["reward"] for row in result.rows]
    assert [float(row["reward"]) for row in written] == pytest.approx(rewards)
    samples = (out / "sentiment_samples.md").read_text()
    assert f"{counts['pairs']} pairs from 256 openings" in samples
    assert all(sample["opening"] in samples for sample in result.samples)
