"""The stages of a run, built from its config: data iterators, optimizer, loss options, reference.

`dpo_jax.run.train.train_and_evaluate` calls these (and re-exports them); each reads the ConfigDict
and hands explicit arguments to the modules below it.
"""

import functools
import time
from typing import Any

import jax
import ml_collections

from dpo_jax import lora, sharding, storage
from dpo_jax import reference as reference_lib
from dpo_jax import step as step_lib
from dpo_jax.data import coverage, hf_datasets, records, synthetic
from dpo_jax.data.pipeline import make_eval_batches, make_pair_iterator
from dpo_jax.run import ref_cache, ref_logps
from dpo_jax.run.config_checks import lora_targets, loss_names, loss_weights
from dpo_jax.run.optim import make_optimizer, make_schedule, only_trainable
from dpo_jax.run.stage import Context, Stage

# config.dpo.reference: the kinds of dpo_jax.reference.
REFERENCES = tuple(reference_lib.KINDS)
# Losses that read no reference log-probs (sft, simpo, cpo, orpo): with only these, the stage
# builds no reference at all, whatever config.dpo.reference says.
REFERENCE_FREE_LOSSES = step_lib.REFERENCE_FREE_LOSSES


def _rows_of(mesh: jax.sharding.Mesh) -> dict[str, int]:
    """The pipeline's process_index/process_count: this process's block of every batch's rows
    (`sharding.row_group`: processes whose devices share rows read the same block)."""
    process_index, process_count = sharding.row_group(mesh)
    return dict(process_index=process_index, process_count=process_count)


def _data_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(
        max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length or None,
        truncation_mode=config.data.truncation_mode,
        prompt_too_long=config.data.prompt_too_long,
        boundary=config.data.boundary,
        on_boundary_problem=config.data.on_boundary_problem,
        pairs_per_row=config.data.pairs_per_row,
    )


