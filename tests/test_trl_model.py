"""A real TRL 1.16 DPOTrainer step on a tiny Llama against dpo_jax's log-probs, loss and gradients.

transformers builds a random 2-layer Llama (and a second one as the reference), saves both as
safetensors and dpo_jax loads them with `load_hf`. TRL's trainer collates the records and runs
its loss forward and backward; dpo_jax runs `step.loss_and_metrics` on the same token rows.
"""

import dataclasses

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import models, pre_tokenizers, processors
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import add_fused_lm_head

from dpo_jax import step as step_lib
from dpo_jax.logprobs import logprob_fn
from dpo_jax.models import load_hf, make_apply_fn
from dpo_jax.models.convert_hf import hf_tensors_from_params
from dpo_jax.reference import FrozenReference

WORDS = "<pad> <s> </s> <unk> the sky is blue green red grass wet water dry yes no maybe".split()
RECORDS = [
    {"prompt": "the sky is", "chosen": " blue", "rejected": " green red"},
    {"prompt": "the grass is", "chosen": " green", "rejected": " red"},
    {"prompt": "water is", "chosen": " wet", "rejected": " dry dry no"},
    {"prompt": "yes or", "chosen": " no", "rejected": " maybe yes"},
]


def _tokenizer():
    backend = tokenizers.Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    backend.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _llama(seed: int, path) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_model")
    policy, ref = _llama(0, root / "policy"), _llama(1, root / "ref")
    args = DPOConfig(
        output_dir=str(root / "out"),
        per_device_train_batch_size=len(RECORDS),
        beta=0.1,
        report_to=[],
        gradient_checkpointing=False,
        use_cpu=True,
        max_length=None,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=datasets.Dataset.from_list(RECORDS),
        processing_class=_tokenizer(),
    )
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    return trainer, inputs, root


def _our_batch(inputs):
    """TRL's [chosen rows; rejected rows] as dpo_jax's [B, 2, T] batch (one pair per row)."""
    as_pairs = lambda x: np.stack(np.split(x.numpy(), 2), axis=1)  # [B, 2, T]  # noqa: E731
    segment_ids = as_pairs(inputs["attention_mask"]).astype(np.int32)
    length = segment_ids.shape[-1]
    return {
        "tokens": jnp.asarray(as_pairs(inputs["input_ids"]), jnp.int32),
        "response_mask": jnp.asarray(as_pairs(inputs["completion_mask"]).astype(bool)),
        "positions": jnp.asarray(np.arange(length)[None, None, :] * segment_ids, jnp.int32),
        "segment_ids": jnp.asarray(segment_ids),
        "pair_mask": jnp.ones((segment_ids.shape[0], 1), bool),
    }


def _torch_logps(model, inputs):
    """[2B] summed completion log-probs from a plain transformers forward (no TRL code)."""
    with torch.no_grad():
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1)
    token = torch.gather(logps, 2, inputs["input_ids"][:, 1:, None])[..., 0]
    return (token * inputs["completion_mask"][:, 1:]).sum(1).numpy()


def test_log_probs_match_transformers(setup):
    trainer, inputs, root = setup
    config, params = load_hf(str(root / "policy"))
    logps = logprob_fn(make_apply_fn(config), params, _our_batch(inputs)).logps  # [B, 2, 1]
    expected = _torch_logps(trainer.model, inputs)
    got = np.concatenate([np.asarray(logps[:, 0, 0]), np.asarray(logps[:, 1, 0])])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # An unpacked batch needs no pair_mask (one pair per row).
    batch = {k: v for k, v in _our_batch(inputs).items() if k != "pair_mask"}
    unmasked = logprob_fn(make_apply_fn(config), params, batch).logps
    np.testing.assert_array_equal(unmasked, logps)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_metrics_and_gradients_match_trl(setup, loss_type):
    trainer, inputs, root = setup
    trainer.loss_types, trainer.loss_weights, trainer.ld_alpha = [loss_type], [1.0], None
    # The reference log-probs come from a fresh transformers load of the reference weights,
    # passed to TRL's loss as precomputed: TRL's own prepared reference model scored these rows
    # up to 1.2e-3 away from the same weights loaded fresh (and from dpo_jax), which agree to 1e-6.
    reference_model = transformers.LlamaForCausalLM.from_pretrained(str(root / "ref"))
    ref_chosen, ref_rejected = np.split(_torch_logps(reference_model, inputs), 2)
    trainer.precompute_ref_logps = True
    inputs = dict(
        inputs,
        ref_chosen_logps=torch.tensor(ref_chosen),
        ref_rejected_logps=torch.tensor(ref_rejected),
    )
    trainer.model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trl_grads = {name: p.grad.numpy() for name, p in trainer.model.named_parameters()}

    config, params = load_hf(str(root / "policy"))
    _, ref_params = load_hf(str(root / "ref"))
    options = step_lib.LossOptions(loss_type=(loss_type,), beta=0.1)
    grad_fn = jax.grad(step_lib.loss_and_metrics, has_aux=True)
    kwargs = dict(apply_fn=make_apply_fn(config), options=options)
    batch = _our_batch(inputs)
    grads, metrics = grad_fn(params, FrozenReference(ref_params), batch, None, **kwargs)

    np.testing.assert_allclose(float(metrics["loss"]), trl_loss.item(), rtol=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], rtol=1e-4, atol=1e-5)
    ours = hf_tensors_from_params(config, grads)
    assert set(ours) == set(trl_grads)
    for name, expected in trl_grads.items():
        error = np.max(np.abs(ours[name] - expected)) / np.max(np.abs(expected))
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"


