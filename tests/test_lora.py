"""LoRA (dpo_jax.lora): the reference is the base with the adapters off, the base is held once
and never changes, and both exports (merged, and PEFT's adapters) give transformers' and PEFT's
own logits for every model family."""

import dataclasses
import gc
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from test_convert_hf import TINY_MODELS, _hf_logits, _hf_model, _our_logits, _padded_batch
from test_train_step import build, run_steps, tiny_config

from dpo_jax import lora
from dpo_jax import reference as reference_lib
from dpo_jax import step as step_lib
from dpo_jax.logprobs import logprob_fn
from dpo_jax.models import linear, load_hf, save_hf
from dpo_jax.models.convert_peft import save_peft
from dpo_jax.models.transformer import make_apply_fn
from dpo_jax.run import checkpoint, train
from dpo_jax.run import stage as stage_lib

TOLERANCE = 1e-4  # max abs logit difference, float32 (as tests/test_convert_hf.py)
# PEFT adds (x·A)·B to x·W, we multiply x by W + A·B: the same sum rounded another way, which on
# these logits (std ~3, max ~15) moves them by up to ~1e-4 in float32.
PEFT_TOLERANCE = 3e-4
# The unmerged layers add s·(x·A)·B to x·W where the merged ones multiply x by W + s·A·B: the
# same rounding gap, measured up to 3.05e-5 at the real tokens (llama3_rope_tied_bias).
UNMERGED_TOLERANCE = 1e-4
ALL_LINEAR = ("attn/[qkvo]_kernel", "mlp/(gate|up|down)_kernel", "lm_head")


def _lora_config(**changes):
    return tiny_config(lora__rank=4, dpo__reference="adapters_off", **changes)


