"""What packing and the reference cache buy: batches of pairs of varied length (padded, or
packed by the pipeline's own packer) for the step benchmark, and the time a cache hit saves.

Packing. `varied_batch` draws pairs whose prompt and response lengths are log-uniform in
[min_length, bench.prompt_length] and [min_length, bench.response_length], then lays them out as
training does (`pipeline.make_rows`, `batching.collate_rows`): one pair a row (pairs_per_row=1),
or up to S pairs a row. Both batches have the same shape [B, 2, T], so a step costs about the same;
what packing changes is how many of the B·2·T positions are real tokens. The benchmark reports
real (non-padding) tokens per second for each. On a shared machine, whose speed moves by tens
of percent within seconds, the two variants' own runs (in separate processes, minutes apart)
compare poorly; `measure_packing` therefore times both layouts in one process, alternating one
padded step and one packed step, and reports the median of the per-pair throughput ratios.

The reference cache. `measure_cache_hit` runs the DPO stage's own cached-reference path
(`build._cached_reference_logps`, `config.dpo.reference="cached"`) twice into an empty
`ref_cache_dir`: the first call misses (fingerprint, the precomputed reference pass over every
pair, the write), the second hits (fingerprint, the read). Their difference is the time a rerun
or a sweep over β saves.
"""

import argparse
import json
import os
import tempfile
import time
from typing import Any

import ml_collections
import numpy as np

from dpo_jax.data.batching import collate_rows
from dpo_jax.data.pipeline import make_rows
from dpo_jax.data.tokenize import TokenizedPair


def varied_pairs(
    num_pairs: int, *, prompt_range, response_range, vocab_size: int, seed: int
) -> list[TokenizedPair]:
    """Random pairs: prompt, chosen and rejected lengths each log-uniform in its [low, high].

    Log-uniform, as preference data is: most texts short, a long tail up to the row's limit
    (for [16, 128] the median is 45 and the mean 54).
    """
    rng = np.random.default_rng(seed)

    def draw(low: int, high: int) -> np.ndarray:
        length = int(np.exp(rng.uniform(np.log(low), np.log(high + 1))))
        return rng.integers(1, vocab_size, min(length, high), np.int32)

    return [
        TokenizedPair(draw(*prompt_range), draw(*response_range), draw(*response_range), f"#{i}")
        for i in range(num_pairs)
    ]


