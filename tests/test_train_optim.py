"""The optimizer builder: schedules against closed forms, clipping, and bad settings."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax.run.optim import make_optimizer, make_schedule


def _schedule(decay, **kwargs):
    args = dict(warmup_steps=10, decay=decay, total_steps=110, final_fraction=0.1)
    args.update(kwargs)
    return make_schedule(2e-3, **args)


@pytest.mark.parametrize("decay", ["constant", "cosine", "linear"])
def test_linear_warmup_from_zero(decay):
    schedule = _schedule(decay)
    for step in (0, 3, 7):
        np.testing.assert_allclose(schedule(step), 2e-3 * step / 10, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 2e-3, rtol=1e-6)


def test_decays_after_warmup():
    # 100 decay steps from the peak 2e-3 to 10% of it.
    for step in (10, 35, 60, 110):
        t = (step - 10) / 100
        cosine = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)))
        linear = 2e-3 * (1 - 0.9 * t)
        np.testing.assert_allclose(_schedule("cosine")(step), cosine, rtol=1e-5)
        np.testing.assert_allclose(_schedule("linear")(step), linear, rtol=1e-5)
        np.testing.assert_allclose(_schedule("constant")(step), 2e-3, rtol=1e-6)


def test_no_warmup_starts_at_the_peak():
    np.testing.assert_allclose(_schedule("constant", warmup_steps=0)(0), 2e-3, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(decay="exponential"), "decay='exponential' is unknown"),
        (dict(warmup_steps=200), r"warmup_steps=200 must be in \[0, total_steps=110\]"),
        (dict(final_fraction=1.5), r"final_fraction=1.5 must be in \[0, 1\]"),
    ],
)
def test_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _schedule(kwargs.pop("decay", "cosine"), **kwargs)


def _optimizer(name="adamw", **kwargs):
    args = dict(weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, rmsprop_decay=0.9, max_grad_norm=1.0)
    args.update(kwargs)
    return make_optimizer(name, optax.constant_schedule(0.1), **args)


def test_rmsprop_first_update_closed_form():
    # nu = (1 - decay)·g², update = −lr·g / (sqrt(nu) + eps); no clipping here.
    tx = _optimizer("rmsprop", max_grad_norm=None)
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([0.5, -2.0, 1e-3])}
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = -0.1 * grads["w"] / (np.sqrt(0.1 * grads["w"] ** 2) + 1e-8)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


def test_global_norm_clipping_before_the_optimizer():
    # With clipping to 1, a gradient of norm 10 updates as its rescaled copy of norm 1.
    tx = _optimizer("rmsprop", max_grad_norm=1.0)
    plain = _optimizer("rmsprop", max_grad_norm=None)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([6.0, 0.0]), "b": jnp.array([8.0])}
    clipped = {key: value / 10.0 for key, value in grads.items()}
    updates, _ = tx.update(grads, tx.init(params), params)
    expected, _ = plain.update(clipped, plain.init(params), params)
    for key in grads:
        np.testing.assert_allclose(updates[key], expected[key], rtol=1e-6)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("sgd", {}, r"optimizer.name='sgd' is unknown; known: \('adamw', 'rmsprop'\)"),
        ("rmsprop", dict(weight_decay=0.01), "weight_decay=0.01 is not applied by rmsprop"),
        ("adamw", dict(max_grad_norm=-1.0), "max_grad_norm=-1.0 must be >= 0"),
    ],
)
def test_bad_optimizer_settings(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _optimizer(name, **kwargs)
