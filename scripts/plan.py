"""Plan a config's DPO step on hardware you do not have: per-device memory and FLOPs, compiled.

    python scripts/plan.py --config=configs/llama3_8b_tpu.py --topology=v5e:16x16
    python scripts/plan.py --config=configs/llama3_8b_tpu.py:qlora_v5e1 --topology=v5e:1x1
    python scripts/plan.py --config=configs/pretrained.py --cpu_devices=1

The real update_fn is lowered on abstract inputs (nothing allocated) and compiled by the TPU
compiler for the topology (libtpu installs without a TPU) or by XLA for N virtual CPU devices.
Exits 1 with one line when the config does not fit: by how much, and its largest part.
"""

import json
import os
import sys

# Before jax loads: the CPU device count, and no attempt to open a TPU that is not there.
_CPU_DEVICES = [arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--cpu_devices=")]
if _CPU_DEVICES:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_CPU_DEVICES[0]}"
    )
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from dpo_jax.run import cli  # noqa: E402

_CONFIG = cli.define_config_file("config", None, "Training config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "A TPU topology, e.g. v5e:16x16 or v5p:4x4x4.")
_CPU = flags.DEFINE_integer("cpu_devices", 0, "Plan for N virtual CPU devices instead.")
_HEADROOM = flags.DEFINE_float("headroom", 0.1, "Fraction of device memory to keep free.")
_OUTPUT = flags.DEFINE_string("output", "", "Also write the plan as JSON here.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, show the full traceback.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(_TOPOLOGY.value) == bool(_CPU.value):
        raise app.UsageError("give exactly one of --topology=... and --cpu_devices=N")
    from dpo_jax.benchmarks import planner

    try:
        if _TOPOLOGY.value:
            target = _TOPOLOGY.value
            devices, memory = planner.topology_devices(target)
        else:
            target = f"cpu:{_CPU.value}"
            devices, memory = planner.cpu_devices(_CPU.value)
        plan = planner.plan(_CONFIG.value, devices, memory, target)
        print(planner.format_plan(plan, _HEADROOM.value))
        if _OUTPUT.value:
            with open(_OUTPUT.value, "w") as f:
                json.dump(planner.as_dict(plan), f, indent=2)
        planner.check_fits(plan, _HEADROOM.value)
    except (ValueError, FileNotFoundError) as error:  # the user's to fix: one line
        if _VERBOSE.value:
            raise
        print(f"error: {error}\n(run with --verbose for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main)
