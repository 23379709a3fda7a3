"""Llama 3 8B DPO on a TPU v5e-256 slice: bf16, FSDP over all 256 chips, remat, splash attention.

Plan it here, without a TPU (the TPU compiler, libtpu, compiles the real step for the topology):

    python scripts/plan.py --config=configs/llama3_8b_tpu.py --topology=v5e:16x16

Llama 3 8B shapes (hidden 4096, 32 layers, 32 query / 8 KV heads of 128, MLP 14,336, vocabulary
128,256, untied, RoPE base 500,000; its llama3 RoPE scaling changes no shape or cost and is not
set here), random weights: for a real run set model.source="hf" and model.hf_path. 256 pairs of
4,096 tokens a step (one pair, two rows, per chip), AdamW, a frozen reference.

Memory budget per v5e chip (16 GiB HBM), N = 8.03e9 params sharded 256 ways over fsdp:
- params, float32: 4 N / 256 = 0.12 GiB; AdamW's two moments 0.24 GiB; the frozen reference
  (the initial params, float32) 0.12 GiB; gradients 0.12 GiB: about 0.6 GiB in all;
- activations with per-layer remat (bf16): each layer keeps its input, 2 rows x 4,096 x 4,096
  x 2 bytes = 64 MiB, x 32 layers = 2 GiB; one layer's recomputation at a time comes on top
  (its MLP activations are [8192, 14336] bf16, 224 MiB each, a few of them live);
- FSDP gathers one layer's weights at a time (218M params: 0.4 GiB in bf16, two in flight);
- the log-prob head in chunks of 1,024 rows per chip: [1024, 128256] float32 logits, 0.5 GiB,
  and their cotangent, where full logits would be 2 x 8,192 x 128,256 x 4 bytes = 7.8 GiB;
  the head's unembedding is gathered whole (1 GiB in bf16) and its float32 gradient (2 GiB) is
  summed across chips once, after the chunk loop.
About 7-8 GiB worked out; the TPU compiler's figure (scripts/plan.py): 9.05 GiB per chip, of
which 8.52 GiB temporaries, 43% of HBM free. See docs/pods.md, "A step that fits a pod".

Variant `qlora_v5e1`: QLoRA DPO on one 16 GiB chip (TPU v5e-1):

    python scripts/plan.py --config=configs/llama3_8b_tpu.py:qlora_v5e1 --topology=v5e:1x1

The base is held in Q4_K blocks (4.5 bits a weight: 4.2 GiB for the 8.03e9 weights, where
float32 would take 29.9 GiB and bfloat16 15.0 GiB), dequantised one layer at a time inside the
layer scan; rank-16 LoRA adapters on the seven Linear kernels of every layer (42M params) train
in float32, the reference is the base with the adapters off. One pair of 4,096 tokens a step.
The planner builds the blocks' shapes from the model's (no file is read). A real run needs the
base from a file: an HF checkpoint quantised on load (model.source="hf", quantized_type "Q4_0"),
or a Llama 3 8B GGUF once convert_gguf.py reads Llama's tensors (Gemma 3 only today). The TPU
compiler's verdict (2026-12-04): it fits, 11.25 GiB per chip of 16 (4.21 GiB of blocks in the
reference, 0.47 GiB of adapters and RMSprop moments, 6.53 GiB of temporaries), 3.15 GiB under
the planner's 90% budget. The untied lm_head is dequantised in row chunks
(`linear._dequantized_table`): dequantised whole, its int32 and float32 intermediates took about
6 GiB and the step needed 18.56 GiB of temporaries. The same LoRA over the float32 weights
(model.quantized=False: 29.9 GiB of reference) does not fit one chip either.

Variant `long_v5p`: one pair of 32,768 tokens a row, split over a `sequence` axis of 16 chips
(context parallelism, docs/pods.md "Long pairs"), fsdp over the rest, 4 pairs a step on a
v5p-128 (64 chips); XLA attention in blocks of 512 (zigzag layout, masked blocks skipped), the
params' embed axis over fsdp and sequence together:

    python scripts/plan.py --config=configs/llama3_8b_tpu.py:long_v5p --topology=v5p:4x4x4

The TPU compiler's verdict (2026-12-07): 12.45 GiB per chip of 95 (10.49 GiB of temporaries).
The smallest v5p slice, v5p-8 (4 chips, one host), fits one such pair with
`--topology=v5p:2x2x1 --config.mesh.sequence=4 --config.data.batch_size=1
--config.data.eval_batch_size=1`: 56.51 GiB per chip.

Variant `long_v5e`: the same rows on the v5e-256 of the default config, 16 pairs a step
(sequence 16 x fsdp 16): 12.83 GiB per chip of 16, where 4,096-token rows take 9.05 GiB.

    python scripts/plan.py --config=configs/llama3_8b_tpu.py:long_v5e --topology=v5e:16x16
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


VARIANTS = ("", "qlora_v5e1", "long_v5p", "long_v5e")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The Llama 3 8B TPU config, or one of VARIANTS (`arg`).

    Raises:
      ValueError: an unknown variant.
    """
    if (arg or "") not in VARIANTS:
        raise ValueError(f"configs/llama3_8b_tpu.py: unknown variant {arg!r}; known: {VARIANTS}")
    config = _default_config_module().get_config()
    with config.unlocked():
        # Model
        config.model.source = "random"
        config.model.family = "llama"
        config.model.vocab_size = 128_256
        config.model.hidden_size = 4096
        config.model.intermediate_size = 14_336
        config.model.num_layers = 32
        config.model.num_heads = 32
        config.model.num_kv_heads = 8
        config.model.head_dim = 128
        config.model.rope_theta = 500_000.0
        config.model.tie_word_embeddings = False
        config.model.dtype = "bfloat16"
        config.model.param_dtype = "float32"
        config.model.remat = True
        config.model.attention_impl = "splash"
        config.model.logits_chunk_size = 1024  # token rows per chunk on each chip
        # Data: 4,096-token rows, 256 pairs a step.
        config.data.max_length = 4096
        config.data.max_prompt_length = 2048
        config.data.batch_size = 256
        config.data.eval_batch_size = 256
        # DPO
        config.sft.num_steps = 0
        config.dpo.reference = "frozen"
        # Optimizer
        config.optimizer.name = "adamw"
        config.optimizer.learning_rate = 5e-7
        # Mesh: FSDP over every chip.
        config.mesh.data = 1
        config.mesh.fsdp = -1
        config.mesh.tensor = 1
        if arg == "qlora_v5e1":
            _qlora_v5e1(config)
        elif arg == "long_v5p":
            long_context(config, max_length=32_768, sequence=16, batch_size=4)  # v5p-128: 64 chips
        elif arg == "long_v5e":
            long_context(config, max_length=32_768, sequence=16, batch_size=16)  # v5e-256
    config.lock()
    return config


