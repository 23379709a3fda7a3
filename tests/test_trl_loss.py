"""dpo_loss_fn against TRL 1.16's own loss code: `DPOTrainer._compute_loss` on fixed log-probs.

TRL's method is called with a stand-in `self` (the attributes it reads) and a model stub that
returns fixed per-token log-probs, the reference log-probs passed in the batch as precomputed.
Every loss type TRL's DPOTrainer knows is compared, alone, combined, under every f-divergence,
with LD-DPO's `ld_alpha` and WPO's `use_weighting`.
"""

import collections
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.dpo_trainer import DPOTrainer

from dpo_jax.losses import LOSS_VARIANTS, dpo_loss_fn, ld_sequence_logps, wpo_log_weights

# TRL 1.16's loss types (its error message's list in DPOTrainer._compute_loss).
TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
# The dpo_jax settings that reproduce TRL 1.16 (README, "differences from TRL").
TRL_SETTINGS = dict(sigmoid_label_smoothing="ignore", bco_reward_shift="none")
# ε TRL reads for these (robust needs < 0.5, exo_pair > 0); sigmoid and sigmoid_norm ignore it.
SMOOTHING = {"robust": 0.2, "exo_pair": 0.1, "aot": 0.1, "aot_unpaired": 0.1}
# float32 on both sides, sums of a dozen log-probs of size ~1: a few float32 ulps.
RTOL, ATOL = 2e-6, 2e-6
METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected",
)  # fmt: skip


def make_inputs(seed: int, batch_size: int = 6, length: int = 14):
    """A TRL batch ([chosen rows; rejected rows]) with random per-token log-probs on completions."""
    rng = np.random.default_rng(seed)
    rows = 2 * batch_size
    prompt_lengths = rng.integers(2, 6, rows)
    completion_lengths = rng.integers(1, length - 6, rows)
    positions = np.arange(length)[None, :]
    completion_mask = (positions >= prompt_lengths[:, None]) & (
        positions < (prompt_lengths + completion_lengths)[:, None]
    )  # [2B, T]
    attention_mask = positions < (prompt_lengths + completion_lengths)[:, None]
    # log p of token t at TRL's shifted position t - 1; zero off the completion.
    token_logps = np.where(completion_mask[:, 1:], -rng.exponential(1.5, (rows, length - 1)), 0.0)
    log_sum_sq = np.where(completion_mask[:, 1:], -rng.uniform(0.1, 3.0, (rows, length - 1)), 0.0)
    summed = token_logps.sum(1)
    ref = summed + rng.normal(0.0, 3.0, rows)
    return dict(
        completion_mask=completion_mask,
        attention_mask=attention_mask,
        token_logps=token_logps.astype(np.float32),
        log_sum_sq=log_sum_sq.astype(np.float32),
        ref_chosen=ref[:batch_size].astype(np.float32),
        ref_rejected=ref[batch_size:].astype(np.float32),
    )


