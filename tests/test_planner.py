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
    assert tpu_plan.num_devices == 4 and tpu_plan.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
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
    assert plan.mesh_shape == {"data": 8, "fsdp": 1, "tensor": 1}
    assert plan.parts["params"] == plan.parts["reference"]  # replicated over data: whole params
    assert plan.total_bytes < memory


def test_too_small_a_device_says_by_how_much_and_what_dominates(tpu_plan):
    small = planner.dataclasses.replace(tpu_plan, device_memory_bytes=planner.GIB // 1024)
    with pytest.raises(ValueError, match=r"GiB over the .* budget .* the largest part is temp"):
        planner.check_fits(small, headroom=0.1)
    planner.check_fits(tpu_plan, headroom=0.1)  # the real one fits


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
