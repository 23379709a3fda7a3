"""dpo_loss_fn against NumPy references written from the equations, closed forms and properties."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dpo_jax.losses import LOSS_VARIANTS, dpo_loss_fn

BETA = 0.1
# float32 arithmetic on O(1..600) values compared with float64 NumPy: a few ulps of float32.
RTOL, ATOL = 1e-5, 1e-5


# ---------------------------------------------------------------------------------------------
# Independent NumPy references (float64), one per variant, from the definitions in issue 2.
# Each takes the valid pairs only and returns the mean loss.
# ---------------------------------------------------------------------------------------------


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


def np_cdpo(z, eps):
    return np.mean(-(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z))


def np_ratios(b):
    return b["pc"] - b["rc"], b["pr"] - b["rr"]


def ref_sigmoid(b, beta, label_smoothing=0.0):
    dc, dr = np_ratios(b)
    return np_cdpo(beta * (dc - dr), label_smoothing)


def ref_hinge(b, beta):
    dc, dr = np_ratios(b)
    return np.mean(np.maximum(0.0, 1 - beta * (dc - dr)))


def ref_ipo(b, beta, lengths=False):
    dc, dr = np_ratios(b)
    if lengths:
        dc, dr = dc / b["lc"], dr / b["lr"]
    return np.mean((dc - dr - 1 / (2 * beta)) ** 2)


def ref_robust(b, beta, label_smoothing):
    dc, dr = np_ratios(b)
    z, eps = beta * (dc - dr), label_smoothing
    return np.mean((-(1 - eps) * np_log_sigmoid(z) + eps * np_log_sigmoid(-z)) / (1 - 2 * eps))


def ref_exo_pair(b, beta, label_smoothing):
    dc, dr = np_ratios(b)
    z, eps = beta * (dc - dr), label_smoothing
    qw, ql = np_sigmoid(z), np_sigmoid(-z)
    return np.mean(qw * (np.log(qw) - np.log(1 - eps)) + ql * (np.log(ql) - np.log(eps)))


def ref_nca_pair(b, beta):
    dc, dr = np_ratios(b)
    c, r = beta * dc, beta * dr
    return np.mean(-np_log_sigmoid(c) - 0.5 * np_log_sigmoid(-c) - 0.5 * np_log_sigmoid(-r))


def ref_bco_pair(b, beta, mean, count):
    dc, dr = np_ratios(b)
    batch_reward = np.mean(np.concatenate([beta * dc, beta * dr]))
    delta0 = mean + (batch_reward - mean) / (count + 1)
    return np.mean(-np_log_sigmoid(beta * dc - delta0) - np_log_sigmoid(-(beta * dr - delta0)))


def ref_sppo_hard(b, beta):
    dc, dr = np_ratios(b)
    return np.mean((dc - 1 / (2 * beta)) ** 2 + (dr + 1 / (2 * beta)) ** 2)


def ref_aot(b, beta, label_smoothing):
    delta = np.sort(b["pc"] - b["pr"]) - np.sort(b["rc"] - b["rr"])
    return np_cdpo(beta * delta, label_smoothing)


def ref_aot_unpaired(b, beta, label_smoothing):
    dc, dr = np_ratios(b)
    return np_cdpo(beta * (np.sort(dc) - np.sort(dr)), label_smoothing)


def ref_apo_zero(b, beta):
    dc, dr = np_ratios(b)
    return np.mean((1 - np_sigmoid(beta * dc)) + np_sigmoid(beta * dr))


def ref_apo_down(b, beta):
    dc, dr = np_ratios(b)
    return np.mean(np_sigmoid(beta * dc) + (1 - np_sigmoid(beta * (dc - dr))))


def ref_discopop(b, beta, tau):
    dc, dr = np_ratios(b)
    z = beta * (dc - dr)
    m = np_sigmoid(z / tau)
    return np.mean(-np_log_sigmoid(z) * (1 - m) + np.exp(-z) * m)


def ref_simpo(b, beta, gamma, label_smoothing):
    z = beta * (b["pc"] / b["lc"] - b["pr"] / b["lr"]) - gamma
    return np_cdpo(z, label_smoothing)


def ref_sigmoid_norm(b, beta):
    dc, dr = np_ratios(b)
    return np_cdpo(beta * (dc / b["lc"] - dr / b["lr"]), 0.0)


def ref_sft(b, lengths):
    if lengths:
        return -np.sum(b["pc"]) / np.sum(b["lc"])
    return -np.mean(b["pc"])


def ref_cpo(b, beta, label_smoothing):
    return np_cdpo(beta * (b["pc"] - b["pr"]), label_smoothing)


def np_log1mexp(x):
    return np.log(-np.expm1(x))


def ref_orpo(b, beta):
    chosen, rejected = b["pc"] / b["lc"], b["pr"] / b["lr"]
    log_odds = (chosen - rejected) - (np_log1mexp(chosen) - np_log1mexp(rejected))
    return np.mean(-beta * np_log_sigmoid(log_odds))


def ref_kto(b, beta, desirable_weight=1.0, undesirable_weight=1.0):
    # chosen slot: the completion; rejected slot: the mismatched completion for z₀.
    z0 = max(0.0, np.mean(b["pr"] - b["rr"]))
    delta = b["pc"] - b["rc"]
    desirable = desirable_weight * (1 - np_sigmoid(beta * (delta - z0)))
    undesirable = undesirable_weight * (1 - np_sigmoid(beta * (z0 - delta)))
    return np.mean(np.where(b["lab"] > 0.5, desirable, undesirable))


def ref_unlikelihood(b, alpha=1.0):
    # b["ul"]: Σ_t log(1 − π(y_l,t)) per pair (tests/test_unlikelihood.py builds it from tokens).
    return np.mean(-b["pc"] - alpha * b["ul"])


# (loss_type, keyword arguments for dpo_loss_fn, NumPy reference of the valid pairs)
CASES = [
    ("sigmoid", {}, lambda b: ref_sigmoid(b, BETA)),
    ("sigmoid", {"label_smoothing": 0.1}, lambda b: ref_sigmoid(b, BETA, 0.1)),
    ("hinge", {}, lambda b: ref_hinge(b, BETA)),
    ("ipo", {"ipo_form": "summed"}, lambda b: ref_ipo(b, BETA)),
    ("ipo", {"lengths": True}, lambda b: ref_ipo(b, BETA, lengths=True)),
    ("robust", {}, lambda b: ref_robust(b, BETA, 0.0)),
    ("robust", {"label_smoothing": 0.2}, lambda b: ref_robust(b, BETA, 0.2)),
    ("exo_pair", {"label_smoothing": 1e-3}, lambda b: ref_exo_pair(b, BETA, 1e-3)),
    ("exo_pair", {"label_smoothing": 0.1}, lambda b: ref_exo_pair(b, BETA, 0.1)),
    ("nca_pair", {}, lambda b: ref_nca_pair(b, BETA)),
    ("bco_pair", {}, lambda b: ref_bco_pair(b, BETA, 0.0, 0.0)),
    (
        "bco_pair",
        {"bco_running_mean": 0.3, "bco_running_count": 4.0},
        lambda b: ref_bco_pair(b, BETA, 0.3, 4.0),
    ),
    ("sppo_hard", {}, lambda b: ref_sppo_hard(b, BETA)),
    ("aot", {}, lambda b: ref_aot(b, BETA, 0.0)),
    ("aot", {"label_smoothing": 0.1}, lambda b: ref_aot(b, BETA, 0.1)),
    ("aot_unpaired", {}, lambda b: ref_aot_unpaired(b, BETA, 0.0)),
    ("aot_unpaired", {"label_smoothing": 0.1}, lambda b: ref_aot_unpaired(b, BETA, 0.1)),
    ("apo_zero", {}, lambda b: ref_apo_zero(b, BETA)),
    ("apo_down", {}, lambda b: ref_apo_down(b, BETA)),
    ("discopop", {}, lambda b: ref_discopop(b, BETA, 0.05)),
    ("discopop", {"discopop_tau": 0.5}, lambda b: ref_discopop(b, BETA, 0.5)),
    ("simpo", {"lengths": True}, lambda b: ref_simpo(b, BETA, 0.5, 0.0)),
    (
        "simpo",
        {"lengths": True, "simpo_gamma": 1.0, "label_smoothing": 0.1},
        lambda b: ref_simpo(b, BETA, 1.0, 0.1),
    ),
    ("sigmoid_norm", {"lengths": True}, lambda b: ref_sigmoid_norm(b, BETA)),
    ("sft", {"sft_form": "per_sequence"}, lambda b: ref_sft(b, lengths=False)),
    ("sft", {"lengths": True}, lambda b: ref_sft(b, lengths=True)),
    ("cpo", {}, lambda b: ref_cpo(b, BETA, 0.0)),
    ("cpo", {"label_smoothing": 0.2}, lambda b: ref_cpo(b, BETA, 0.2)),
    ("orpo", {"lengths": True}, lambda b: ref_orpo(b, BETA)),
    ("kto", {"labels": True}, lambda b: ref_kto(b, BETA)),
    (
        "kto",
        {"labels": True, "desirable_weight": 1.5, "undesirable_weight": 0.7},
        lambda b: ref_kto(b, BETA, 1.5, 0.7),
    ),
    ("unlikelihood", {"unlikelihoods": True}, lambda b: ref_unlikelihood(b)),
    (
        "unlikelihood",
        {"unlikelihoods": True, "unlikelihood_alpha": 0.3},
        lambda b: ref_unlikelihood(b, 0.3),
    ),
]
# What each variant needs passed besides the log-probs, under its default forms.
NEEDS = {"simpo": "lengths", "sigmoid_norm": "lengths", "orpo": "lengths", "ipo": "lengths"}
NEEDS.update(sft="lengths", kto="labels", exo_pair="label_smoothing", unlikelihood="unlikelihoods")


def needed_kwargs(loss_type):
    """The keyword arguments a variant cannot run without (lengths, labels or ε)."""
    need = NEEDS.get(loss_type)
    if need == "label_smoothing":
        return {"label_smoothing": 0.1}
    return {need: True} if need else {}


CASE_IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw, _ in CASES
]


def make_batch(seed: int, num_pairs: int = 8) -> dict[str, np.ndarray]:
    """Random float64 pairs: summed log-probs of a few dozen tokens, references nearby."""
    rng = np.random.default_rng(seed)
    pc = -rng.uniform(5.0, 60.0, num_pairs)
    pr = -rng.uniform(5.0, 60.0, num_pairs)
    return {
        "pc": pc,
        "pr": pr,
        "rc": pc + rng.normal(0.0, 8.0, num_pairs),
        "rr": pr + rng.normal(0.0, 8.0, num_pairs),
        "lc": rng.integers(1, 40, num_pairs).astype(np.float64),
        "lr": rng.integers(1, 40, num_pairs).astype(np.float64),
        "lab": (rng.uniform(size=num_pairs) < 0.5).astype(np.float64),  # kto: 1 = desirable
        "ul": -rng.uniform(0.1, 20.0, num_pairs),  # unlikelihood: Σ_t log(1 − π(y_l,t))
    }


def call_loss(b, loss_type, kwargs, dtype=jnp.float32, **extra):
    """dpo_loss_fn on batch `b`; kwargs may hold `lengths=True` to pass the token counts and
    `labels=True` to pass b["lab"] as kto_labels, `unlikelihoods=True` to pass b["ul"]."""
    kwargs = dict(kwargs)
    if kwargs.pop("unlikelihoods", False):
        kwargs["rejected_unlikelihoods"] = jnp.asarray(b["ul"], dtype)
    if kwargs.pop("lengths", False):
        kwargs["chosen_lengths"] = jnp.asarray(b["lc"], dtype)
        kwargs["rejected_lengths"] = jnp.asarray(b["lr"], dtype)
    if kwargs.pop("labels", False):
        kwargs["kto_labels"] = jnp.asarray(b["lab"] > 0.5)
    pc, pr, rc, rr = (jnp.asarray(b[key], dtype) for key in ("pc", "pr", "rc", "rr"))
    arrays = dict(policy_chosen_logps=pc, policy_rejected_logps=pr)
    arrays.update(ref_chosen_logps=rc, ref_rejected_logps=rr)
    arrays.update(extra)
    return dpo_loss_fn(**arrays, beta=BETA, loss_type=loss_type, **kwargs)


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_zero_margin_gives_ln2(beta):
    logps = jnp.array([-3.0, -17.5, -40.0])
    loss, metrics = dpo_loss_fn(logps, logps, logps - 1.0, logps - 1.0, beta=beta)
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], 0.0, atol=1e-6)


def test_every_registered_variant_has_a_reference_case():
    assert {name for name, _, _ in CASES} == set(LOSS_VARIANTS)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("loss_type", "kwargs", "reference"), CASES, ids=CASE_IDS)
def test_variant_matches_numpy_reference(loss_type, kwargs, reference, seed):
    b = make_batch(seed)
    loss, metrics = call_loss(b, loss_type, kwargs)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, reference(b), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics[f"loss/{loss_type}"], reference(b), rtol=RTOL, atol=ATOL)


def test_reward_metrics_match_numpy():
    b = make_batch(3)
    _, metrics = call_loss(b, "sigmoid", {})
    chosen_rewards, rejected_rewards = BETA * (b["pc"] - b["rc"]), BETA * (b["pr"] - b["rr"])
    expected = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": b["pc"].mean(),
        "logps/rejected": b["pr"].mean(),
        "loss": ref_sigmoid(b, BETA),
        "loss/sigmoid": ref_sigmoid(b, BETA),
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, rtol=RTOL, atol=ATOL, err_msg=key)


def test_extreme_margins_stay_finite():
    # log σ of a large negative argument must be the argument itself, not log(0) = −inf.
    chosen, rejected = jnp.array([-5000.0, -1.0]), jnp.array([-1.0, -5000.0])
    zeros = jnp.zeros(2)
    loss, _ = dpo_loss_fn(chosen, rejected, zeros, zeros, beta=1.0)
    np.testing.assert_allclose(loss, (4999.0 + 0.0) / 2, rtol=1e-6)
    for name in ("discopop", "exo_pair", "robust", "nca_pair", "bco_pair", "aot", "cpo"):
        smoothing = 0.1 if name == "exo_pair" else 0.0
        value, _ = dpo_loss_fn(
            chosen, rejected, zeros, zeros, beta=1.0, loss_type=name, label_smoothing=smoothing
        )
        assert np.isfinite(value), name


def test_bfloat16_inputs_are_computed_in_float32():
    b = make_batch(4)
    loss, metrics = call_loss(b, "sigmoid", {}, dtype=jnp.bfloat16)
    assert loss.dtype == jnp.float32 and metrics["rewards/chosen"].dtype == jnp.float32
    rounded = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64) for k, v in b.items()}
    np.testing.assert_allclose(loss, ref_sigmoid(rounded, BETA), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("loss_type", "kwargs", "reference"), CASES[::3], ids=CASE_IDS[::3])
def test_jit_matches_eager(loss_type, kwargs, reference):
    b = make_batch(5)
    jitted = jax.jit(lambda batch: call_loss(batch, loss_type, kwargs))
    eager_loss, eager_metrics = call_loss(b, loss_type, kwargs)
    jit_loss, jit_metrics = jitted(b)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6, atol=1e-6)
    assert set(jit_metrics) == set(eager_metrics)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def test_sigmoid_gradient_is_beta_times_sigmoid_of_minus_margin():
    # d/dlogπ(y_w) of −mean_i log σ(βδ_i) = −β·σ(−βδ_i)/P; the rejected side has the opposite sign.
    b = make_batch(6)
    num_pairs = b["pc"].shape[0]
    delta = (b["pc"] - b["rc"]) - (b["pr"] - b["rr"])
    weight = BETA * np_sigmoid(-BETA * delta) / num_pairs

    def loss(pc, pr):
        return dpo_loss_fn(pc, pr, jnp.asarray(b["rc"]), jnp.asarray(b["rr"]), beta=BETA)[0]

    grad_chosen, grad_rejected = jax.grad(loss, argnums=(0, 1))(
        jnp.asarray(b["pc"], jnp.float32), jnp.asarray(b["pr"], jnp.float32)
    )
    np.testing.assert_allclose(grad_chosen, -weight, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(grad_rejected, weight, rtol=1e-5, atol=1e-8)


def test_metrics_carry_no_gradient():
    b = make_batch(7)

    def reward_metric(pc):
        _, metrics = dpo_loss_fn(pc, jnp.asarray(b["pr"]), beta=BETA)
        return metrics["rewards/chosen"] + metrics["logps/chosen"] + metrics["loss"]

    grad = jax.grad(reward_metric)(jnp.asarray(b["pc"], jnp.float32))
    np.testing.assert_array_equal(grad, np.zeros_like(b["pc"]))


@pytest.mark.parametrize(("loss_type", "kwargs", "reference"), CASES, ids=CASE_IDS)
def test_gradients_match_finite_differences(loss_type, kwargs, reference):
    b = make_batch(8, num_pairs=5)
    kwargs = dict(kwargs)
    use_lengths = kwargs.pop("lengths", False)
    use_unlikelihoods = kwargs.pop("unlikelihoods", False)
    if kwargs.pop("labels", False):
        kwargs["kto_labels"] = jnp.asarray(b["lab"] > 0.5)
    if loss_type == "bco_pair":
        # δ₀ is a stop-gradient statistic that finite differences would see move; a huge count
        # freezes it (the batch's weight in it is 1e-15) so both sides differentiate the same.
        kwargs.update(bco_running_mean=0.2, bco_running_count=1e15)
    with jax.enable_x64(True):
        if use_unlikelihoods:
            kwargs["rejected_unlikelihoods"] = jnp.asarray(b["ul"], jnp.float64)
        if use_lengths:
            kwargs["chosen_lengths"] = jnp.asarray(b["lc"])
            kwargs["rejected_lengths"] = jnp.asarray(b["lr"])

        def loss(pc, pr, rc, rr):
            return dpo_loss_fn(pc, pr, rc, rr, beta=BETA, loss_type=loss_type, **kwargs)[0]

        args = tuple(jnp.asarray(b[key], jnp.float64) for key in ("pc", "pr", "rc", "rr"))
        assert loss(*args).dtype == jnp.float64
        if loss_type == "kto":
            # The mismatched side feeds only z₀, a stop-gradient statistic: hold it fixed.
            pr, rr = args[1], args[3]
            args, full_loss = (args[0], args[2]), loss
            loss = lambda pc, rc: full_loss(pc, pr, rc, rr)  # noqa: E731
        check_grads(loss, args, order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bradley-Terry invariance: a per-pair constant added to both responses' log-probs
# ---------------------------------------------------------------------------------------------

# These read the log-probs only through δ = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) −
# log π_ref(y_l)) (aot through the per-pair policy and reference log-ratios, cpo through the
# policy's log π(y_w) − log π(y_l)), so a constant that a pair's two responses share cancels.
SHIFT_INVARIANT = ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "aot", "cpo"]
# Settings under which they are (ipo summed, not per token; exo_pair needs ε > 0).
INVARIANT_KWARGS = {"ipo": {"ipo_form": "summed"}, "exo_pair": {"label_smoothing": 0.1}}
# These read Δc and Δr one at a time (nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, kto),
# sort Δc and Δr separately so the shift changes which values meet (aot_unpaired), divide each
# side by a different length (simpo, sigmoid_norm, orpo), or read log π(y_w) alone (sft,
# unlikelihood).
NOT_SHIFT_INVARIANT = [
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "aot_unpaired",
    "simpo",
    "sigmoid_norm",
    "sft",
    "orpo",
    "kto",
    "unlikelihood",
]

shift_arrays = st.lists(
    st.floats(-200.0, 200.0, allow_nan=False, allow_infinity=False), min_size=6, max_size=6
)


@pytest.mark.parametrize("loss_type", SHIFT_INVARIANT)
@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(policy_shift=shift_arrays, ref_shift=shift_arrays, seed=st.integers(0, 2**16))
def test_loss_invariant_to_per_pair_constant(loss_type, policy_shift, ref_shift, seed):
    b = make_batch(seed, num_pairs=6)
    c, d = np.asarray(policy_shift), np.asarray(ref_shift)
    shifted = dict(b, pc=b["pc"] + c, pr=b["pr"] + c, rc=b["rc"] + d, rr=b["rr"] + d)
    with jax.enable_x64(True):
        kwargs = INVARIANT_KWARGS.get(loss_type, {})
        loss, _ = call_loss(b, loss_type, kwargs, dtype=jnp.float64)
        shifted_loss, _ = call_loss(shifted, loss_type, kwargs, dtype=jnp.float64)
    np.testing.assert_allclose(shifted_loss, loss, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("loss_type", NOT_SHIFT_INVARIANT)
def test_loss_not_invariant_where_documented(loss_type):
    b = make_batch(9, num_pairs=6)
    # Negative shifts keep every log-prob below 0 (orpo's log(1 − e^a) needs a < 0).
    shift = np.array([-5.0, -20.0, -30.0, -1.0, -7.0, -12.0])
    shifted = dict(b, pc=b["pc"] + shift, pr=b["pr"] + shift)
    kwargs = needed_kwargs(loss_type)
    loss, _ = call_loss(b, loss_type, kwargs)
    shifted_loss, _ = call_loss(shifted, loss_type, kwargs)
    assert abs(float(shifted_loss) - float(loss)) > 1e-3


def test_invariant_lists_cover_the_registry():
    assert set(SHIFT_INVARIANT) | set(NOT_SHIFT_INVARIANT) == set(LOSS_VARIANTS)
    assert not set(SHIFT_INVARIANT) & set(NOT_SHIFT_INVARIANT)


# ---------------------------------------------------------------------------------------------
# Combinations, reference-free, masking, bco state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_rpo_is_sigmoid_plus_alpha_sft(alpha):
    b = make_batch(10)
    loss, metrics = call_loss(b, ["sigmoid", "sft"], {"lengths": True}, loss_weights=[1.0, alpha])
    expected = ref_sigmoid(b, BETA) + alpha * ref_sft(b, lengths=True)
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["loss/sft"], ref_sft(b, lengths=True), rtol=RTOL)


def test_weighted_sum_of_three_losses():
    # MPO's combination in TRL's docs: sigmoid, bco_pair, sft with weights 0.8, 0.2, 1.0.
    b = make_batch(11)
    loss, _ = call_loss(
        b,
        ["sigmoid", "bco_pair", "sft"],
        {"sft_form": "per_sequence"},
        loss_weights=[0.8, 0.2, 1.0],
    )
    expected = (
        0.8 * ref_sigmoid(b, BETA)
        + 0.2 * ref_bco_pair(b, BETA, 0.0, 0.0)
        + ref_sft(b, lengths=False)
    )
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)


def test_loss_weights_default_to_one():
    b = make_batch(12)
    loss, _ = call_loss(b, ["sigmoid", "hinge"], {})
    np.testing.assert_allclose(loss, ref_sigmoid(b, BETA) + ref_hinge(b, BETA), rtol=RTOL)


@pytest.mark.parametrize("loss_type", sorted(LOSS_VARIANTS))
def test_reference_free_takes_reference_logps_as_zero(loss_type):
    b = make_batch(13)
    kwargs = needed_kwargs(loss_type)
    zero_ref = dict(b, rc=np.zeros_like(b["rc"]), rr=np.zeros_like(b["rr"]))
    expected, expected_metrics = call_loss(zero_ref, loss_type, kwargs)
    flagged, flagged_metrics = call_loss(b, loss_type, kwargs, reference_free=True)
    np.testing.assert_allclose(flagged, expected, rtol=1e-6)
    chosen = b["lab"] > 0.5 if loss_type == "kto" else np.ones_like(b["pc"], bool)
    np.testing.assert_allclose(
        flagged_metrics["rewards/chosen"], BETA * b["pc"][chosen].mean(), rtol=RTOL
    )
    no_ref, _ = call_loss(b, loss_type, kwargs, ref_chosen_logps=None, ref_rejected_logps=None)
    np.testing.assert_allclose(no_ref, expected, rtol=1e-6)


def _pad(b, slots, fill):
    """Inserts padding pairs holding `fill` at `slots`; returns the padded batch and its mask."""
    num_pairs = b["pc"].shape[0] + len(slots)
    mask = np.ones(num_pairs, bool)
    mask[slots] = False
    padded = {}
    for key, values in b.items():
        out = np.full(num_pairs, fill if key in ("pc", "pr", "rc", "rr") else 0.0)
        out[mask] = values
        padded[key] = out
    return padded, mask


@pytest.mark.parametrize("fill", [np.nan, -np.inf])  # garbage a padding slot may hold
@pytest.mark.parametrize(("loss_type", "kwargs", "reference"), CASES, ids=CASE_IDS)
def test_padding_pairs_change_nothing(loss_type, kwargs, reference, fill):
    b = make_batch(14, num_pairs=6)
    padded, mask = _pad(b, [0, 3, 7], fill)
    loss, metrics = call_loss(b, loss_type, kwargs)
    padded_loss, padded_metrics = call_loss(padded, loss_type, kwargs, pair_mask=jnp.asarray(mask))
    np.testing.assert_allclose(padded_loss, reference(b), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(padded_loss, loss, rtol=1e-6, atol=1e-6)
    for key in metrics:
        np.testing.assert_allclose(padded_metrics[key], metrics[key], rtol=1e-6, err_msg=key)

    def loss_of_policy(pc, pr):
        return call_loss(dict(padded, pc=pc, pr=pr), loss_type, kwargs, pair_mask=mask)[0]

    grads = jax.grad(loss_of_policy, argnums=(0, 1))(
        jnp.asarray(padded["pc"], jnp.float32), jnp.asarray(padded["pr"], jnp.float32)
    )
    for grad in grads:
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(grad[~mask], 0.0)


def test_packed_batch_shape_is_accepted():
    # Packed rows give [B, S] per-pair arrays; every element is one pair.
    b = make_batch(15, num_pairs=8)
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    square = {key: values.reshape(2, 4) for key, values in b.items()}
    loss, _ = call_loss(square, "sigmoid", {}, pair_mask=jnp.asarray(mask))
    valid = {key: values[mask.reshape(-1)] for key, values in b.items()}
    np.testing.assert_allclose(loss, ref_sigmoid(valid, BETA), rtol=RTOL, atol=ATOL)


def test_all_padding_batch_gives_zero_loss():
    b = make_batch(16, num_pairs=3)
    loss, metrics = call_loss(b, "sigmoid", {}, pair_mask=jnp.zeros(3, bool))
    assert float(loss) == 0.0 and float(metrics["rewards/chosen"]) == 0.0


def test_bco_running_mean_is_the_mean_of_batch_rewards():
    # TRL's RunningMoments fed one scalar per batch: δ₀ after n batches is the average of the
    # n batch-mean rewards, and each batch's loss already uses its own update.
    batches = [make_batch(seed) for seed in (17, 18, 19)]
    running_mean, running_count = None, None
    batch_rewards = []
    for b in batches:
        dc, dr = np_ratios(b)
        batch_rewards.append(np.mean(np.concatenate([BETA * dc, BETA * dr])))
        loss, metrics = call_loss(
            b, "bco_pair", {}, bco_running_mean=running_mean, bco_running_count=running_count
        )
        running_mean, running_count = metrics["bco/running_mean"], metrics["bco/running_count"]
        delta0 = np.mean(batch_rewards)
        np.testing.assert_allclose(running_mean, delta0, rtol=1e-5)
        assert float(running_count) == len(batch_rewards)
        dc, dr = np_ratios(b)
        expected = np.mean(
            -np_log_sigmoid(BETA * dc - delta0) - np_log_sigmoid(-(BETA * dr - delta0))
        )
        np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)


def test_bco_state_ignores_padding_and_carries_no_gradient():
    b = make_batch(20, num_pairs=5)
    padded, mask = _pad(b, [1, 2], 123.0)
    _, metrics = call_loss(padded, "bco_pair", {}, pair_mask=jnp.asarray(mask))
    dc, dr = np_ratios(b)
    np.testing.assert_allclose(
        metrics["bco/running_mean"], np.mean(np.concatenate([BETA * dc, BETA * dr])), rtol=1e-5
    )

    def running_mean(pc):
        return call_loss(dict(b, pc=pc), "bco_pair", {})[1]["bco/running_mean"]

    grad = jax.grad(running_mean)(jnp.asarray(b["pc"], jnp.float32))
    np.testing.assert_array_equal(grad, 0.0)


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError that names the argument
# ---------------------------------------------------------------------------------------------

P = jnp.zeros(4)
BAD_INPUTS = [
    ({"beta": 0.0}, "beta=0.0"),
    ({"beta": -0.1}, "beta=-0.1"),
    ({"beta": float("nan")}, "beta=nan"),
    ({"loss_type": "dpo"}, "unknown loss_type 'dpo'"),
    ({"loss_type": ["sigmoid", "nope"]}, "unknown loss_type 'nope'"),
    ({"loss_type": []}, "loss_type=[]"),
    ({"loss_type": ["sigmoid", "sigmoid"]}, "names a loss twice"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights=[1.0] has 1"),
    ({"loss_weights": [1.0, 2.0]}, "loss_weights=[1.0, 2.0] has 2"),
    ({"label_smoothing": -0.1}, "label_smoothing=-0.1 must be in [0, 0.5] for loss_type 'sigmoid'"),
    ({"label_smoothing": 0.6}, "label_smoothing=0.6 must be in [0, 0.5]"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing=0.5 must be in [0, 0.5)"),
    ({"loss_type": "exo_pair", "label_smoothing": 0.7}, "label_smoothing=0.7"),
    ({"loss_type": "aot", "label_smoothing": 1.0}, "label_smoothing=1.0"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing=0.1 is not used"),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau=0.0"),
    ({"policy_rejected_logps": jnp.zeros(3)}, "policy_rejected_logps has shape (3,)"),
    ({"ref_chosen_logps": jnp.zeros((4, 1))}, "ref_chosen_logps has shape (4, 1)"),
    ({"pair_mask": jnp.ones(5, bool)}, "pair_mask has shape (5,)"),
    ({"chosen_lengths": jnp.ones(2), "rejected_lengths": jnp.ones(4)}, "chosen_lengths has shape"),
    ({"policy_chosen_logps": jnp.float32(0.0)}, "policy_chosen_logps has shape ()"),
    ({"ref_rejected_logps": None}, "ref_chosen_logps is given but ref_rejected_logps is None"),
    ({"ref_chosen_logps": None}, "ref_rejected_logps is given but ref_chosen_logps is None"),
    ({"loss_type": "simpo"}, "chosen_lengths=None but loss_type 'simpo'"),
    ({"loss_type": "sigmoid_norm", "chosen_lengths": P + 1}, "rejected_lengths=None"),
    ({"loss_type": "ipo", "chosen_lengths": P + 1}, "rejected_lengths=None but loss_type 'ipo'"),
    ({"pair_mask": jnp.ones(4, jnp.int32)}, "pair_mask must be a bool array"),
    ({"bco_running_mean": 0.0}, "bco_running_mean=0.0"),
    (
        {"loss_type": "bco_pair", "bco_reward_shift": "none", "bco_running_count": 1.0},
        "bco_reward_shift='none' keeps no running mean",
    ),
    ({"bco_reward_shift": "zero"}, "bco_reward_shift='zero' is not one of"),
    ({"loss_type": "exo_pair"}, "label_smoothing=0.0 must be in (0, 0.5] for loss_type 'exo_pair'"),
    ({"loss_type": "ipo"}, "chosen_lengths=None but loss_type 'ipo'"),
    ({"loss_type": "sft"}, "chosen_lengths=None but loss_type 'sft'"),
    ({"loss_type": "orpo"}, "chosen_lengths=None but loss_type 'orpo'"),
    ({"ipo_form": "mean"}, "ipo_form='mean' is not one of ('per_token', 'summed')"),
    ({"sft_form": "sum"}, "sft_form='sum' is not one of"),
    ({"sigmoid_label_smoothing": "trl"}, "sigmoid_label_smoothing='trl' is not one of"),
    (
        {"sigmoid_label_smoothing": "ignore", "label_smoothing": 0.1},
        "label_smoothing=0.1 is not used by loss_type=['sigmoid'] (sigmoid_label_smoothing=",
    ),
    ({"f_divergence_type": "kl"}, "f_divergence_type='kl' is not one of"),
    (
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.0},
        "f_alpha_divergence_coef=0.0 must be > 0",
    ),
    (
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": -0.5},
        "f_alpha_divergence_coef=-0.5 must be > 0",
    ),
    ({"loss_type": "nca_pair", "f_divergence_type": "forward_kl"}, "is not used by loss_type"),
    ({"loss_type": "kto"}, "loss_type 'kto' needs kto_labels"),
    ({"kto_labels": jnp.ones(4, bool)}, "only kto reads them"),
    ({"loss_type": "kto", "kto_labels": jnp.ones(4)}, "kto_labels must be a bool array"),
    ({"loss_type": ["kto", "sft"]}, "'kto' reads unpaired completions and cannot be combined"),
    (
        {"loss_type": "kto", "kto_labels": jnp.ones(4, bool), "undesirable_weight": 0.0},
        "undesirable_weight=0.0 must be > 0 for loss_type 'kto'",
    ),
    ({"loss_type": ["aot_pair", "aot_unpaired"]}, "names a loss twice"),
    ({"loss_type": "unlikelihood"}, "rejected_unlikelihoods=None but loss_type 'unlikelihood'"),
    (
        {"loss_type": "unlikelihood", "rejected_unlikelihoods": P, "unlikelihood_alpha": -1.0},
        "unlikelihood_alpha=-1.0 must be >= 0",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_argument(overrides, message):
    arguments = {
        "policy_chosen_logps": P,
        "policy_rejected_logps": P,
        "ref_chosen_logps": P,
        "ref_rejected_logps": P,
        "beta": 0.1,
    }
    arguments.update(overrides)
    with pytest.raises(ValueError) as error:
        dpo_loss_fn(**arguments)
    assert message in str(error.value)


def test_unknown_loss_message_lists_known_names():
    with pytest.raises(ValueError) as error:
        dpo_loss_fn(P, P, P, P, beta=0.1, loss_type="dpo")
    for name in LOSS_VARIANTS:
        assert repr(name) in str(error.value)


def test_validation_runs_under_jit():
    # Checks read static values and shapes only, so they fire at trace time inside jit.
    with pytest.raises(ValueError, match="beta=0"):
        jax.jit(lambda x: dpo_loss_fn(x, x, x, x, beta=0)[0])(P)
    traced_beta = jax.jit(lambda x, beta: dpo_loss_fn(x, x, x, x, beta=beta)[0])(P, 0.1)
    np.testing.assert_allclose(traced_beta, math.log(2.0), rtol=1e-6)
