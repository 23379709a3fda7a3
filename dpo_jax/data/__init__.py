"""Preference data: records, tokenisation, batching and loading.

Modules (import the one you need; this package imports nothing, so it stays light):
  records      read JSONL / Parquet / lists; normalise explicit, conversational, implicit records
  tokenize     prompt once, responses joined as tokens, truncation, DataStats counts
  batching     [B, 2, T] batches, one pair per row or packed pairs (`pack_pairs`)
  pipeline     grain loading: `make_pair_iterator` (training), `make_eval_batches` (held out)
  tfds_source  a TFDS array_record builder and data source (no TensorFlow)
  synthetic    the project's synthetic sort / reverse / copy preference task
(the tokenizer is `dpo_jax.tokenizer`, at the top: the models read it too)
"""
