"""The reference abstraction (dpo_jax.reference): every kind gives the numbers the code gave
before it, resumes exactly, and holds only the param copies it needs."""

import gc

import jax
import numpy as np
import pytest
from test_train_step import build, tiny_config

from dpo_jax import reference as reference_lib
from dpo_jax.run import stage as stage_lib
from dpo_jax.run import train

# The config changes that give each kind on configs/default.py:tiny (one device, 3 DPO steps,
# no SFT: the reference is the initial model).
KIND_CHANGES = {
    "frozen": {},
    "precomputed": dict(dpo__reference="precomputed"),
    "moving": dict(dpo__reference="moving", dpo__ref_sync_every=2, dpo__ref_sync_alpha=0.25),
    "none": dict(dpo__loss_type="simpo"),
}

# Recorded from the code before the reference abstraction (commit 054e12d, where the kinds were
# reference="in_step", "precomputed", ref_sync_every=2 with α = 0.25, and loss_type="simpo"): the
# held-out metrics before DPO and the train metrics of 3 steps, on the same config. If this test
# fails after a deliberate change of the numerics, re-record them the same way and say why.
GOLDEN = {
    "frozen": {
        "before": {
            "loss": 0.6931471824645996,
            "rewards/chosen": 0.0,
            "rewards/rejected": 0.0,
            "rewards/margins": 0.0,
            "logps/chosen": -17.591310501098633,
            "logps/rejected": -17.560714721679688,
        },
        "train": [
            {
                "loss": 0.6931471824645996,
                "rewards/chosen": 0.0,
                "rewards/rejected": 0.0,
                "rewards/margins": 0.0,
                "logps/chosen": -18.734901428222656,
                "logps/rejected": -18.775184631347656,
                "grad_norm": 0.38071709871292114,
            },
            {
                "loss": 0.6938397288322449,
                "rewards/chosen": -0.00019611121388152242,
                "rewards/rejected": 0.0011839866638183594,
                "rewards/margins": -0.0013800978194922209,
                "logps/chosen": -17.688695907592773,
                "logps/rejected": -17.699617385864258,
                "grad_norm": 0.4320283830165863,
            },
            {
                "loss": 0.695096492767334,
                "rewards/chosen": -0.002341926097869873,
                "rewards/rejected": 0.0015460255090147257,
                "rewards/margins": -0.0038879516068845987,
                "logps/chosen": -19.352516174316406,
                "logps/rejected": -19.214885711669922,
                "grad_norm": 0.3380294740200043,
            },
        ],
    },
    "precomputed": {
        "before": {
            "loss": 0.6931471824645996,
            "rewards/chosen": 0.0,
            "rewards/rejected": 0.0,
            "rewards/margins": 0.0,
            "logps/chosen": -17.591310501098633,
            "logps/rejected": -17.560714721679688,
        },
        "train": [
            {
                "loss": 0.6931471824645996,
                "rewards/chosen": 0.0,
                "rewards/rejected": 0.0,
                "rewards/margins": 0.0,
                "logps/chosen": -18.734901428222656,
                "logps/rejected": -18.775184631347656,
                "grad_norm": 0.38071709871292114,
            },
            {
                "loss": 0.6938397288322449,
                "rewards/chosen": -0.00019611121388152242,
                "rewards/rejected": 0.0011839866638183594,
                "rewards/margins": -0.0013800978194922209,
                "logps/chosen": -17.688695907592773,
                "logps/rejected": -17.699617385864258,
                "grad_norm": 0.4320283830165863,
            },
            {
                "loss": 0.695096492767334,
                "rewards/chosen": -0.002341926097869873,
                "rewards/rejected": 0.0015460255090147257,
                "rewards/margins": -0.0038879516068845987,
                "logps/chosen": -19.352516174316406,
                "logps/rejected": -19.214885711669922,
                "grad_norm": 0.3380294740200043,
            },
        ],
    },
    "moving": {
        "before": {
            "loss": 0.6931471824645996,
            "rewards/chosen": 0.0,
            "rewards/rejected": 0.0,
            "rewards/margins": 0.0,
            "logps/chosen": -17.591310501098633,
            "logps/rejected": -17.560714721679688,
        },
        "train": [
            {
                "loss": 0.6931471824645996,
                "rewards/chosen": 0.0,
                "rewards/rejected": 0.0,
                "rewards/margins": 0.0,
                "logps/chosen": -18.734901428222656,
                "logps/rejected": -18.775184631347656,
                "grad_norm": 0.38071709871292114,
            },
            {
                "loss": 0.6938397288322449,
                "rewards/chosen": -0.00019611121388152242,
                "rewards/rejected": 0.0011839866638183594,
                "rewards/margins": -0.0013800978194922209,
                "logps/chosen": -17.688695907592773,
                "logps/rejected": -17.699617385864258,
                "grad_norm": 0.4320283830165863,
            },
            {
                "loss": 0.6946059465408325,
                "rewards/chosen": -0.001773071475327015,
                "rewards/rejected": 0.0011384132085368037,
                "rewards/margins": -0.002911484334617853,
                "logps/chosen": -19.352516174316406,
                "logps/rejected": -19.214885711669922,
                "grad_norm": 0.33784544467926025,
            },
        ],
    },
    "none": {
        "before": {
            "loss": 0.9742339849472046,
            "rewards/chosen": -1.7591309547424316,
            "rewards/rejected": -1.75607168674469,
            "rewards/margins": -0.0030592011753469706,
            "logps/chosen": -17.591310501098633,
            "logps/rejected": -17.560714721679688,
        },
        "train": [
            {
                "loss": 0.9738127589225769,
                "rewards/chosen": -1.8734898567199707,
                "rewards/rejected": -1.8775185346603394,
                "rewards/margins": 0.004028477240353823,
                "logps/chosen": -18.734901428222656,
                "logps/rejected": -18.775184631347656,
                "grad_norm": 0.07538121938705444,
            },
            {
                "loss": 0.9741950035095215,
                "rewards/chosen": -1.7690653800964355,
                "rewards/rejected": -1.7706571817398071,
                "rewards/margins": 0.0015919511206448078,
                "logps/chosen": -17.69065284729004,
                "logps/rejected": -17.706573486328125,
                "grad_norm": 0.08899267762899399,
            },
            {
                "loss": 0.975824773311615,
                "rewards/chosen": -1.933784008026123,
                "rewards/rejected": -1.9186320304870605,
                "rewards/margins": -0.015152041800320148,
                "logps/chosen": -19.337839126586914,
                "logps/rejected": -19.18631935119629,
                "grad_norm": 0.07214981317520142,
            },
        ],
    },
}