def _random_adapters(params, spec, seed):
    """Adapters with B drawn too (fresh ones have B = 0, which would test nothing)."""
    adapters = lora.init_adapters(params, spec, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [0.1 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves)


def _pair_batch(tokens, mask):
    """The two rows of `_padded_batch` as one pair, responses from token 4 on."""
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return {
        "tokens": tokens[None],
        "response_mask": (mask & (positions >= 4))[None],
        "positions": positions[None],
        "segment_ids": mask.astype(np.int32)[None],
        "pair_mask": np.ones((1, 1), bool),
    }


def _loss_and_grads(config, base, adapters, spec, batch):
    """The DPO loss and its adapter gradients, with the step's own code (the reference is the
    base); spec.merged picks the form."""
    reference = reference_lib.AdaptersOffReference(base, spec=spec)
    options = step_lib.LossOptions(final_logit_softcapping=config.final_logit_softcapping)
    grad_fn = jax.jit(
        jax.grad(step_lib.loss_and_metrics, has_aux=True),
        static_argnames=("apply_fn", "options"),
    )
    grads, metrics = grad_fn(
        adapters, reference, batch, None, apply_fn=make_apply_fn(config), options=options
    )
    return metrics, grads


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_unmerged_merged_and_peft_give_the_logits_of_base_plus_adapters(name, tmp_path):
    """The step's unmerged layers (x·W + s·x·A·B) equal the merged weights (logits, log-probs,
    loss, adapter gradients), and both exports give transformers' and PEFT's logits."""
    model = _hf_model(name, seed=2)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    config, base = load_hf(str(tmp_path / "base"))
    targets = ALL_LINEAR if not config.tie_word_embeddings else ALL_LINEAR[:2]
    spec = lora.LoraSpec(rank=3, alpha=6.0, targets=targets)
    adapters = _random_adapters(base, spec, seed=3)
    tokens, mask = _padded_batch(config.vocab_size, seed=2)
    ours = _our_logits(config, lora.merge(base, adapters, spec), tokens, mask)
    assert np.max(np.abs(ours - _our_logits(config, base, tokens, mask))[mask]) > 0.1
    unmerged = _our_logits(config, lora.attach(base, adapters, spec), tokens, mask)
    unmerged_diff = np.max(np.abs(unmerged - ours)[mask])
    print(f"{name}: unmerged vs merged logits differ by {unmerged_diff:.2e}")  # docs/lora.md
    assert unmerged_diff <= UNMERGED_TOLERANCE, f"{name}: unmerged differs by {unmerged_diff:.2e}"
    batch = _pair_batch(tokens, mask)
    got, got_grads = _loss_and_grads(config, base, adapters, spec, batch)
    want, want_grads = _loss_and_grads(
        config, base, adapters, dataclasses.replace(spec, merged=True), batch
    )
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for path, grad in jax.tree_util.tree_leaves_with_path(got_grads):
        expected = _leaf(want_grads, path)
        scale = np.max(np.abs(expected))
        assert scale > 0 and np.max(np.abs(grad - expected)) <= 1e-4 * scale, lora.path_name(path)

    save_hf(str(tmp_path / "merged"), config, lora.merge(base, adapters, spec))
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager"
    ).eval()
    merged_diff = np.max(np.abs(_hf_logits(merged, tokens, mask) - ours)[mask])
    assert merged_diff <= TOLERANCE, f"{name}: merged export differs by {merged_diff:.2e}"

    save_peft(
        str(tmp_path / "peft"),
        config,
        jax.device_get(adapters),
        rank=spec.rank,
        alpha=spec.alpha,
        base_model=str(tmp_path / "base"),
        base_fingerprint="test",
    )
    with_adapters = peft.PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    peft_logits = _hf_logits(with_adapters, tokens, mask)
    peft_diff = np.max(np.abs(peft_logits - ours)[mask])
    assert peft_diff <= PEFT_TOLERANCE, f"{name}: PEFT's logits differ by {peft_diff:.2e}"
    peft_diff = np.max(np.abs(peft_logits - unmerged)[mask])
    assert peft_diff <= PEFT_TOLERANCE, f"{name}: PEFT vs unmerged: {peft_diff:.2e}"


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_training_leaves_the_base_bit_identical_and_the_reference_equal_to_it(tmp_path):
    # B starts at 0, so the adapters move the policy slowly at the full model's rate.
    ctx, stage, params = build(_lora_config(optimizer__learning_rate=1e-2), tmp_path)
    assert isinstance(stage.reference, reference_lib.AdaptersOffReference)
    base_before = jax.device_get(params)
    state, history = run_steps(stage, ctx, params, num_steps=4)
    assert history[-1]["loss"] < history[0]["loss"] - 1e-3  # the adapters learned
    assert np.isclose(history[0]["loss"], np.log(2), atol=1e-6)  # B = 0: policy == reference
    # The state trains adapters only (A [L, in, 4], B [L, 4, out] per kernel); the base, held
    # by the reference, never changed.
    paths = [lora.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
    assert len(paths) == 14 and all(p.endswith(("/lora_a", "/lora_b")) for p in paths)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(stage.reference.base), base_before)
    # The reference's log-probs are the base model's, exactly; the policy's are not.
    batch = train.sharding.put_batch(next(stage.train_batches), ctx.mesh)
    forward = lambda p: logprob_fn(ctx.apply_fn, p, batch).logps
    ref = reference_lib.reference_logps(stage.reference, batch, forward)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(forward(params)))
    policy = forward(reference_lib.policy_params(stage.reference, state.params))
    assert np.max(np.abs(np.asarray(policy) - np.asarray(ref))) > 1e-4


def test_one_copy_of_the_base_is_held(tmp_path):
    # An embedding width no other test uses, so its [V, 44] arrays are this test's alone.
    ctx, stage, params = build(_lora_config(model__hidden_size=44), tmp_path)
    shape = params["embedding"].shape
    state = stage_lib.init_state(stage, params, ctx)
    del params
    gc.collect()
    live = [a for a in jax.live_arrays() if a.shape == shape and not a.is_deleted()]
    # Buffers, not Array objects: hashing the base for its fingerprint (jax.device_get) leaves a
    # second Array object over the same buffer on CPU.
    buffers = {a.unsafe_buffer_pointer() for a in live}
    assert len(buffers) == 1  # the base's: no policy copy, no AdamW moments of it
    assert "embedding" not in state.params


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpoints_hold_the_adapters_and_resume_exactly(tmp_path, dropout):
    """With adapter dropout too: each step's masks come from the checkpointed key and step."""
    config = _lora_config(checkpoint__every_steps=2, checkpoint__keep=1, lora__dropout=dropout)
    config.dpo.num_steps = 3
    ctx, straight, params = build(config, tmp_path / "straight")
    state_straight, history_straight = stage_lib.run_stage(straight, params, ctx)
    ctx, first, params = build(config, tmp_path / "resumed")
    first.num_steps = 2
    stage_lib.run_stage(first, params, ctx)
    ctx, second, params = build(config, tmp_path / "resumed")
    state_resumed, history_resumed = stage_lib.run_stage(second, params, ctx)
    assert [m["step"] for m in history_resumed] == [3]
    assert history_resumed[0]["loss"] == history_straight[-1]["loss"]
    jax.tree.map(np.testing.assert_array_equal, *jax.device_get((state_resumed, state_straight)))
    recorded = json.loads((tmp_path / "resumed" / "dpo" / checkpoint.LORA_BASE_FILE).read_text())
    assert recorded["base_fingerprint"] == second.reference.base_fingerprint


