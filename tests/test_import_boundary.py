"""`import dpo_jax.losses` needs jax only: checked in fresh interpreters."""

import math
import pathlib
import subprocess
import sys

from dpo_jax.losses import LOSS_VARIANTS

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY_PACKAGES = ("flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "grain", "torch")


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_python_c_import_losses_works():
    result = _run_python("import dpo_jax.losses")
    assert result.returncode == 0, result.stderr


def test_import_losses_loads_no_heavy_package():
    code = (
        "import sys\n"
        "import dpo_jax.losses\n"
        f"heavy = {HEAVY_PACKAGES!r}\n"
        "loaded = sorted({n.split('.')[0] for n in sys.modules} & set(heavy))\n"
        "print(','.join(loaded))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", (
        f"importing dpo_jax.losses loaded {result.stdout.strip()}; keep losses.py and "
        "dpo_jax/__init__.py free of imports beyond jax and the standard library"
    )


def test_losses_run_with_heavy_packages_unimportable():
    # Stands in for "an environment with only jax installed": any import of these packages fails.
    code = (
        "import importlib.abc, sys\n"
        f"heavy = {HEAVY_PACKAGES!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in heavy:\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import jax, jax.numpy as jnp\n"
        "from dpo_jax.losses import LOSS_VARIANTS, dpo_loss_fn\n"
        "x, lengths = jnp.zeros(4), jnp.ones(4)\n"
        "needs = {'exo_pair': dict(label_smoothing=0.1), 'kto': dict(kto_labels=x > -1),\n"
        "         'unlikelihood': dict(rejected_unlikelihoods=x - 1)}\n"
        "for name in sorted(LOSS_VARIANTS):\n"
        "    loss, _ = jax.jit(lambda x: dpo_loss_fn(x, x, x, x, beta=0.1, loss_type=name,\n"
        "        chosen_lengths=lengths, rejected_lengths=lengths, **needs.get(name, {})))(x)\n"
        "    print(name, float(loss))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    losses = dict(line.split() for line in result.stdout.strip().splitlines())
    assert set(losses) == set(LOSS_VARIANTS)
    assert all(math.isfinite(float(v)) for v in losses.values()), losses


def test_a_module_moved_by_the_regrouping_imports_from_its_old_path_with_a_warning():
    # Issue 33 moved twenty modules into rooms; code written against the flat layout still runs.
    code = (
        "import warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "import dpo_jax.run.guards as new\n"
        "try:\n"
        "    import dpo_jax.guards\n"
        "except DeprecationWarning as warning:\n"
        "    print(warning)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import dpo_jax.guards as old\n"
        "from dpo_jax import planner\n"
        "import dpo_jax.benchmarks.planner as new_planner\n"
        "print(old is new, old.__spec__.name, planner is new_planner)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "dpo_jax.guards moved to dpo_jax.run.guards; import it from there",
        "True dpo_jax.run.guards True",
    ]
