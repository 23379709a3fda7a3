"""Every setting of a training config checked in one place, before any model is built.

`check_config` runs the library's own validators (the loss's hyper-parameter checks, the
schedule, the optimizer, the data limits and batching) on the config's values, plus range checks
for the fields that have no validator of their own, so a bad value fails in a second with the
field named, not after SFT has trained for minutes. Reusing the validators, rather than restating
their rules here, keeps one definition of what is allowed.
"""

import re
from typing import Any

import jax.numpy as jnp
import ml_collections

from dpo_jax import lora
from dpo_jax import reference as reference_lib
from dpo_jax.data.hf_datasets import parse_columns
from dpo_jax.data.pipeline import check_batching
from dpo_jax.data.tokenize import check_limits
from dpo_jax.losses import LOSS_ALIASES, LOSS_VARIANTS, dpo_loss_fn
from dpo_jax.models import gguf_blocks, linear, quantize
from dpo_jax.models.config import ATTENTION_IMPLS
from dpo_jax.run.optim import make_optimizer, make_schedule

MODEL_SOURCES = ("random", "hf", "gguf")
DTYPES = ("float32", "bfloat16")
ON_NONFINITE = ("stop", "skip")
# The block types a plan can quantise a random model to (config.model.quantized_type).
QUANTIZED_TYPES = tuple(
    name for name in gguf_blocks.SUPPORTED_TYPES if name not in linear.FLOAT_TYPES
)


def loss_names(loss_type: str) -> tuple[str, ...]:
    """'sigmoid' or 'sigmoid,sft' -> ('sigmoid',) or ('sigmoid', 'sft')."""
    return tuple(name.strip() for name in loss_type.split(",") if name.strip())


def loss_weights(text: str, field: str = "config.dpo.loss_weights") -> tuple[float, ...] | None:
    """'1,0.5' -> (1.0, 0.5); '' -> None.

    Raises:
      ValueError: an entry that is not a number.
    """
    weights = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            weights.append(float(entry))
        except ValueError:
            raise ValueError(f"{field}={text!r}: {entry!r} is not a number") from None
    return tuple(weights) or None


def check_config(config: ml_collections.ConfigDict, *, planning: bool = False) -> None:
    """Validates every field a run reads, so that a bad value fails before anything is built.

    Args:
      config: the config.
      planning: the config is compiled by the planner (`dpo_jax.benchmarks.planner`), not
        trained: a quantised base may then come from no file (model.source="random"), as blocks
        of config.model.quantized_type shaped like the float params.

    Raises:
      ValueError: naming the field, its value and what was expected.
    """
    _check_non_negative(
        config,
        ("sft.num_steps", "dpo.num_steps", "log.eval_every_steps", "log.num_eval_batches"),
    )
    _check_positive(config, ("checkpoint.every_steps", "checkpoint.keep", "log.every_steps"))
    _check_model(config.model)
    _check_mesh(config)
    _check_loss(config.dpo)
    _check_reference(config.dpo)
    _check_lora(config)
    _check_quantized(config, planning)
    _check_optimizer(config)
    _check_data(config.data, config.optimizer.grad_accum_steps)
    _check_choice(config, "guards.on_nonfinite", ON_NONFINITE)
    _check_positive(config, ("guards.collapse_patience", "guards.max_skipped_steps"))
    _check_ppo(config)


