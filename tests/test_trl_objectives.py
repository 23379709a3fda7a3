"""kto, orpo, cpo and simpo against TRL 1.16's own code (KTOTrainer, ORPOTrainer, CPOTrainer).

Each TRL method is called with a stand-in `self` holding the attributes it reads, on fixed
log-probs; dpo_loss_fn gets the same numbers.
"""

import collections
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its warning says the API is unstable
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

from dpo_jax.losses import dpo_loss_fn

RTOL, ATOL = 2e-6, 2e-6  # float32 on both sides
ACCELERATOR = types.SimpleNamespace(
    device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x
)


def _kto_inputs(seed: int, num: int = 8, length: int = 12):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(2, 5, num)
    completion = rng.integers(1, length - 5, num)
    positions = np.arange(length)[None, :]
    completion_mask = (positions >= prompt[:, None]) & (positions < (prompt + completion)[:, None])
    token_logps = np.where(completion_mask[:, 1:], -rng.exponential(1.0, (num, length - 1)), 0.0)
    labels = np.array([True, False] * (num // 2))
    rng.shuffle(labels)
    return dict(
        completion_mask=completion_mask,
        token_logps=token_logps.astype(np.float32),
        ref=(token_logps.sum(1) + rng.normal(0, 2, num)).astype(np.float32),
        kl=(token_logps.sum(1)[::-1] + rng.normal(0.5, 2, num)).astype(np.float32),
        ref_kl=(token_logps.sum(1)[::-1]).astype(np.float32),
        labels=labels,
    )


def trl_kto(data, beta, desirable_weight, undesirable_weight):
    shape = data["token_logps"].shape
    outputs = types.SimpleNamespace(
        log_probs=torch.tensor(data["token_logps"]),
        entropy=torch.zeros(shape),
        mean_logits=torch.zeros(shape),
    )
    stand_in = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=ACCELERATOR,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        _compute_kl_logps=lambda model, batch: torch.tensor(data["kl"]),
        _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    mask = torch.tensor(data["completion_mask"], dtype=torch.long)
    inputs = dict(
        input_ids=torch.zeros(mask.shape, dtype=torch.long),
        attention_mask=torch.ones(mask.shape, dtype=torch.long),
        completion_mask=mask,
        label=torch.tensor(data["labels"]),
        ref_logps=torch.tensor(data["ref"]),
        ref_KL_logps=torch.tensor(data["ref_kl"]),
    )
    loss = KTOTrainer._compute_loss(stand_in, lambda **kwargs: outputs, inputs, False)
    return float(loss), {key: values[-1] for key, values in stand_in._metrics["train"].items()}


@pytest.mark.parametrize(("beta", "weights"), [(0.1, (1.0, 1.0)), (0.5, (1.33, 0.8))])
@pytest.mark.parametrize("seed", [0, 1])
def test_kto_matches_trl(seed, beta, weights):
    data = _kto_inputs(seed)
    expected_loss, expected = trl_kto(data, beta, *weights)
    # The chosen slot holds the completion, the rejected slot the mismatched KL completion.
    loss, metrics = dpo_loss_fn(
        jnp.asarray(data["token_logps"].sum(1)),
        jnp.asarray(data["kl"]),
        jnp.asarray(data["ref"]),
        jnp.asarray(data["ref_kl"]),
        beta=beta,
        loss_type="kto",
        kto_labels=jnp.asarray(data["labels"]),
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )
    np.testing.assert_allclose(float(loss), expected_loss, rtol=RTOL, atol=ATOL)
    names = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins")
    for key in (*names, "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(float(metrics[key]), expected[key], rtol=RTOL, atol=ATOL)


def _pairs(seed: int, num: int = 8):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, (2, num)).astype(np.float32)
    logps = -(rng.exponential(1.0, (2, num)) * lengths).astype(np.float32)
    nll = np.float32(-logps[0].sum() / lengths[0].sum())  # TRL's per-token cross-entropy
    return logps, lengths, nll


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("seed", [2, 3])
def test_orpo_matches_trl(seed, beta):
    logps, lengths, nll = _pairs(seed)
    stand_in = types.SimpleNamespace(beta=beta, accelerator=ACCELERATOR)
    average = torch.tensor(logps / lengths)
    odds_terms = ORPOTrainer.odds_ratio_loss(stand_in, average[0], average[1])[0]
    expected = float(nll - odds_terms.mean())  # ORPOTrainer: policy_nll_loss - losses.mean()
    loss, _ = dpo_loss_fn(
        *map(jnp.asarray, logps),
        beta=beta,
        loss_type=["sft", "orpo"],
        chosen_lengths=jnp.asarray(lengths[0]),
        rejected_lengths=jnp.asarray(lengths[1]),
    )
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("trl_type", "ours", "label_smoothing", "cpo_alpha"),
    [("sigmoid", "cpo", 0.0, 1.0), ("sigmoid", "cpo", 0.2, 0.5), ("simpo", "simpo", 0.1, 0.0)]
    + [("simpo", "simpo", 0.0, 1.0)],
)
def test_cpo_and_simpo_match_trl(trl_type, ours, label_smoothing, cpo_alpha):
    logps, lengths, nll = _pairs(4)
    beta, gamma = 2.0, 0.5
    stand_in = types.SimpleNamespace(
        alpha=0.0,
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        loss_type=trl_type,
        accelerator=ACCELERATOR,
    )
    # CPOTrainer averages the log-probs per token for simpo (and ipo), sums them otherwise.
    trl_logps = torch.tensor(logps / lengths if trl_type == "simpo" else logps)
    losses = CPOTrainer.cpo_loss(stand_in, trl_logps[0], trl_logps[1])[0]
    expected = float(losses.mean() + cpo_alpha * nll)  # CPOTrainer: + cpo_alpha * nll_loss
    loss, _ = dpo_loss_fn(
        *map(jnp.asarray, logps),
        beta=beta,
        loss_type=[ours, "sft"],
        loss_weights=[1.0, cpo_alpha],
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
        chosen_lengths=jnp.asarray(lengths[0]),
        rejected_lengths=jnp.asarray(lengths[1]),
    )
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL, atol=ATOL)