def _kind_config(kind: str, **changes):
    config = tiny_config(**KIND_CHANGES[kind], **changes)
    config.dpo.num_steps = 3
    return config


def _checkpointed_config(kind: str):
    # A checkpoint at step 2 (tiny's every_steps) for the restarted job to resume from; keeping
    # one checkpoint instead of the default two changes no number.
    return _kind_config(kind, checkpoint__every_steps=2, checkpoint__keep=1)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """kind -> (held-out metrics before DPO, train metrics, final host state) of the
    uninterrupted 3-step run, built once per kind for the golden and the resume tests."""
    runs = {}

    def run(kind):
        if kind not in runs:
            ctx, stage, params = build(_checkpointed_config(kind), tmp_path_factory.mktemp(kind))
            assert reference_lib.kind_name(stage.reference) == kind
            initial_ref_state = reference_lib.initial_state(stage.reference, params)
            before = stage_lib.evaluate(stage, params, initial_ref_state, ctx)
            state, history = stage_lib.run_stage(stage, params, ctx)
            runs[kind] = (before, history, jax.device_get(state))
        return runs[kind]

    return run


@pytest.mark.parametrize("kind", sorted(KIND_CHANGES))
def test_each_kind_gives_the_numbers_of_the_code_before_it(straight_run, kind):
    before, history, _ = straight_run(kind)
    golden = GOLDEN[kind]
    for name, value in golden["before"].items():
        np.testing.assert_allclose(before[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    assert len(history) == len(golden["train"])
    for got, want in zip(history, golden["train"], strict=True):
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("kind", sorted(KIND_CHANGES))
def test_each_kind_resumes_with_the_metrics_of_an_uninterrupted_run(tmp_path, straight_run, kind):
    _, history_straight, state_straight = straight_run(kind)
    config = _checkpointed_config(kind)
    ctx, first, params = build(config, tmp_path / "resumed")
    first.num_steps = 2
    stage_lib.run_stage(first, params, ctx)
    ctx, second, params = build(config, tmp_path / "resumed")  # a restarted job: from step 2
    state_resumed, history_resumed = stage_lib.run_stage(second, params, ctx)

    assert [m["step"] for m in history_resumed] == [3]
    for name in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        assert history_resumed[0][name] == history_straight[-1][name], name
    # A moving reference is saved with the state, so it resumes where it was.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state_resumed), state_straight)


# Live param-sized arrays while the DPO stage trains: the policy, AdamW's mu and nu, and one
# more copy for the kinds that keep reference params (frozen as an argument, moving in the state).
EXPECTED_COPIES = {"frozen": 4, "precomputed": 3, "moving": 4, "none": 3}


@pytest.mark.parametrize("kind", sorted(EXPECTED_COPIES))
def test_each_kind_holds_only_the_param_copies_it_needs(tmp_path, kind):
    # An embedding width no other test uses, so its [V, 44] arrays are this test's alone.
    config = _kind_config(kind, model__hidden_size=44)
    ctx, stage, params = build(config, tmp_path)
    embedding = params["embedding"]
    shape, initial_leaves = embedding.shape, jax.tree.leaves(params)
    del embedding
    state = stage_lib.init_state(stage, params, ctx)
    del params
    gc.collect()
    live = [a for a in jax.live_arrays() if a.shape == shape and not a.is_deleted()]
    assert len(live) == EXPECTED_COPIES[kind]
    if reference_lib.holds_params(stage.reference):
        assert not any(leaf.is_deleted() for leaf in initial_leaves)
    else:
        # Precomputed (after its pass) and none keep no reference params: the initial params
        # were donated to the policy, so no array of theirs is left besides the state's own.
        assert all(leaf.is_deleted() for leaf in initial_leaves)
    assert (state.reference_params is not None) == (kind == "moving")


def test_reference_free_losses_and_sft_build_no_reference(tmp_path):
    for loss_type in ("simpo", "sft", "simpo,sft"):
        config = tiny_config(dpo__loss_type=loss_type)
        assert train.reference_kind(config) == "none"
    config = tiny_config(dpo__loss_type="simpo")
    ctx, stage, _ = build(config, tmp_path)
    assert isinstance(stage.reference, reference_lib.NoReference)
    sources = train.data_sources(config)
    tokenizer = train.synthetic.make_tokenizer()
    sft = train.make_sft_stage(config, tokenizer, ctx, sources, counts={})
    assert isinstance(sft.reference, reference_lib.NoReference)


def test_tr_dpo_needs_the_moving_kind_and_the_moving_kind_a_period():
    with pytest.raises(ValueError, match="ref_sync_every=16 with config.dpo.reference='frozen'"):
        train.check_config(tiny_config(dpo__ref_sync_every=16))
    with pytest.raises(ValueError, match="ref_sync_every=0 with config.dpo.reference='moving'"):
        train.check_config(tiny_config(dpo__reference="moving"))
    with pytest.raises(ValueError, match="config.dpo.reference='in_step'; allowed"):
        train.check_config(tiny_config(dpo__reference="in_step"))


def test_an_unbound_moving_reference_and_a_missing_precomputed_batch_are_errors():
    batch = {"pair_mask": np.ones((2, 1), bool)}
    with pytest.raises(ValueError, match="bind a moving reference"):
        reference_lib.reference_logps(reference_lib.MovingReference(2, 0.5), batch, None)
    with pytest.raises(ValueError, match="needs batch\\['ref_logps'\\]"):
        reference_lib.reference_logps(reference_lib.PrecomputedReference(), batch, None)
    zeros = reference_lib.reference_logps(reference_lib.NoReference(), batch, None)
    np.testing.assert_array_equal(zeros, np.zeros((2, 2, 1), np.float32))
