"""The data package stays apart: no model or training code (nor flax, optax), TFDS only on demand.

grain itself imports jax and orbax, so those are not checked.
"""

import json
import subprocess
import sys

SCRIPT = """
import json, sys
import dpo_jax.data.pipeline, dpo_jax.data.synthetic
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
      ("dpo_jax", "tensorflow", "tensorflow_datasets", "flax", "optax"))))
"""


def test_pipeline_imports_no_model_training_or_tfds():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert modules == [
        "dpo_jax",
        "dpo_jax.data",
        "dpo_jax.data.batching",
        "dpo_jax.data.boundary",
        "dpo_jax.data.hf_datasets",
        "dpo_jax.data.pipeline",
        "dpo_jax.data.records",
        "dpo_jax.data.synthetic",
        "dpo_jax.data.tokenize",
        "dpo_jax.data.truncation",
        "dpo_jax.storage",
        "dpo_jax.tokenizer",
    ]