def trl_loss(data, loss_type, *, beta=0.1, label_smoothing=0.0, loss_weights=None, **settings):
    """(loss, metrics) from DPOTrainer._compute_loss with a stand-in self and a model stub."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    outputs = types.SimpleNamespace(
        log_probs=torch.tensor(data["token_logps"]),
        log_sum_sq_probs=torch.tensor(data["log_sum_sq"]),
        entropy=torch.zeros(data["token_logps"].shape),
        mean_logits=torch.zeros(data["token_logps"].shape),
        is_top1=torch.zeros(data["token_logps"].shape, dtype=torch.bool),
    )
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(
            device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=settings.get("ld_alpha"),
        precompute_ref_logps=True,
        f_divergence_type=settings.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=settings.get("f_alpha_divergence_coef", 1.0),
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=settings.get("use_weighting", False),
        args=types.SimpleNamespace(discopop_tau=0.05),
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    completion_mask = torch.tensor(data["completion_mask"], dtype=torch.long)
    inputs = dict(
        input_ids=torch.zeros(completion_mask.shape, dtype=torch.long),
        attention_mask=torch.tensor(data["attention_mask"], dtype=torch.long),
        completion_mask=completion_mask,
        ref_chosen_logps=torch.tensor(data["ref_chosen"]),
        ref_rejected_logps=torch.tensor(data["ref_rejected"]),
    )
    loss = DPOTrainer._compute_loss(stand_in, lambda **kwargs: outputs, inputs, False)
    metrics = {key: values[-1] for key, values in stand_in._metrics["train"].items()}
    return float(loss), metrics


def _as_pairs(data):
    """TRL's [2B, T - 1] shifted arrays as dpo_jax's [B, 2, T] token-position arrays."""
    rows, length = data["completion_mask"].shape
    shift = lambda x: np.pad(x, ((0, 0), (1, 0))).reshape(2, rows // 2, length).swapaxes(0, 1)  # noqa: E731
    scored = shift(data["completion_mask"][:, 1:])  # [B, 2, T]
    segment_ids = data["attention_mask"].reshape(2, rows // 2, length).swapaxes(0, 1)
    return shift(data["token_logps"]), shift(data["log_sum_sq"]), scored, segment_ids.astype(int)


def ours(data, loss_type, *, beta=0.1, ld_alpha=None, use_weighting=False, **kwargs):
    token_logps, log_sum_sq, scored, segment_ids = (jnp.asarray(x) for x in _as_pairs(data))
    if ld_alpha is None:
        logps = jnp.sum(token_logps, axis=-1)  # [B, 2]
    else:
        logps = ld_sequence_logps(token_logps, scored, segment_ids.astype(jnp.int32), 1, ld_alpha)
        logps = logps[..., 0]
    lengths = jnp.sum(scored, axis=-1).astype(jnp.float32)  # [B, 2]
    weights = None
    if use_weighting:
        log_weights = wpo_log_weights(token_logps, log_sum_sq, scored, segment_ids, 1)[..., 0]
        weights = (log_weights[:, 0], log_weights[:, 1])
    return dpo_loss_fn(
        logps[:, 0],
        logps[:, 1],
        jnp.asarray(data["ref_chosen"]),
        jnp.asarray(data["ref_rejected"]),
        beta=beta,
        loss_type=loss_type,
        chosen_lengths=lengths[:, 0],
        rejected_lengths=lengths[:, 1],
        wpo_log_weights=weights,
        **TRL_SETTINGS,
        **kwargs,
    )


def assert_same(data, loss_type, **kwargs):
    expected_loss, expected_metrics = trl_loss(data, loss_type, **kwargs)
    loss, metrics = ours(data, loss_type, **kwargs)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=RTOL, atol=ATOL)
    for key in METRICS:
        np.testing.assert_allclose(
            float(metrics[key]), expected_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key
        )


def test_every_trl_loss_type_is_registered():
    assert set(TRL_LOSS_TYPES) <= set(LOSS_VARIANTS)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_loss_and_metrics_match_trl(loss_type, seed):
    assert_same(make_inputs(seed), loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0))


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_trl_ignores_label_smoothing_for_sigmoid(loss_type):
    # TRL 1.16 drops ε here; with sigmoid_label_smoothing="ignore" and ε listed for robust beside
    # it, ours does too (ε alone would be refused as unused).
    assert_same(make_inputs(2), [loss_type, "robust"], label_smoothing=0.1)


@pytest.mark.parametrize(
    ("f_divergence_type", "alpha"),
    [("forward_kl", 1.0), ("js_divergence", 1.0), ("alpha_divergence", 0.5)]
    + [("alpha_divergence", 1.5), ("alpha_divergence", 1.0)],
)
@pytest.mark.parametrize(
    "loss_type", ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm"]
)
def test_f_divergences_match_trl(loss_type, f_divergence_type, alpha):
    assert_same(
        make_inputs(3),
        loss_type,
        label_smoothing=SMOOTHING.get(loss_type, 0.0),
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=alpha,
    )


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero"])
def test_ld_alpha_matches_trl(loss_type, ld_alpha):
    assert_same(make_inputs(4), loss_type, ld_alpha=ld_alpha)


# Not sft: TRL 1.16 fails there (an in-place multiply of the expanded batch loss).
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "nca_pair", "sigmoid_norm"])
def test_wpo_weighting_matches_trl(loss_type):
    assert_same(make_inputs(5), loss_type, use_weighting=True)


def test_weighted_combination_matches_trl():
    # MPO's mixture from TRL's docs.
    assert_same(
        make_inputs(6), ["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.3
    )