def _qlora_v5e1(config: ml_collections.ConfigDict) -> None:
    """QLoRA on one v5e chip: a Q4_K base, rank-16 adapters, one pair of 4,096 tokens a step."""
    config.model.quantized = True
    config.model.quantized_type = "Q4_K"  # the blocks the planner builds (no file is read)
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.dpo.reference = "adapters_off"
    config.optimizer.learning_rate = 5e-6  # LoRA: 10x the full model's
    config.data.batch_size = 1
    config.data.eval_batch_size = 1


def long_context(
    config: ml_collections.ConfigDict, max_length: int, sequence: int, batch_size: int
) -> None:
    """Rows of `max_length` tokens split over a `sequence` axis of that many chips (context
    parallelism), the rest of the slice over fsdp (mesh.fsdp = -1), `batch_size` pairs a step
    (one per fsdp shard: the slice's chips / sequence).

    The params' embed axis is sharded over fsdp and sequence together (FSDP across every chip:
    the sequence shards would otherwise each hold a quarter of the model), XLA attention in
    blocks of 512 (each key block's scores are [2 rows, 32 heads, 512, 512] float32).
    """
    config.model.attention_impl = "xla"  # the sequence axis composes with XLA attention only
    config.model.attention_block_size = 512
    config.data.max_length = max_length
    config.data.max_prompt_length = max_length // 2
    config.data.batch_size = batch_size
    config.data.eval_batch_size = batch_size
    config.mesh.sequence = sequence
    config.mesh.rules = tuple(
        (name, ("fsdp", "sequence") if name == "embed" else axis)
        for name, axis in config.mesh.rules
    )