def test_ld_dpo_loss_and_gradients_match_trl(setup):
    # LD-DPO (ld_alpha) through TRL's own reference forward: a fresh load of the reference
    # weights with TRL's fused head, as DPOTrainer prepares its reference.
    trainer, inputs, root = setup
    reference_model = transformers.LlamaForCausalLM.from_pretrained(str(root / "ref"))
    add_fused_lm_head(reference_model)
    trainer.ref_model, trainer.precompute_ref_logps = reference_model, False
    trainer.loss_types, trainer.loss_weights, trainer.ld_alpha = ["sigmoid"], [1.0], 0.3
    trainer.model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_grads = {name: p.grad.numpy() for name, p in trainer.model.named_parameters()}

    config, params = load_hf(str(root / "policy"))
    _, ref_params = load_hf(str(root / "ref"))
    options = step_lib.LossOptions(loss_type=("sigmoid",), beta=0.1, ld_alpha=0.3)
    grad_fn = jax.grad(step_lib.loss_and_metrics, has_aux=True)
    kwargs = dict(apply_fn=make_apply_fn(config), options=options)
    grads, metrics = grad_fn(
        params, FrozenReference(ref_params), _our_batch(inputs), None, **kwargs
    )
    np.testing.assert_allclose(float(metrics["loss"]), trl_loss.item(), rtol=1e-5)
    ours = hf_tensors_from_params(config, grads)
    for name, expected in trl_grads.items():
        error = np.max(np.abs(ours[name] - expected)) / np.max(np.abs(expected))
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("logits_chunk_size", [None, 3])
def test_wpo_weighting_loss_and_gradients_match_trl(setup, logits_chunk_size):
    # WPO (use_weighting): TRL's fused head returns log Σ_v p(v)² per position; ours comes from
    # logprob_fn(with_log_sum_sq=True), full or chunked.
    trainer, inputs, root = setup
    reference_model = transformers.LlamaForCausalLM.from_pretrained(str(root / "ref"))
    ref_chosen, ref_rejected = np.split(_torch_logps(reference_model, inputs), 2)
    trainer.loss_types, trainer.loss_weights, trainer.ld_alpha = ["sigmoid"], [1.0], None
    trainer.precompute_ref_logps, trainer.use_weighting = True, True
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")  # as DPOTrainer patches it
    add_fused_lm_head(trainer.model, outputs=(*outputs, "log_sum_sq_probs"))
    inputs = dict(
        inputs,
        ref_chosen_logps=torch.tensor(ref_chosen),
        ref_rejected_logps=torch.tensor(ref_rejected),
    )
    trainer.model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trainer.use_weighting = False
    add_fused_lm_head(trainer.model, outputs=outputs)
    trl_grads = {name: p.grad.numpy() for name, p in trainer.model.named_parameters()}

    config, params = load_hf(str(root / "policy"))
    _, ref_params = load_hf(str(root / "ref"))
    options = step_lib.LossOptions(
        loss_type=("sigmoid",), beta=0.1, use_weighting=True, logits_chunk_size=logits_chunk_size
    )
    grad_fn = jax.grad(step_lib.loss_and_metrics, has_aux=True)
    kwargs = dict(apply_fn=make_apply_fn(config), options=options)
    grads, metrics = grad_fn(
        params, FrozenReference(ref_params), _our_batch(inputs), None, **kwargs
    )
    np.testing.assert_allclose(float(metrics["loss"]), trl_loss.item(), rtol=1e-5)
    ours = hf_tensors_from_params(config, grads)
    for name, expected in trl_grads.items():
        error = np.max(np.abs(ours[name] - expected)) / np.max(np.abs(expected))
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"


def test_logprob_fn_reads_the_models_soft_cap(setup):
    # make_apply_fn carries the config's cap; logprob_fn uses it unless told otherwise, and
    # refuses a cap the model does not have.
    _, inputs, root = setup
    config, params = load_hf(str(root / "policy"))
    capped = dataclasses.replace(config, final_logit_softcapping=0.5)
    batch = _our_batch(inputs)
    implicit = logprob_fn(make_apply_fn(capped), params, batch).logps
    explicit = logprob_fn(
        lambda *a: make_apply_fn(capped)(*a), params, batch, final_logit_softcapping=0.5
    ).logps
    np.testing.assert_array_equal(implicit, explicit)
    with pytest.raises(ValueError, match="final_logit_softcapping=None but the model's config has"):
        logprob_fn(make_apply_fn(capped), params, batch, final_logit_softcapping=None)