def data_sources(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(train source, eval source or None): synthetic records, the configured paths, or the
    configured Hugging Face datasets opened at data.split / data.eval_split with data.columns
    (`dpo_jax.data.hf_datasets`; the reference cache then keys on their fingerprints), or
    prepared TFDS directories opened at those splits (`dpo_jax.data.tfds_source`, staged locally
    first when they are URLs)."""
    if config.data.source == "synthetic":
        return (
            synthetic.make_records(config.data.num_train_pairs, seed=config.seed, split="train"),
            synthetic.make_records(config.data.num_eval_pairs, seed=config.seed, split="eval"),
        )
    columns = hf_datasets.parse_columns(config.data.columns)
    sources = []
    for source, split in (
        (config.data.source, config.data.split),
        (config.data.eval_source, config.data.eval_split),
    ):
        if hf_datasets.is_hf_path(source):
            source = hf_datasets.open_source(source, split=split, columns=columns)
        elif records.is_tfds_directory(source):
            from dpo_jax.data import tfds_source  # imports tensorflow_datasets: only when used

            source = tfds_source.PreferenceDataSource.from_directory(source, split)
        sources.append(source or None)
    return sources[0], sources[1]


def _kto_options(config, stage: str, batch_size: int) -> dict[str, Any]:
    """KTO's DPO stage reads unpaired records, mismatched completions rotated per batch."""
    if stage == "dpo" and "kto" in loss_names(config.dpo.loss_type):
        return dict(kl_group_size=batch_size)
    return {}


def _train_batches(config, tokenizer, source, counts: dict, stage: str, mesh):
    name = source if isinstance(source, str) else f"[{stage}] train records"
    coverage.check(source, tokenizer, max_rate=config.data.max_unknown_token_rate, name=name)
    iterator, stats = make_pair_iterator(
        source,
        tokenizer,
        batch_size=config.data.batch_size,
        seed=config.data.shuffle_seed,
        **_data_options(config),
        **_rows_of(mesh),
        **_kto_options(config, stage, config.data.batch_size),
    )
    counts[f"{stage}/train"] = stats.as_dict()
    _say(f"[{stage}] train data: {stats}")
    if stats.rows < config.data.batch_size:
        raise ValueError(
            f"{name}: {stats.rows} rows of kept pairs, fewer than one batch "
            f"(config.data.batch_size={config.data.batch_size}): every batch would repeat "
            "records; add records or lower the batch size"
        )
    return iterator


def _eval_batches(config, tokenizer, source, counts: dict, stage: str, mesh) -> list:
    if source is None:
        return []
    batches, stats = make_eval_batches(
        source,
        tokenizer,
        batch_size=config.data.eval_batch_size,
        **_data_options(config),
        **_rows_of(mesh),
        **_kto_options(config, stage, config.data.eval_batch_size),
    )
    counts[f"{stage}/eval"] = stats.as_dict()
    _say(f"[{stage}] eval data: {stats}")
    return list(batches)


def stage_optimizer(config, learning_rate: float, warmup_steps: int, num_steps: int):
    """(optax transformation, schedule) of a stage of `num_steps` at this peak rate."""
    schedule = make_schedule(
        learning_rate,
        warmup_steps=min(warmup_steps, num_steps),
        decay=config.optimizer.decay,
        total_steps=num_steps,
        final_fraction=config.optimizer.final_fraction,
    )
    tx = make_optimizer(
        config.optimizer.name,
        schedule,
        weight_decay=config.optimizer.weight_decay,
        b1=config.optimizer.b1,
        b2=config.optimizer.b2,
        eps=config.optimizer.eps,
        rmsprop_decay=config.optimizer.rmsprop_decay,
        max_grad_norm=config.optimizer.max_grad_norm or None,
    )
    return only_trainable(tx, lora_targets(config.optimizer.trainable)), schedule


def loss_options(
    config, loss_type: tuple[str, ...], final_logit_softcapping: float | None = None
) -> step_lib.LossOptions:
    """The step's static options for `loss_type`, from the config's DPO and model fields."""
    weights = loss_weights(config.dpo.loss_weights)
    ld_alpha = config.dpo.ld_alpha if config.dpo.ld_alpha < 1 else None  # 1: plain sums
    return step_lib.LossOptions(
        loss_type=loss_type,
        loss_weights=weights if loss_type != ("sft",) else None,
        beta=config.dpo.beta,
        label_smoothing=config.dpo.label_smoothing if loss_type != ("sft",) else 0.0,
        logits_chunk_size=config.model.logits_chunk_size or None,
        num_microbatches=config.optimizer.grad_accum_steps,
        final_logit_softcapping=final_logit_softcapping,
        f_divergence_type=config.dpo.f_divergence_type,
        f_alpha_divergence_coef=config.dpo.f_alpha_divergence_coef,
        sigmoid_label_smoothing=config.dpo.sigmoid_label_smoothing,
        bco_reward_shift=config.dpo.bco_reward_shift,
        ipo_form=config.dpo.ipo_form,
        simpo_gamma=config.dpo.simpo_gamma,
        desirable_weight=config.dpo.kto_desirable_weight,
        undesirable_weight=config.dpo.kto_undesirable_weight,
        unlikelihood_alpha=config.dpo.unlikelihood_alpha,
        ld_alpha=ld_alpha if loss_type != ("sft",) else None,
        use_weighting=config.dpo.use_weighting and loss_type != ("sft",),
    )


def make_sft_stage(config, tokenizer, ctx: Context, sources, counts: dict) -> Stage:
    """The SFT stage: NLL per chosen token, no reference."""
    tx, schedule = stage_optimizer(
        config, config.sft.learning_rate, config.sft.warmup_steps, config.sft.num_steps
    )
    return Stage(
        name="sft",
        num_steps=config.sft.num_steps,
        options=loss_options(config, ("sft",), ctx.final_logit_softcapping),
        tx=tx,
        schedule=schedule,
        reference=reference_lib.NoReference(),
        train_batches=_train_batches(config, tokenizer, sources[0], counts, "sft", ctx.mesh),
        eval_batches=_eval_batches(config, tokenizer, sources[1], counts, "sft", ctx.mesh),
    )


def reference_kind(config: ml_collections.ConfigDict) -> str:
    """The DPO stage's kind of reference: "adapters_off" with LoRA (whose policy is built on
    the base it holds), else config.dpo.reference, or "none" when every listed loss reads no
    reference (simpo, sft)."""
    if config.lora.rank:
        return "adapters_off"
    if all(name in REFERENCE_FREE_LOSSES for name in loss_names(config.dpo.loss_type)):
        return "none"
    return config.dpo.reference


def make_reference(config: ml_collections.ConfigDict, initial_params: Any):
    """The DPO stage's reference value, of the kind `reference_kind(config)`; a precomputed one
    carries nothing (its log-probs are attached to the batches by `make_dpo_stage`)."""
    match reference_kind(config):
        case "frozen":
            return reference_lib.FrozenReference(initial_params)
        case "moving":
            return reference_lib.MovingReference(
                sync_every=config.dpo.ref_sync_every, alpha=config.dpo.ref_sync_alpha
            )
        case "precomputed" | "cached":
            return reference_lib.PrecomputedReference()
        case "none":
            return reference_lib.NoReference()
        case "adapters_off":
            spec = lora.LoraSpec(
                config.lora.rank,
                config.lora.alpha,
                lora_targets(config.lora.targets),
                dropout=config.lora.dropout,
                merged=config.lora.merged,
            )
            lora.target_paths(initial_params, spec)  # each pattern must match a linear kernel
            if config.model.quantized:
                lora.check_quantized_targets(initial_params, spec)
            return reference_lib.AdaptersOffReference(
                initial_params,
                spec=spec,
                seed=config.seed,
                # Abstract params (the planner) have no bytes to hash.
                base_fingerprint=ref_cache.params_digest(initial_params)
                if all(isinstance(x, jax.Array) for x in jax.tree.leaves(initial_params))
                else "",
            )
    raise ValueError(f"config.dpo.reference={config.dpo.reference!r}; allowed: {REFERENCES}")


def make_dpo_stage(
    config, tokenizer, ctx: Context, sources, initial_params: Any, counts: dict
) -> Stage:
    """The DPO stage, its reference the model DPO starts from (`initial_params`), of the kind
    `reference_kind(config)` gives. A precomputed reference runs its pass here and keeps no
    params; only a frozen one keeps a reference to `initial_params`."""
    options = loss_options(config, loss_names(config.dpo.loss_type), ctx.final_logit_softcapping)
    tx, schedule = stage_optimizer(
        config, config.optimizer.learning_rate, config.optimizer.warmup_steps, config.dpo.num_steps
    )
    train_batches = _train_batches(config, tokenizer, sources[0], counts, "dpo", ctx.mesh)
    eval_batches = _eval_batches(config, tokenizer, sources[1], counts, "dpo", ctx.mesh)
    reference = make_reference(config, initial_params)
    if isinstance(reference, reference_lib.PrecomputedReference):
        if reference_kind(config) == "cached":
            table, path = _cached_reference_logps(
                config, tokenizer, ctx, sources, options, initial_params
            )
            reference = reference.replace(cache=path)
        else:
            table = _precompute_reference_logps(
                config, tokenizer, ctx, sources, options, initial_params
            )
        train_batches = ref_logps.WithRefLogps(train_batches, table)
        eval_batches = [table.attach(batch) for batch in eval_batches]
    _say(f"[dpo] reference: {reference_lib.kind_name(reference)}")
    return Stage(
        name="dpo",
        num_steps=config.dpo.num_steps,
        options=options,
        tx=tx,
        schedule=schedule,
        reference=reference,
        train_batches=train_batches,
        eval_batches=eval_batches,
        running=step_lib.initial_running(options),
    )


def _cached_reference_logps(config, tokenizer, ctx: Context, sources, options, ref_params):
    """(table, cache file): read from `config.dpo.ref_cache_dir` when a run with the same
    fingerprint wrote it (no reference forward runs), else computed and written there."""
    cache_dir = config.dpo.ref_cache_dir or storage.join(ctx.workdir, "ref_logps_cache")
    components = ref_cache.fingerprint(
        ref_params=ref_params,
        tokenizer=tokenizer,
        sources=sources,
        data_settings={**_data_options(config), "pairs_per_row": 1},
        scoring=dict(
            ld_alpha=options.ld_alpha, final_logit_softcapping=options.final_logit_softcapping
        ),
    )
    path = ref_cache.cache_file(cache_dir, components)
    start = time.perf_counter()
    table = ref_cache.load(path)
    if table is not None:
        _say(
            f"[dpo] reference log-probs of {len(table)} pairs read from the cache {path} in "
            f"{time.perf_counter() - start:.2f} s (same fingerprint: no reference forward)"
        )
        return table, path
    _say(
        f"[dpo] no reference log-prob cache for this fingerprint in {cache_dir} "
        f"({ref_cache.what_changed(cache_dir, components)}): computing it"
    )
    table = _precompute_reference_logps(config, tokenizer, ctx, sources, options, ref_params)
    ref_cache.save(path, components, table)
    return table, path


def _precompute_reference_logps(
    config, tokenizer, ctx: Context, sources, options: step_lib.LossOptions, ref_params: Any
) -> ref_logps.RefLogpsTable:
    """One reference pass over every train and eval pair, into a host-side table (each process
    computes its rows; the table holds every process's). Nothing built here keeps `ref_params`
    alive after it returns."""
    compute = jax.jit(
        functools.partial(
            step_lib.ref_logps_fn,
            apply_fn=ctx.apply_fn,
            logits_chunk_size=options.logits_chunk_size,
            final_logit_softcapping=options.final_logit_softcapping,
            ld_alpha=options.ld_alpha,
        ),
        in_shardings=(ctx.param_shardings, None),
        out_shardings=sharding.batch_sharding(ctx.mesh, 3),
    )
    table = ref_logps.RefLogpsTable()
    start = time.perf_counter()
    for source in (s for s in sources if s is not None):
        batches, _ = make_eval_batches(
            source,
            tokenizer,
            batch_size=config.data.eval_batch_size,
            **{**_data_options(config), "pairs_per_row": 1},
            **_rows_of(ctx.mesh),
        )
        with jax.set_mesh(ctx.mesh):  # as in training (see stage.run_stage)
            ref_logps.precompute(
                table,
                batches,
                lambda batch: compute(ref_params, sharding.put_batch(batch, ctx.mesh)),
            )
    _say(f"[dpo] reference log-probs of {len(table)} pairs in {time.perf_counter() - start:.1f} s")
    return table


def _say(message: str) -> None:
    """Prints a run's progress line once, from process 0 (every process builds the same stages)."""
    if jax.process_index() == 0:
        print(message)
