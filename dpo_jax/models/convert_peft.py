"""LoRA adapters to PEFT's format: adapter_config.json + adapter_model.safetensors.

PEFT names each factor after the Linear it adapts, under `base_model.model.`:
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r], and adds (lora_alpha / r)·B@A to that Linear's [out, in] weight. Our factors are
A [in, r] and B [r, out] of the kernel's [in, out] reshape, which is the transpose of
transformers' weight (`convert_hf.linear_weight_names`), so PEFT's are A.T and B.T.
"""

from __future__ import annotations

import json

import numpy as np

from dpo_jax import storage
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.convert_hf import linear_weight_names
from dpo_jax.models.safetensors_files import write_safetensors

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _flat(adapters: dict, prefix: str = "") -> dict[str, dict]:
    """{param path: {"lora_a", "lora_b"}} of a nested adapters dict."""
    if "lora_a" in adapters:
        return {prefix: adapters}
    out = {}
    for key, value in adapters.items():
        out.update(_flat(value, f"{prefix}/{key}" if prefix else key))
    return out


def peft_tensors(config: ModelConfig, adapters: dict) -> dict[str, np.ndarray]:
    """PEFT-named float32 factors of `adapters` (host arrays, see `dpo_jax.lora`)."""
    by_path = _flat(adapters)
    tensors = {}
    for (path, layer), weight_name in linear_weight_names(config).items():
        if path not in by_path:
            continue
        factors = by_path[path]
        stem = PREFIX + weight_name.removesuffix(".weight")
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            value = np.asarray(factors[ours], np.float32)
            value = value if layer is None else value[layer]
            tensors[f"{stem}.{theirs}.weight"] = np.ascontiguousarray(value.T)
    return tensors


def target_modules(config: ModelConfig, adapters: dict) -> list[str]:
    """PEFT's `target_modules`: the adapted Linears' own names ("q_proj", "down_proj", ...)."""
    by_path = _flat(adapters)
    names = {
        weight_name.removesuffix(".weight").rsplit(".", 1)[-1]
        for (path, _), weight_name in linear_weight_names(config).items()
        if path in by_path
    }
    return sorted(names)


def save_peft(
    directory: str,
    config: ModelConfig,
    adapters: dict,
    *,
    rank: int,
    alpha: float,
    base_model: str,
    base_fingerprint: str,
) -> None:
    """Writes `directory`/adapter_config.json and adapter_model.safetensors, loadable by
    `peft.PeftModel.from_pretrained(base, directory)`.

    Args:
      directory: created if missing.
      config: the base model's config.
      adapters: host arrays (`dpo_jax.lora` layout).
      rank, alpha: the adapters' r and lora_alpha.
      base_model: where the base lives (`base_model_name_or_path`).
      base_fingerprint: the base params' sha256, kept in the file's metadata.
    """
    metadata = {"format": "pt", "dpo_jax_base_fingerprint": base_fingerprint}
    path = storage.join(directory, ADAPTER_WEIGHTS_FILE)
    write_safetensors(path, peft_tensors(config, adapters), metadata)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules(config, adapters),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
    }
    text = json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
    storage.write_text(storage.join(directory, ADAPTER_CONFIG_FILE), text)