def test_adapter_dropout_is_peft_s_against_numpy():
    """x·W + s·(mask·x / (1 − p))·A·B with one Bernoulli(1 − p) mask per input element, on the
    adapter path only; no key, no dropout (evaluation)."""
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(64, 12)).astype(np.float32)
    base = rng.normal(size=(12, 3, 5)).astype(np.float32)
    lora_a = rng.normal(size=(12, 4)).astype(np.float32)
    lora_b = rng.normal(size=(4, 15)).astype(np.float32)
    key, p, scale = jax.random.key(7), 0.25, 0.5
    adapted = linear.Adapted(base, lora_a, lora_b, key, scale, p)
    got = np.asarray(linear.project(jnp.asarray(tokens), adapted, "nd,dhk->nhk"))
    keep = np.asarray(jax.random.bernoulli(key, 1 - p, tokens.shape))
    assert abs(keep.mean() - (1 - p)) < 0.05
    dropped = np.where(keep, tokens / (1 - p), 0.0)
    want = np.einsum("nd,dhk->nhk", tokens, base) + scale * ((dropped @ lora_a) @ lora_b).reshape(
        64, 3, 5
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    no_key = linear.Adapted(base, lora_a, lora_b, None, scale, p)
    got = np.asarray(linear.project(jnp.asarray(tokens), no_key, "nd,dhk->nhk"))
    want = np.einsum("nd,dhk->nhk", tokens, base) + scale * ((tokens @ lora_a) @ lora_b).reshape(
        64, 3, 5
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_each_layer_and_kernel_drops_its_own_inputs(tmp_path):
    ctx, stage, params = build(_lora_config(lora__dropout=0.5), tmp_path)
    adapters = stage_lib.init_state(stage, params, ctx).params
    attached = lora.attach(params, adapters, stage.reference.spec, jax.random.key(1))
    q, v = attached["layers"]["attn"]["q_kernel"], attached["layers"]["attn"]["v_kernel"]
    assert q.dropout == 0.5 and q.dropout_key.shape == (
        params["layers"]["attn"]["q_kernel"].shape[0],
    )
    keys = [jax.random.key_data(k) for k in (*q.dropout_key, *v.dropout_key)]
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == len(keys)
    assert (
        lora.attach(params, adapters, stage.reference.spec)["layers"]["attn"][
            "q_kernel"
        ].dropout_key
        is None
    )


def test_main_job_with_lora_exports_a_peft_adapter_and_the_merged_model(tmp_path):
    config = _lora_config(checkpoint__export_hf=True)
    config.dpo.num_steps = 3
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["after_dpo"]["loss"] < summary["before_dpo"]["loss"]
    adapter_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["peft_type"] == "LORA"
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "hf_base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with_adapters = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    tokens, mask = _padded_batch(merged.config.vocab_size, seed=4)
    expected = _hf_logits(merged, tokens, mask)
    diff = np.max(np.abs(_hf_logits(with_adapters, tokens, mask) - expected)[mask])
    assert diff <= PEFT_TOLERANCE


def test_bad_lora_settings_are_named():
    with pytest.raises(ValueError, match=r"config.lora.rank=-1 must be an integer >= 1"):
        train.check_config(tiny_config(lora__rank=-1, dpo__reference="adapters_off"))
    with pytest.raises(ValueError, match=r"config.lora.targets: 'attn/\(q' is not a regex"):
        train.check_config(_lora_config(lora__targets="attn/(q"))
    with pytest.raises(ValueError, match=r"config.lora.dropout=0.1 with config.lora.merged=True"):
        train.check_config(_lora_config(lora__dropout=0.1, lora__merged=True))
    with pytest.raises(ValueError, match=r"config.lora.dropout=1.0 must be in \[0, 1\)"):
        train.check_config(_lora_config(lora__dropout=1.0))
    with pytest.raises(ValueError, match=r"reference='precomputed' with config.lora.rank=4"):
        train.check_config(tiny_config(lora__rank=4, dpo__reference="precomputed"))
    with pytest.raises(ValueError, match=r"'adapters_off' needs LoRA"):
        train.check_config(tiny_config(dpo__reference="adapters_off"))


def test_a_pattern_that_matches_no_linear_layer_is_named(tmp_path):
    config = _lora_config(lora__targets="attn/q_kernel,self_attn/query")
    with pytest.raises(ValueError, match=r"'self_attn/query' matches no linear layer.*q_kernel"):
        build(config, tmp_path)
    with pytest.raises(ValueError, match=r"'embedding' matches no linear layer"):
        build(_lora_config(lora__targets="embedding"), tmp_path)


def test_resuming_on_another_base_is_refused_naming_both(tmp_path):
    model = _hf_model("llama", seed=5)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    config = _lora_config(
        model__source="hf",
        model__hf_path=str(tmp_path / "base"),
        checkpoint__every_steps=1,
    )
    config.data.tokenizer = "synthetic"
    config.dpo.num_steps = 2
    ctx, stage, params = build(config, tmp_path / "run")
    stage_lib.run_stage(stage, params, ctx)
    _hf_model("llama", seed=6).save_pretrained(tmp_path / "base", safe_serialization=True)
    config.dpo.num_steps = 3
    ctx, stage, params = build(config, tmp_path / "run")
    with pytest.raises(ValueError, match=r"lora_base.json: the LoRA checkpoints .* sha256"):
        stage_lib.run_stage(stage, params, ctx)


def _changed(before, after) -> dict[str, bool]:
    """{param path: whether any element changed}."""
    flat_before = jax.tree_util.tree_leaves_with_path(jax.device_get(before))
    flat_after = jax.tree.leaves(jax.device_get(after))
    return {
        lora.path_name(path): not np.array_equal(b, a)
        for (path, b), a in zip(flat_before, flat_after, strict=True)
    }


def test_only_the_configured_subset_trains_and_only_it_has_optimizer_state(tmp_path):
    config = tiny_config(optimizer__trainable="attn/[qv]_kernel")
    ctx, stage, params = build(config, tmp_path)
    before = jax.device_get(params)
    state, _ = run_steps(stage, ctx, params, num_steps=2)
    changed = _changed(before, state.params)
    assert {name for name, moved in changed.items() if moved} == {
        "layers/attn/q_kernel",
        "layers/attn/v_kernel",
    }
    # AdamW's two moments exist for the two trained kernels only.
    moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
    assert sorted(m.shape for m in moments) == sorted(
        [
            params_shape
            for name in ("q_kernel", "v_kernel")
            for params_shape in [before["layers"]["attn"][name].shape] * 2
        ]
    )


def test_the_subset_applies_to_lora_adapters_too_and_a_bad_pattern_is_named(tmp_path):
    config = _lora_config(optimizer__trainable="mlp/", optimizer__learning_rate=1e-2)
    ctx, stage, params = build(config, tmp_path / "lora")
    initial = stage_lib.init_state(stage, params, ctx)
    before = jax.device_get(initial.params)
    state, _ = run_steps(stage, ctx, params, num_steps=2)
    for name, moved in _changed(before, state.params).items():
        assert moved == name.startswith("layers/mlp/"), name
    config = tiny_config(optimizer__trainable="attention/")
    ctx, stage, params = build(config, tmp_path / "bad")
    with pytest.raises(ValueError, match=r"trainable: 'attention/' matches no param.*q_kernel"):
        stage_lib.init_state(stage, params, ctx)