def varied_batch(
    *,
    rows: int,
    max_length: int,
    pairs_per_row: int,
    prompt_length: int,
    response_length: int,
    min_length: int,
    vocab_size: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """One host batch of `rows` rows of pairs of varied length, padded or packed.

    Args:
      rows: B.
      max_length: T (>= prompt_length + response_length).
      pairs_per_row: S; 1 pads each pair to its own row.
      prompt_length, response_length: the longest prompt and response.
      min_length: the shortest prompt and response.
      vocab_size: token ids are drawn from [1, vocab_size).
      seed: of the lengths and ids.

    Returns:
      The batch `collate_rows` makes: tokens, response_mask, positions, segment_ids [B, 2, T];
      pair_mask [B, S].
    """
    pairs = varied_pairs(
        rows * pairs_per_row * 2,  # enough that the first B rows are as full as packing gets
        prompt_range=(min_length, prompt_length),
        response_range=(min_length, response_length),
        vocab_size=vocab_size,
        seed=seed,
    )
    packed = make_rows(
        pairs, max_length=max_length, pairs_per_row=pairs_per_row, seed=seed, shuffle=False
    )
    return collate_rows(
        packed[:rows],
        num_rows=rows,
        max_length=max_length,
        pairs_per_row=pairs_per_row,
        pad_id=0,
    )


def real_tokens(batch: dict[str, np.ndarray]) -> int:
    """Non-padding tokens of a batch, chosen and rejected rows both."""
    return int(np.sum(batch["segment_ids"] > 0))


def measure_cache_hit(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Times a reference-cache miss and a hit on `config.bench.cache_pairs` synthetic pairs.

    The model is the config's (random weights); the data the synthetic task's, rows of
    `config.bench.cache_max_length` tokens; batches of `config.data.eval_batch_size` rows.

    Returns:
      {"pairs", "miss_s" (fingerprint + reference pass + write), "hit_s" (fingerprint + read),
       "read_s" (the read alone), "saved_s" (miss_s − hit_s), "cache_bytes"}.
    """
    from dpo_jax.data import synthetic
    from dpo_jax.run import build, train  # heavy: only in the subprocess

    config = ml_collections.ConfigDict(config.to_dict())
    pairs = config.bench.cache_pairs
    config.data.max_length = config.bench.cache_max_length
    config.data.max_prompt_length = 0
    config.dpo.reference = "cached"
    train.check_config(config)
    mesh = train.make_mesh(config)
    tokenizer, model_config, _ = train.load_model(config, workdir="")
    ctx = train.make_context(config, mesh, model_config, workdir="")
    params = train.initial_params(model_config, None, ctx, config.seed)
    options = train.loss_options(
        config, train.loss_names(config.dpo.loss_type), ctx.final_logit_softcapping
    )
    sources = (synthetic.make_records(pairs, seed=config.seed, split="train"), None)
    with tempfile.TemporaryDirectory() as cache_dir:
        config.dpo.ref_cache_dir = cache_dir
        times, paths = [], []
        for _ in range(2):
            start = time.perf_counter()
            # The DPO stage's own cached-reference path, as make_dpo_stage calls it.
            table, path = build._cached_reference_logps(
                config, tokenizer, ctx, sources, options, params
            )
            times.append(time.perf_counter() - start)
            paths.append(path)
        start = time.perf_counter()
        build.ref_cache.load(paths[-1])
        read_s = time.perf_counter() - start
        cache_bytes = os.path.getsize(paths[-1])
    return {
        "pairs": len(table),
        "miss_s": times[0],
        "hit_s": times[1],
        "read_s": read_s,
        "saved_s": times[0] - times[1],
        "cache_bytes": cache_bytes,
    }


def measure_packing(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Real-token throughput of packed vs padded batches, timed alternately in one process.

    Both steps are the training step (`step_benchmark.build_step`) on the same random model;
    the padded batch is `varied_batch(pairs_per_row=1)`, the packed one
    `varied_batch(pairs_per_row=3)`, both [B, 2, T].

    Returns:
      {"padded_real_tokens", "packed_real_tokens", "tokens" (B·2·T), "padded_step_s",
       "packed_step_s" (medians), "ratios" (each alternation's packed / padded real tokens per
       second), "ratio" (their median)}.
    """
    import jax

    from dpo_jax.benchmarks import step_benchmark

    steps, counts = {}, {}
    for name in ("padded_varied", "packed_varied"):
        update, state, reference, batch, rng, _, _ = step_benchmark.build_step(
            step_benchmark.with_variant(config, name)
        )
        compiled = update.lower(state, reference, batch, rng).compile()
        for _ in range(max(config.bench.warmup_steps, 1)):
            state, _ = compiled(state, reference, batch, rng)
        jax.block_until_ready(state)
        steps[name] = [compiled, state, reference, batch, rng]
        counts[name] = int(jax.device_get(jax.numpy.sum(batch["segment_ids"] > 0)))
    times = {name: [] for name in steps}
    for _ in range(config.bench.timed_steps):
        for name, step in steps.items():
            compiled, state, reference, batch, rng = step
            start = time.perf_counter()
            step[1], _ = compiled(state, reference, batch, rng)
            jax.block_until_ready(step[1])
            times[name].append(time.perf_counter() - start)
    ratios = [
        (counts["packed_varied"] / packed) / (counts["padded_varied"] / padded)
        for padded, packed in zip(times["padded_varied"], times["packed_varied"], strict=True)
    ]
    return {
        "padded_real_tokens": counts["padded_varied"],
        "packed_real_tokens": counts["packed_varied"],
        "tokens": int(np.prod(steps["padded_varied"][3]["tokens"].shape)),
        "padded_step_s": float(np.median(times["padded_varied"])),
        "packed_step_s": float(np.median(times["packed_varied"])),
        "ratios": ratios,
        "ratio": float(np.median(ratios)),
    }


def format_lines(result: dict[str, Any]) -> list[str]:
    """The packing and the cache rows of `step_benchmark.run_benchmark`'s result, as text."""
    lines = []
    packing = result.get("packing")
    if packing and "ratio" in packing:
        lines.append(
            "Pairs of varied length (log-uniform), the same [B, 2, T] batch, padded (1 pair a "
            "row) and packed (up to 3), steps alternated in one process:"
        )
        for name in ("padded", "packed"):
            real, step_s = packing[f"{name}_real_tokens"], packing[f"{name}_step_s"]
            lines.append(
                f"  {name}: {real} real tokens of {packing['tokens']} "
                f"({real / packing['tokens']:.1%}), {step_s:.3f} s/step, {real / step_s:.0f} "
                "real tokens/s"
            )
        lines.append(
            f"  packed / padded real-token throughput: {packing['ratio']:.2f}x (median of "
            f"{len(packing['ratios'])} alternations: "
            f"{', '.join(f'{r:.2f}' for r in packing['ratios'])})"
        )
    elif packing:
        lines.append(f"packing timing failed: {str(packing.get('error'))[:300]}")
    cache = result.get("ref_cache")
    if cache and "hit_s" in cache:
        lines.append(
            f"Reference-log-prob cache, {cache['pairs']} pairs: miss (reference pass + write) "
            f"{cache['miss_s']:.2f} s, hit (fingerprint + read) {cache['hit_s']:.2f} s "
            f"(read alone {cache['read_s'] * 1e3:.1f} ms, {cache['cache_bytes'] / 1e3:.0f} kB): "
            f"a hit saves {cache['saved_s']:.2f} s"
        )
    elif cache:
        lines.append(f"reference-cache timing failed: {str(cache.get('error'))[:300]}")
    return lines


MEASUREMENTS = {"cache": measure_cache_hit, "packing": measure_packing}

if __name__ == "__main__":  # the subprocess of `step_benchmark.run_benchmark`: JSON out
    parser = argparse.ArgumentParser()
    parser.add_argument("config", help="the benchmark config, as ConfigDict.to_json()")
    parser.add_argument("--measure", choices=sorted(MEASUREMENTS), required=True)
    args = parser.parse_args()
    bench_config = ml_collections.ConfigDict(json.loads(args.config))
    print(json.dumps(MEASUREMENTS[args.measure](bench_config)))
