"""LossOptions reach the log-probs and the loss as the model and the variant define them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import step as step_lib
from dpo_jax.models import ModelConfig, init_params, make_apply_fn
from dpo_jax.models.transformer import logits as model_logits
from dpo_jax.reference import FrozenReference, NoReference


def _tiny_model(**changes) -> ModelConfig:
    config = ModelConfig.from_hf_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 32,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "rope_theta": 10_000.0,
        }
    )
    return dataclasses.replace(config, **changes)


def _batch() -> dict[str, jax.Array]:
    """Two pairs of 6 tokens: 3 prompt tokens, then a 3-token response (chosen != rejected)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 32, size=(2, 2, 6)).astype(np.int32)
    response_mask = np.zeros((2, 2, 6), bool)
    response_mask[..., 3:] = True
    return dict(
        tokens=jnp.asarray(tokens),
        response_mask=jnp.asarray(response_mask),
        positions=jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 2, 6)),
        segment_ids=jnp.ones((2, 2, 6), jnp.int32),
        pair_mask=jnp.ones((2, 1), bool),
    )


def test_final_logit_softcapping_reaches_the_log_probs():
    config = _tiny_model(final_logit_softcapping=0.5)  # a cap far below the logits' spread
    params = jax.tree.map(lambda p: 40.0 * p, init_params(config, jax.random.key(0)))
    batch = _batch()
    options = step_lib.LossOptions(loss_type=("sft",), final_logit_softcapping=0.5)
    _, metrics = step_lib.loss_and_metrics(
        params, NoReference(), batch, None, apply_fn=make_apply_fn(config), options=options
    )
    # Independent reference: the model's own capped logits, log-softmax in NumPy, response
    # tokens 3..5 scored from positions 2..4.
    tokens = np.asarray(batch["tokens"]).reshape(4, 6)
    logits = np.asarray(model_logits(config, params, jnp.asarray(tokens)), np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows = np.arange(4)[:, None]
    expected = log_softmax[rows, np.arange(2, 5)[None], tokens[:, 3:6]].sum(-1).reshape(2, 2)
    np.testing.assert_allclose(metrics["logps/chosen"], expected[:, 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/rejected"], expected[:, 1].mean(), rtol=1e-5)
    # Without the cap the same params give other log-probs: the option is not a no-op here. (An
    # apply_fn from make_apply_fn carries its cap and refuses another; a bare wrapper does not.)
    uncapped = dataclasses.replace(options, final_logit_softcapping=None)
    bare_apply = lambda *args: make_apply_fn(config)(*args)  # noqa: E731
    _, plain = step_lib.loss_and_metrics(
        params, NoReference(), batch, None, apply_fn=bare_apply, options=uncapped
    )
    assert abs(float(plain["logps/chosen"]) - float(metrics["logps/chosen"])) > 1.0


def test_ipo_has_one_form_whatever_else_is_listed():
    """["ipo"] and ["ipo", "sft"] give the same ipo term: TRL's per-token form
    (Δc/|y_w| − Δr/|y_l| − 1/(2β))², with the reference taken as another model."""
    config = _tiny_model()
    apply_fn = make_apply_fn(config)
    params = init_params(config, jax.random.key(0))
    ref_params = init_params(config, jax.random.key(1))
    batch, beta = _batch(), 0.1
    terms = []
    for loss_type in (("ipo",), ("ipo", "sft")):
        options = step_lib.LossOptions(loss_type=loss_type, beta=beta)
        _, metrics = step_lib.loss_and_metrics(
            params, FrozenReference(ref_params), batch, None, apply_fn=apply_fn, options=options
        )
        terms.append(float(metrics["loss/ipo"]))
    policy = step_lib.logprob_fn(apply_fn, params, batch)
    ref = step_lib.logprob_fn(apply_fn, ref_params, batch)
    ratio = np.asarray(policy.logps - ref.logps)[..., 0] / np.asarray(policy.lengths)[..., 0]
    expected = np.mean((ratio[:, 0] - ratio[:, 1] - 1 / (2 * beta)) ** 2)
    np.testing.assert_allclose(terms, [expected, expected], rtol=1e-5)
