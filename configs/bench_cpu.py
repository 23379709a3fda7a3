"""The CPU benchmark: the peers' 44M Llama DPO workload, float32, random weights and tokens.

A Llama of hidden 512, 4 layers, 8 query / 4 KV heads of 64, MLP 1376, vocabulary 32,000, untied
embeddings; 8 pairs of 128 prompt + 129 response tokens a step; AdamW. The peers were measured on
this workload on a 2-core CPU (see ../shared/FACTS.md): TRL 16.6 s/step, tunix 6.4 s/step.

Run (from the repository root, on a quiet machine: `uptime` load average < 1.5):

    python scripts/benchmark.py --config=configs/bench_cpu.py
    python scripts/benchmark.py --config=configs/bench_cpu.py --config.bench.variants=default
    python scripts/benchmark.py --config=configs/bench_cpu.py:quick   # fewer steps, no V=262k

Every training field comes from configs/default.py; `bench` holds what only the benchmark reads.
"""

import importlib.util
import os

import ml_collections


def _default_config_module():
    """configs/default.py, loaded by path (configs/ is not a package; scripts load files)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("dpo_jax_configs_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VARIANTS = ("", "quick", "gemma3")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The bench_cpu config, or one of VARIANTS (`arg`): "quick" (fewer steps), "gemma3" (Gemma 3
    270M's shapes from the packaged GGUF, random weights: full fine-tuning against LoRA).

    Raises:
      ValueError: an unknown variant.
    """
    if (arg or "") not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/bench_cpu.py; known: {VARIANTS}")
    config = _default_config_module().get_config()
    with config.unlocked():
        # Model
        config.model.source = "random"
        config.model.family = "llama"
        config.model.vocab_size = 32_000
        config.model.hidden_size = 512
        config.model.intermediate_size = 1376
        config.model.num_layers = 4
        config.model.num_heads = 8
        config.model.num_kv_heads = 4
        config.model.head_dim = 64
        config.model.tie_word_embeddings = False
        config.model.dtype = "float32"
        config.model.param_dtype = "float32"
        config.model.remat = False
        config.model.attention_impl = "xla"
        config.model.logits_chunk_size = 0
        # Data: random tokens, every row one pair of prompt + response, no padding.
        config.data.batch_size = 8
        config.data.max_length = 128 + 129
        config.data.max_prompt_length = 128
        config.optimizer.name = "adamw"
        config.mesh.num_devices = 1
        config.bench = bench_fields(prompt_length=128, response_length=129)
        if arg == "gemma3":
            _gemma3_fields(config)
        if arg == "quick":
            config.bench.warmup_steps = 1
            config.bench.timed_steps = 3
            config.bench.logprob_memory_tokens = 0
            config.bench.cache_pairs = 256
    config.lock()
    return config


def _gemma3_fields(config: ml_collections.ConfigDict) -> None:
    """Gemma 3 270M (its GGUF's config, random weights), 8 pairs of 256 + 256 tokens, as the Gemma
    run of docs/benchmarks.md: remat, the chunked head, RMSprop; one untimed and one timed step
    (minutes each)."""
    config.model.source = "gguf"
    config.model.gguf_path = ""  # the packaged GGUF, assembled into bench.workdir
    config.data.tokenizer = "model"
    config.model.remat = True
    config.model.logits_chunk_size = 256
    config.optimizer.name = "rmsprop"
    config.data.max_length = 512
    config.data.max_prompt_length = 256
    config.bench = bench_fields(prompt_length=256, response_length=256)
    config.bench.variants = "default,lora"
    config.bench.warmup_steps = 1
    config.bench.timed_steps = 1
    config.bench.logprob_memory_tokens = 0
    config.bench.cache_pairs = 0
    config.bench.packing = False
    config.bench.output = "bench_results/bench_cpu_gemma3.json"


def bench_fields(*, prompt_length: int, response_length: int) -> ml_collections.ConfigDict:
    """The `bench` group, shared with configs/bench_gpu_1b.py."""
    bench = ml_collections.ConfigDict()
    bench.prompt_length = prompt_length  # prompt tokens of each random sequence
    bench.response_length = response_length  # response tokens (prompt + response = max_length)
    bench.workdir = "bench_results"  # where model.source="gguf" assembles the packaged GGUF
    bench.warmup_steps = 3  # untimed steps after compiling (the first ones run slow)
    bench.timed_steps = 6  # timed steps; the median is reported
    # Alternatives, each compiled and timed in its own subprocess; the first is the baseline.
    # Names: default, bfloat16, float32, remat, no_remat, chunked, full_logits, cudnn,
    # xla_attention, precomputed_ref, tr_dpo, reference_free, lora (rank 8, every layer's
    # kernels), padded_varied, packed_varied (pairs of varied length, one a row or 3 packed a
    # row: real tokens/s). A variant equal to the
    # default (e.g. "float32" when the default already is) is still run; cudnn is reported as
    # n/a off GPU.
    bench.variants = "default,bfloat16,remat,chunked,cudnn,precomputed_ref,tr_dpo,reference_free"
    bench.lengths = "fixed"  # "fixed": every pair as above; "varied": see bench.min_length
    # "varied": prompt and response lengths log-uniform in [min_length, prompt/response_length].
    # Padded vs packed varied pairs, steps alternated in one process (data_effects); on/off.
    bench.packing = True  # run data_effects.measure_packing (True / False)
    bench.min_length = 16  # tokens
    # The reference-log-prob cache timed on this many synthetic pairs (miss: the reference pass
    # and the write; hit: the read), rows of cache_max_length tokens; 0 = skip.
    bench.cache_pairs = 1024  # pairs
    bench.cache_max_length = 24  # tokens per row (the synthetic task's rows are <= 18)
    bench.chunk_size = 1024  # logits_chunk_size of the "chunked" variant (token rows per chunk)
    bench.peak_matmul_size = 2048  # n of the n³ jnp.dot in the compute dtype that defines peak
    bench.peak_repeats = 3  # timed dots before each timed step; their median is that step's peak
    bench.spec_peak_flops = 0.0  # the device's spec FLOP/s in the compute dtype; 0: none
    bench.logprob_memory_tokens = 4096  # tokens of the V=262,144 log-prob memory check; 0: skip
    bench.logprob_memory_hidden = 640  # D of that check (Gemma 3 270M's width)
    bench.logprob_memory_chunk = 256  # chunk rows of that check
    bench.output = "bench_results/bench_cpu.json"  # JSON written here (the table is printed)
    return bench
