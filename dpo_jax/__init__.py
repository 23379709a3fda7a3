"""dpo_jax: Direct Preference Optimization in JAX.

The package imports nothing here, so that `import dpo_jax.losses` stays light (jax only). The
core a user imports sits at the top (`losses`, `logprobs`, `step`, `reference`, `lora`,
`sharding`, `ppo`, `ppo_step`, `sampling`, `evaluation`, `tokenizer`); the rest is in rooms:
`models/`, `data/`, `run/` (a training run from its config), `experiments/`, `benchmarks/`.

Modules that sat at the top before the regrouping (issue 33) still import from their old paths,
as the same module object, with a DeprecationWarning naming the new one. importlib has no
"alias this module name" call, so `_MovedModuleFinder` is the few lines that do it.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

# old dotted name -> where the module lives now
MOVED_MODULES = {
    **{
        f"dpo_jax.{name}": f"dpo_jax.run.{name}"
        for name in (
            "build",
            "checkpoint",
            "cli",
            "config_checks",
            "distributed",
            "errors",
            "guards",
            "inspect_data",
            "metrics_log",
            "optim",
            "preemption",
            "ref_cache",
            "ref_logps",
            "reward_model",
            "run_config",
            "stage",
            "train",
        )
    },
    "dpo_jax.planner": "dpo_jax.benchmarks.planner",
    "dpo_jax.bandit": "dpo_jax.experiments.bandit",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new path (the same object)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new_name = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new_name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new_name)

    def exec_module(self, module):
        # The module ran when it was imported under its new name. The import system has just
        # set its __spec__ to the old name's; give it back its own.
        package = sys.modules[module.__name__.rpartition(".")[0]]
        module.__spec__ = importlib.machinery.PathFinder.find_spec(
            module.__name__, package.__path__
        )


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