def _check_ppo(config: ml_collections.ConfigDict) -> None:
    """config.ppo's ranges (its reward source is checked when PPO runs: `ppo_train`)."""
    _check_non_negative(config, ("ppo.num_steps", "ppo.warmup_steps", "ppo.max_new_tokens"))
    _check_positive(config, ("ppo.rollout_batch_size", "ppo.num_minibatches", "ppo.epochs"))
    ppo = config.ppo
    if ppo.rollout_batch_size % ppo.num_minibatches:
        raise ValueError(
            f"config.ppo.rollout_batch_size={ppo.rollout_batch_size} must divide into "
            f"config.ppo.num_minibatches={ppo.num_minibatches} equal minibatches"
        )
    for field in ("learning_rate", "clip_range", "clip_range_value"):
        if not ppo[field] > 0:
            raise ValueError(f"config.ppo.{field}={ppo[field]!r} must be > 0")
    if not ppo.kl_horizon > 0:
        raise ValueError(f"config.ppo.kl_horizon={ppo.kl_horizon!r} must be > 0")
    if ppo.kl_target and not ppo.kl_coef > 0:
        raise ValueError(
            f"config.ppo.kl_target={ppo.kl_target!r} with kl_coef={ppo.kl_coef!r}: the adaptive "
            "controller scales β, so it must start > 0"
        )
    for field in ("kl_coef", "kl_target", "value_coef"):
        if not ppo[field] >= 0:
            raise ValueError(f"config.ppo.{field}={ppo[field]!r} must be >= 0")
    for field in ("gamma", "lam"):
        if not 0 <= ppo[field] <= 1:
            raise ValueError(f"config.ppo.{field}={ppo[field]!r} must be in [0, 1]")
    if ppo.reward_model and ppo.true_reward:
        raise ValueError(
            f"config.ppo.reward_model={ppo.reward_model!r} and config.ppo.true_reward="
            f'{ppo.true_reward!r}: PPO takes one reward source; set the other to ""'
        )


def _value(config: ml_collections.ConfigDict, field: str) -> Any:
    group, key = field.split(".")
    return config[group][key]


def _check_positive(config, fields) -> None:
    for field in fields:
        if not _value(config, field) >= 1:
            raise ValueError(f"config.{field}={_value(config, field)!r} must be >= 1")


def _check_non_negative(config, fields) -> None:
    for field in fields:
        if not _value(config, field) >= 0:
            raise ValueError(f"config.{field}={_value(config, field)!r} must be >= 0")


def _check_choice(config, field: str, allowed: tuple[str, ...]) -> None:
    if _value(config, field) not in allowed:
        raise ValueError(f"config.{field}={_value(config, field)!r}; allowed: {allowed}")


def _check_model(model: ml_collections.ConfigDict) -> None:
    if model.source not in MODEL_SOURCES:
        raise ValueError(f"config.model.source={model.source!r}; allowed: {MODEL_SOURCES}")
    if model.source == "hf" and not model.hf_path:
        raise ValueError("config.model.source='hf' needs config.model.hf_path (a model directory)")
    for field in ("dtype", "param_dtype"):
        if model[field] not in DTYPES:
            raise ValueError(f"config.model.{field}={model[field]!r}; allowed: {DTYPES}")
    if model.attention_impl not in ATTENTION_IMPLS:
        raise ValueError(
            f"config.model.attention_impl={model.attention_impl!r}; allowed: {ATTENTION_IMPLS}"
        )
    if model.attention_block_size < 0:
        raise ValueError(
            f"config.model.attention_block_size={model.attention_block_size} must be >= 0"
        )
    if model.logits_chunk_size < 0:
        raise ValueError(f"config.model.logits_chunk_size={model.logits_chunk_size} must be >= 0")


def _check_mesh(config: ml_collections.ConfigDict) -> None:
    """Context parallelism (config.mesh.sequence) attends inside XLA (`models.context_parallel`);
    the kernels' masks assume whole rows. The row length and attention block size are checked
    against the resolved axis size by `train.make_mesh` (`sharding.check_row_length`)."""
    sequence = config.mesh.sequence
    if not (sequence >= 1 or sequence == -1):
        raise ValueError(f"config.mesh.sequence={sequence!r} must be >= 1 or -1")
    if sequence == 1:
        return
    if config.model.attention_impl != "xla":
        raise ValueError(
            f"config.mesh.sequence={sequence} with config.model.attention_impl="
            f"{config.model.attention_impl!r}: context parallelism supports 'xla' attention only"
        )


