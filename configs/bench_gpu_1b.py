"""The GPU benchmark: Llama 3.2 1B shapes, bf16 compute, per-layer remat, cuDNN attention.

Hidden 2048, 16 layers, 32 query / 8 KV heads of 64, MLP 8192, vocabulary 128,256, tied
embeddings (1.236B matmul params with the unembedding); 8 pairs of 256 prompt + 256 response
tokens a step (8,192 tokens); random weights; AdamW. Peers on one H100 (../shared/FACTS.md):
TRL 0.215 s/step (38.7% of 989 TFLOP/s, 24.4 GiB), tunix 0.242 s/step (34.4%, 35.7 GiB).

Run (from the repository root, on a machine with one NVIDIA GPU):

    python scripts/benchmark.py --config=configs/bench_gpu_1b.py

MFU is reported against the bf16 8192³ `jnp.dot` measured in the same run, and also against the
spec peak in `bench.spec_peak_flops` (989e12 for an H100 SXM's dense bf16).
"""

import importlib.util
import os

import ml_collections


def _load_sibling(name: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"dpo_jax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The bench_gpu_1b config (no variants).

    Raises:
      ValueError: any variant name.
    """
    if arg:
        raise ValueError(f"configs/bench_gpu_1b.py has no variants (got {arg!r})")
    bench_cpu = _load_sibling("bench_cpu")
    config = bench_cpu.get_config()
    with config.unlocked():
        # Model
        config.model.vocab_size = 128_256
        config.model.hidden_size = 2048
        config.model.intermediate_size = 8192
        config.model.num_layers = 16
        config.model.num_heads = 32
        config.model.num_kv_heads = 8
        config.model.head_dim = 64
        config.model.rope_theta = 500_000.0
        config.model.tie_word_embeddings = True
        config.model.dtype = "bfloat16"
        config.model.param_dtype = "float32"  # AdamW master weights stay float32
        config.model.remat = True
        config.model.attention_impl = "cudnn"
        config.model.logits_chunk_size = 0
        # Data
        config.data.batch_size = 8
        config.data.max_length = 256 + 256
        config.data.max_prompt_length = 256
        config.bench = bench_cpu.bench_fields(prompt_length=256, response_length=256)
        config.bench.variants = "default,float32,no_remat,chunked,xla_attention,precomputed_ref"
        config.bench.chunk_size = 2048
        config.bench.peak_matmul_size = 8192
        config.bench.spec_peak_flops = 989e12  # H100 SXM dense bf16 (the yardstick)
        config.bench.warmup_steps = 3
        config.bench.timed_steps = 10
        config.bench.output = "bench_results/bench_gpu_1b.json"
    config.lock()
    return config
