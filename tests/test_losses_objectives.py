"""f-divergence scores, LD-DPO and WPO sums against NumPy formulas, finite differences, overflow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dpo_jax.losses import dpo_loss_fn, ld_sequence_logps, wpo_log_weights

BETA = 0.1


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_scores(logratios, kind, alpha=0.5):
    """f'(t) at t = exp(log-ratio), written from the definitions (arXiv:2309.16240, table 1)."""
    t = np.exp(logratios)
    if kind == "reverse_kl":
        return np.log(t)
    if kind == "forward_kl":
        return 1 - 1 / t
    if kind == "js_divergence":
        return np.log(2 * t / (1 + t))
    return (t ** (alpha - 1) - 1) / (alpha - 1)


def _batch(seed, num=6):
    rng = np.random.default_rng(seed)
    pc, pr = -rng.uniform(5, 40, num), -rng.uniform(5, 40, num)
    return pc, pr, pc + rng.normal(0, 2, num), pr + rng.normal(0, 2, num)


KINDS = [("forward_kl", 1.0), ("js_divergence", 1.0), ("alpha_divergence", 0.5)]
KINDS += [("alpha_divergence", 2.0)]


@pytest.mark.parametrize(("kind", "alpha"), KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_f_divergence_sigmoid_matches_numpy(kind, alpha, seed):
    pc, pr, rc, rr = _batch(seed)
    margin = np_scores(pc - rc, kind, alpha) - np_scores(pr - rr, kind, alpha)
    expected = np.mean(-np_log_sigmoid(BETA * margin))
    loss, _ = dpo_loss_fn(
        *(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)),
        beta=BETA,
        f_divergence_type=kind,
        f_alpha_divergence_coef=alpha,
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "alpha"), KINDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_f_divergence_gradients_match_finite_differences(kind, alpha, loss_type):
    pc, pr, rc, rr = _batch(2, num=4)
    lengths = jnp.asarray([3.0, 7.0, 1.0, 12.0])
    with jax.enable_x64(True):

        def loss(*logps):
            return dpo_loss_fn(
                *logps,
                beta=BETA,
                loss_type=loss_type,
                f_divergence_type=kind,
                f_alpha_divergence_coef=alpha,
                chosen_lengths=lengths,
                rejected_lengths=lengths[::-1],
            )[0]

        args = tuple(jnp.asarray(x, jnp.float64) for x in (pc, pr, rc, rr))
        check_grads(loss, args, order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("kind", "alpha"), KINDS + [("alpha_divergence", 0.1)])
def test_f_divergences_stay_finite_at_extreme_log_ratios(kind, alpha, dtype):
    # Log-ratios of ±1000 put exp() far past float32's 3.4e38; the scores saturate instead.
    pc = jnp.asarray([-1000.0, -1.0, -2000.0], dtype)
    pr = jnp.asarray([-1.0, -1000.0, -1.0], dtype)
    zeros = jnp.zeros(3, dtype)

    def loss(pc, pr):
        return dpo_loss_fn(
            pc, pr, zeros, zeros, beta=1.0, f_divergence_type=kind, f_alpha_divergence_coef=alpha
        )[0]

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(pc, pr)
    assert np.isfinite(float(value)), (kind, float(value))
    for grad in grads:
        assert np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_alpha_one_is_reverse_kl():
    args = tuple(jnp.asarray(x, jnp.float32) for x in _batch(3))
    plain, _ = dpo_loss_fn(*args, beta=BETA)
    alpha_one, _ = dpo_loss_fn(
        *args, beta=BETA, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0
    )
    assert float(plain) == float(alpha_one)


def test_sigmoid_label_smoothing_cdpo_vs_trl_ignore():
    args = tuple(jnp.asarray(x, jnp.float32) for x in _batch(4))
    pc, pr, rc, rr = _batch(4)
    z = BETA * ((pc - rc) - (pr - rr))
    cdpo = np.mean(-0.9 * np_log_sigmoid(z) - 0.1 * np_log_sigmoid(-z))
    ours, _ = dpo_loss_fn(*args, beta=BETA, label_smoothing=0.1)
    np.testing.assert_allclose(float(ours), cdpo, rtol=1e-6)
    trl, _ = dpo_loss_fn(
        *args,
        beta=BETA,
        loss_type=["sigmoid", "robust"],
        label_smoothing=0.1,
        sigmoid_label_smoothing="ignore",
    )
    robust = np.mean((-0.9 * np_log_sigmoid(z) + 0.1 * np_log_sigmoid(-z)) / 0.8)
    np.testing.assert_allclose(float(trl), np.mean(-np_log_sigmoid(z)) + robust, rtol=1e-6)