def _check_quantized(config: ml_collections.ConfigDict, planning: bool) -> None:
    """A quantised base (QLoRA: a GGUF's blocks, or an HF checkpoint quantised on load) is
    frozen: only LoRA adapters train over it. A plan may also quantise a random model's shapes
    to config.model.quantized_type."""
    if not config.model.quantized:
        return
    sources = ("gguf", "hf", "random") if planning else ("gguf", "hf")
    if config.model.source not in sources:
        raise ValueError(
            f"config.model.quantized=True needs a pretrained base, config.model.source='gguf' "
            f"or 'hf' (found {config.model.source!r})"
            + ("; a plan may also quantise source='random'" if planning else "")
        )
    if config.model.source == "hf":
        quantize.check_hf_type(config.model.quantized_type)
    if config.model.source == "random" and config.model.quantized_type not in QUANTIZED_TYPES:
        raise ValueError(
            f"config.model.quantized_type={config.model.quantized_type!r}; allowed: "
            f"{', '.join(QUANTIZED_TYPES)}"
        )
    if not config.lora.rank or config.sft.num_steps:
        raise ValueError(
            "config.model.quantized=True keeps the base frozen in its blocks: it needs LoRA "
            f"(config.lora.rank >= 1, found {config.lora.rank}) and no full-model SFT stage "
            f"(config.sft.num_steps=0, found {config.sft.num_steps})"
        )


def _check_loss(dpo: ml_collections.ConfigDict) -> None:
    """The loss's own checks, run on one dummy pair with the config's hyper-parameters."""
    names = loss_names(dpo.loss_type)
    for name in names or ("",):
        if name not in LOSS_VARIANTS and name not in LOSS_ALIASES:
            raise ValueError(
                f"config.dpo.loss_type: unknown loss {name!r}; known: {sorted(LOSS_VARIANTS)}"
            )
    weights = loss_weights(dpo.loss_weights)
    one = jnp.zeros((1,), jnp.float32)
    try:
        dpo_loss_fn(
            one,
            one,
            one,
            one,
            beta=dpo.beta,
            loss_type=names,
            label_smoothing=dpo.label_smoothing,
            loss_weights=weights,
            chosen_lengths=one + 1,
            rejected_lengths=one + 1,
            f_divergence_type=dpo.f_divergence_type,
            f_alpha_divergence_coef=dpo.f_alpha_divergence_coef,
            sigmoid_label_smoothing=dpo.sigmoid_label_smoothing,
            bco_reward_shift=dpo.bco_reward_shift,
            ipo_form=dpo.ipo_form,
            simpo_gamma=dpo.simpo_gamma,
            desirable_weight=dpo.kto_desirable_weight,
            undesirable_weight=dpo.kto_undesirable_weight,
            unlikelihood_alpha=dpo.unlikelihood_alpha,
            rejected_unlikelihoods=one - 1,
            kto_labels=one > 0 if "kto" in names else None,
            wpo_log_weights=(one, one) if dpo.use_weighting else None,
        )
    except (ValueError, TypeError) as error:
        raise ValueError(f"config.dpo (loss_type={dpo.loss_type!r}): {error}") from None
    if not 0 <= dpo.ld_alpha <= 1:
        raise ValueError(f"config.dpo.ld_alpha={dpo.ld_alpha} must be in [0, 1] (1 = off)")


def _check_reference(dpo: ml_collections.ConfigDict) -> None:
    kinds = tuple(reference_lib.KINDS)
    if dpo.reference not in kinds:
        raise ValueError(f"config.dpo.reference={dpo.reference!r}; allowed: {kinds}")
    if (dpo.reference == "moving") != (dpo.ref_sync_every > 0):
        raise ValueError(
            f"config.dpo.ref_sync_every={dpo.ref_sync_every} with "
            f"config.dpo.reference={dpo.reference!r}: TR-DPO is reference='moving' with "
            "ref_sync_every >= 1; every other kind needs ref_sync_every=0"
        )
    if not 0 <= dpo.ref_sync_alpha <= 1:
        raise ValueError(f"config.dpo.ref_sync_alpha={dpo.ref_sync_alpha} must be in [0, 1]")


