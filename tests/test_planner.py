"""The planner: the real DPO step compiled for a TPU topology and a CPU mesh; bad input."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpo_jax.benchmarks import planner
from dpo_jax.models import init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(**changes):
    spec = importlib.util.spec_from_file_location("configs_default", ROOT / "configs/default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp = 1, -1
        config.data.max_length, config.data.max_prompt_length = 128, 64
        config.model.remat = True
        config.model.logits_chunk_size = 64
        for key, value in changes.items():
            group, field = key.split("__")
            config[group][field] = value
    return config


@pytest.fixture(scope="module")
def tpu_plan():
    # The full DPO step with splash attention (Mosaic kernels), FSDP over a v5e 2x2 slice.
    devices, memory = planner.topology_devices("v5e:2x2")
    return planner.plan(_config(model__attention_impl="splash"), devices, memory, "v5e:2x2")


def test_tpu_plan_compiles_the_step_with_splash_kernels(tpu_plan):
    assert tpu_plan.num_devices == 4 and tpu_plan.mesh_shape == {
        "data": 1,
        "fsdp": 4,
        "sequence": 1,
        "tensor": 1,
    }
    assert tpu_plan.device_memory_bytes == 16 * planner.GIB
    assert "tpu_custom_call" in tpu_plan.custom_calls, "splash's Pallas kernels are not in it"
    # AdamW keeps two moments shaped and sharded like the params (plus a 4-byte step count);
    # the frozen reference is a copy of the initial params.
    parts = tpu_plan.parts
    assert parts["params"] > 0 and parts["reference"] == parts["params"]
    assert 2 * parts["params"] <= parts["optimizer"] <= 2 * parts["params"] + 64
    assert tpu_plan.argument_bytes >= sum(parts.values())
    assert tpu_plan.temp_bytes > 0 and 0.9 < tpu_plan.headroom < 1.0


def test_tpu_plan_params_shard_over_fsdp(tpu_plan):
    # Every param the rules shard over "embed" splits 4 ways; the rest (norms) are whole.
    config = planner.model_config_of(_config())
    shapes = jax.eval_shape(init_params, config, jax.random.key(0))
    total = sum(leaf.size * 4 for leaf in jax.tree.leaves(shapes))
    assert total / 4 <= tpu_plan.parts["params"] < total / 4 + 4 * config.num_layers * 64 * 4 * 4


def test_model_flops_per_device(tpu_plan):
    # 8 pairs of 128 tokens: 16 rows; frozen reference: 8 × params × tokens + attention.
    config = planner.model_config_of(_config())
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, k, dh, layers = config.num_heads, config.num_kv_heads, config.head_dim, config.num_layers
    matmul = layers * (d * (h + 2 * k) * dh + h * dh * d + 3 * d * f) + d * v
    expected = 8 * matmul * 16 * 128 + 8 * 2 * 128**2 * h * dh * layers * 16
    np.testing.assert_allclose(tpu_plan.model_flops * 4, expected, rtol=1e-12)


def test_cpu_plan_on_eight_devices():
    devices, memory = planner.cpu_devices(8)
    plan = planner.plan(_config(mesh__data=8, mesh__fsdp=1), devices, memory, "cpu:8")
    assert plan.mesh_shape == {"data": 8, "fsdp": 1, "sequence": 1, "tensor": 1}
    assert plan.parts["params"] == plan.parts["reference"]  # replicated over data: whole params
    assert plan.total_bytes < memory


def test_too_small_a_device_says_by_how_much_and_what_dominates(tpu_plan):
    small = planner.dataclasses.replace(tpu_plan, device_memory_bytes=planner.GIB // 1024)
    with pytest.raises(ValueError, match=r"GiB over the .* budget .* the largest part is temp"):
        planner.check_fits(small, headroom=0.1)
    verdict = planner.format_plan(small, headroom=0.1).splitlines()[-1]
    assert verdict.startswith("does not fit: ") and "GiB over the" in verdict, verdict
    planner.check_fits(tpu_plan, headroom=0.1)  # the real one fits


def _qlora_config(quantized: bool):
    # Q4_K blocks hold 256 values: every kernel's input features (D, H·Dh, F) are 256.
    return _config(
        model__hidden_size=256, model__intermediate_size=256, model__num_layers=2,
        model__num_heads=4, model__num_kv_heads=2, model__head_dim=64,
        model__quantized=quantized, model__quantized_type="Q4_K",
        lora__rank=4, dpo__reference="adapters_off", sft__num_steps=0,
        model__remat=False, data__max_length=64, data__max_prompt_length=32,
    )  # fmt: skip


def test_qlora_plan_holds_the_base_in_q4_k_blocks():
    # v5e-1: one chip, a slice smaller than a host (the compiler is told its host bounds).
    devices, memory = planner.topology_devices("v5e:1x1")
    assert len(devices) == 1 and memory == 16 * planner.GIB
    qlora = planner.plan(_qlora_config(True), devices, memory, "v5e:1x1")
    lora = planner.plan(_qlora_config(False), devices, memory, "v5e:1x1")  # the float base
    config = planner.model_config_of(_qlora_config(True))
    d, f, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, 2
    h, k, dh = config.num_heads, config.num_kv_heads, config.head_dim
    # (rows, input features) of each GGUF tensor: a Linear weight's rows are its outputs (HF's
    # [out, in]); q, k, v, o, gate, up, down per layer, then the embedding and the lm_head.
    layer_kernels = [(h * dh, d), (k * dh, d), (k * dh, d), (d, h * dh), (f, d), (f, d), (d, f)]
    kernels = layers * layer_kernels + [(v, d), (v, d)]
    q4_k_row_bytes = lambda cols: cols // 256 * 144  # noqa: E731 - ggml's block_q4_K: 144 bytes
    block_bytes = sum(rows * q4_k_row_bytes(cols) for rows, cols in kernels)
    weights = sum(rows * cols for rows, cols in kernels)
    base = qlora.quantized_base
    assert base.type_names == ("Q4_K",) and base.num_weights == weights
    assert base.block_bytes == block_bytes and base.bits_per_weight == 4.5
    assert base.float_bytes("float32") == 4 * weights
    assert base.float_bytes("bfloat16") == 2 * weights
    # The reference is the base: the blocks, an int32 type per kernel (and layer), and the
    # float32 norms (two per layer and the final one), against float32 kernels in the LoRA plan.
    norms = 4 * (2 * layers + 1) * d
    assert qlora.parts["reference"] == block_bytes + 4 * (7 * layers + 2) + norms
    assert lora.quantized_base is None and lora.parts["reference"] == 4 * weights + norms
    # The same adapters and optimizer state train over either base; the blocks hold less.
    assert qlora.parts["params"] == lora.parts["params"] > 0
    assert qlora.parts["optimizer"] == lora.parts["optimizer"]
    assert qlora.argument_bytes < lora.argument_bytes
    report = planner.format_plan(qlora, headroom=0.1).splitlines()
    assert report[-1].startswith("fits: ") and "of 16 GiB per device" in report[-1], report
    assert any(line.startswith("quantised base (Q4_K): ") for line in report), report


def test_a_quantised_type_the_kernels_do_not_divide_into_is_named():
    devices, memory = planner.topology_devices("v5e:1x1")
    config = _qlora_config(True)
    with config.unlocked():
        config.model.hidden_size = 96  # not whole Q4_K blocks of 256
    with pytest.raises(ValueError, match=r"quantized_type='Q4_K': embedding \(\d+, 96\) cannot"):
        planner.plan(config, devices, memory, "v5e:1x1")


def test_a_step_the_tpu_compiler_finds_too_big_is_one_line():
    # A 16M-token vocabulary: 4 GiB of float32 params, 8 GiB of AdamW moments, a 4 GiB frozen
    # reference; the TPU compiler checks the chip's HBM itself and compiles nothing.
    devices, memory = planner.topology_devices("v5e:1x1")
    expected = (
        r"v5e:1x1: the step does not fit; the TPU compiler says 'RESOURCE_EXHAUSTED: [^\n]*' "
        r"\(arguments per device: params 4.00 GiB, optimizer 8.00 GiB, reference 4.00 GiB, "
        r"batch 0.00 GiB\)"
    )
    with pytest.raises(ValueError, match=f"^{expected}$"):
        planner.plan(_config(model__vocab_size=2**24), devices, memory, "v5e:1x1")


@pytest.mark.parametrize(
    "topology, message",
    [
        ("v9z:2x2", "expected <generation>:<layout>"),
        ("v5e", "expected <generation>:<layout>"),
        ("v5e:3x7", "the TPU compiler refused it"),
    ],
)
def test_bad_topology(topology, message):
    with pytest.raises(ValueError, match=message):
        planner.topology_devices(topology)


def test_mesh_that_does_not_divide_the_devices():
    devices, memory = planner.topology_devices("v5e:2x2")
    with pytest.raises(ValueError, match="devices"):
        planner.plan(_config(mesh__data=3, mesh__fsdp=1), devices, memory, "v5e:2x2")


def test_script_reports_a_bad_topology_in_one_line():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/plan.py"),
            f"--config={ROOT / 'configs/default.py'}:tiny",
            "--topology=v9z:2x2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: --topology='v9z:2x2': expected"), lines
    assert len(lines) <= 2, lines  # the message, and where the traceback is


def _long_config(sequence: int):
    # One pair of 2,048 tokens a step; with sequence > 1 its rows split over the slice's chips.
    return _config(
        model__attention_impl="xla", model__attention_block_size=128, data__max_length=2048,
        data__max_prompt_length=1024, data__batch_size=1, data__eval_batch_size=1,
        mesh__fsdp=1, mesh__sequence=sequence,
    )  # fmt: skip


def test_a_long_context_plan_splits_each_row_over_the_sequence_axis():
    # The same one-pair step compiled for one v5e chip (whole rows) and for a v5e 2x2 slice
    # with the rows split 4 ways: each chip holds a quarter of the batch and fewer temporaries.
    devices, memory = planner.topology_devices("v5e:2x2")
    split = planner.plan(_long_config(4), devices, memory, "v5e:2x2")
    devices, memory = planner.topology_devices("v5e:1x1")
    whole = planner.plan(_long_config(1), devices, memory, "v5e:1x1")
    assert split.mesh_shape == {"data": 1, "fsdp": 1, "sequence": 4, "tensor": 1}
    # tokens, positions, segment ids (int32) and the response mask (bool): 13 bytes a token of
    # 2 rows × 2,048, a quarter of them on each chip; the 1-byte pair mask is whole on each.
    assert whole.parts["batch"] == 13 * 2 * 2048 + 1
    assert split.parts["batch"] == 13 * 2 * 2048 // 4 + 1
    assert split.temp_bytes < 0.5 * whole.temp_bytes, (split.temp_bytes, whole.temp_bytes)
    assert split.model_flops * 4 == pytest.approx(whole.model_flops, rel=1e-12)
    planner.check_fits(split, headroom=0.1)