def test_bco_without_shift_is_trl_form():
    pc, pr, rc, rr = _batch(5)
    expected = np.mean(-np_log_sigmoid(BETA * (pc - rc)) - np_log_sigmoid(-BETA * (pr - rr)))
    loss, metrics = dpo_loss_fn(
        *(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)),
        beta=BETA,
        loss_type="bco_pair",
        bco_reward_shift="none",
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert "bco/running_mean" not in metrics


# ---------------------------------------------------------------------------------------------
# LD-DPO and WPO sums from per-token log-probs, packed rows included
# ---------------------------------------------------------------------------------------------


def _packed_rows(seed):
    """[B, 2, T] token log-probs, scored mask and segment ids of rows with two pairs each."""
    rng = np.random.default_rng(seed)
    batch, length = 3, 20
    segment_ids = np.zeros((batch, 2, length), int)
    scored = np.zeros((batch, 2, length), bool)
    for b in range(batch):
        for side in range(2):
            start = 0
            for slot in (1, 2):
                prompt, response = rng.integers(1, 4), rng.integers(1, 6)
                segment_ids[b, side, start : start + prompt + response] = slot
                scored[b, side, start + prompt : start + prompt + response] = True
                start += prompt + response
    token_logps = np.where(scored, -rng.exponential(1.0, scored.shape), 0.0)
    log_sum_sq = np.where(scored, -rng.uniform(0.1, 2.0, scored.shape), 0.0)
    return token_logps, log_sum_sq, scored, segment_ids


def np_ld(token_logps, scored, segment_ids, alpha):
    batch = token_logps.shape[0]
    out = np.zeros((batch, 2, 2))
    for b in range(batch):
        for slot in (1, 2):
            sides = [token_logps[b, s][scored[b, s] & (segment_ids[b, s] == slot)] for s in (0, 1)]
            shared = min(len(sides[0]), len(sides[1]))
            for s in (0, 1):
                out[b, s, slot - 1] = sides[s][:shared].sum() + alpha * sides[s][shared:].sum()
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_ld_sequence_logps_matches_numpy_on_packed_rows(alpha):
    token_logps, _, scored, segment_ids = _packed_rows(0)
    got = ld_sequence_logps(
        jnp.asarray(token_logps, jnp.float32),
        jnp.asarray(scored),
        jnp.asarray(segment_ids),
        2,
        alpha,
    )
    np.testing.assert_allclose(got, np_ld(token_logps, scored, segment_ids, alpha), rtol=1e-6)


def test_wpo_log_weights_match_numpy_and_carry_no_gradient():
    token_logps, log_sum_sq, scored, segment_ids = _packed_rows(1)
    expected = np.zeros((3, 2, 2))
    for slot in (1, 2):
        in_slot = scored & (segment_ids == slot)
        aligned = np.where(in_slot, token_logps - log_sum_sq, 0.0).sum(-1)
        expected[..., slot - 1] = aligned / in_slot.sum(-1)
    args = (jnp.asarray(scored), jnp.asarray(segment_ids), 2)
    got = wpo_log_weights(jnp.asarray(token_logps), jnp.asarray(log_sum_sq), *args)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(wpo_log_weights(x, jnp.asarray(log_sum_sq), *args)))(
        jnp.asarray(token_logps, jnp.float32)
    )
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("ld_alpha", [-0.1, 1.5, "half"])
def test_ld_alpha_outside_unit_interval_is_an_error(ld_alpha):
    token_logps, _, scored, segment_ids = _packed_rows(2)
    with pytest.raises(ValueError, match=rf"ld_alpha={ld_alpha!r} must be None or in \[0, 1\]"):
        ld_sequence_logps(token_logps, scored, segment_ids, 2, ld_alpha)