def lora_targets(targets: str) -> tuple[str, ...]:
    """config.lora.targets as a tuple of regexes."""
    return tuple(pattern.strip() for pattern in targets.split(",") if pattern.strip())


def _check_regexes(field: str, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"config.{field}: {pattern!r} is not a regex ({err})") from err


def _check_lora(config: ml_collections.ConfigDict) -> None:
    _check_regexes("optimizer.trainable", lora_targets(config.optimizer.trainable))
    lora_config, kind = config.lora, config.dpo.reference
    if lora_config.rank == 0:
        if kind == "adapters_off":
            raise ValueError(
                "config.dpo.reference='adapters_off' needs LoRA: set config.lora.rank >= 1"
            )
        return
    targets = lora_targets(lora_config.targets)
    lora.check_spec(
        lora_config.rank, lora_config.alpha, targets, lora_config.dropout, lora_config.merged
    )
    _check_regexes("lora.targets", targets)
    if kind not in ("adapters_off", "frozen"):
        raise ValueError(
            f"config.dpo.reference={kind!r} with config.lora.rank={lora_config.rank}: LoRA's "
            "reference is its base with the adapters off (reference='adapters_off'), the one "
            "copy of the base it holds anyway"
        )


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
    """The schedules of both stages and the optimizer, built as training builds them."""
    opt = config.optimizer
    stages = [("optimizer", opt.learning_rate, opt.warmup_steps, config.dpo.num_steps)]
    if config.sft.num_steps:
        sft = config.sft
        stages.append(("sft", sft.learning_rate, sft.warmup_steps, sft.num_steps))
    for group, learning_rate, warmup_steps, num_steps in stages:
        try:
            schedule = make_schedule(
                learning_rate,
                warmup_steps=min(warmup_steps, num_steps),
                decay=opt.decay,
                total_steps=max(num_steps, 1),
                final_fraction=opt.final_fraction,
            )
        except ValueError as error:
            raise ValueError(f"config.{group}: {error}") from None
        if warmup_steps < 0:
            raise ValueError(f"config.{group}.warmup_steps={warmup_steps} must be >= 0")
    try:
        make_optimizer(
            opt.name,
            schedule,
            weight_decay=opt.weight_decay,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            rmsprop_decay=opt.rmsprop_decay,
            max_grad_norm=opt.max_grad_norm or None,
        )
    except ValueError as error:
        raise ValueError(f"config.{error}") from None  # its messages name "optimizer.<field>"
    if opt.max_grad_norm < 0:
        raise ValueError(f"config.optimizer.max_grad_norm={opt.max_grad_norm} must be >= 0")
    if opt.grad_accum_steps < 1:
        raise ValueError(f"config.optimizer.grad_accum_steps={opt.grad_accum_steps} must be >= 1")


def _check_data(data: ml_collections.ConfigDict, grad_accum_steps: int) -> None:
    try:
        check_limits(
            data.max_length,
            data.max_prompt_length or None,
            data.truncation_mode,
            data.prompt_too_long,
            data.boundary,
            data.on_boundary_problem,
        )
        for batch_size in (data.batch_size, data.eval_batch_size):
            check_batching(batch_size, data.pairs_per_row, None, 0, 1)
    except ValueError as error:
        raise ValueError(f"config.data: {error}") from None
    if not 0 <= data.max_unknown_token_rate <= 1:
        raise ValueError(
            f"config.data.max_unknown_token_rate={data.max_unknown_token_rate} must be in [0, 1]"
        )
    if data.batch_size % grad_accum_steps:
        raise ValueError(
            f"config.data.batch_size={data.batch_size} must be divisible by "
            f"config.optimizer.grad_accum_steps={grad_accum_steps}"
        )
    parse_columns(data.columns)  # field=column pairs, named in the error
