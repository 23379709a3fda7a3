#!/usr/bin/env bash
# The upper end of every range setup.cfg declares (the lower end is constraints.txt, .ci/run's main
# test run). A second virtual environment gets constraints-newest.txt: the highest versions the
# ranges admitted when it was last resolved (`--refresh` resolves it again, with pip's default
# "highest" strategy, and rewrites the file). Then, in that environment:
#   - the tests that touch each dependency whose range reaches past constraints.txt
#     (transformers and PEFT parity, orbax checkpoints, grain and TFDS, tokenizers, safetensors,
#     gguf); TRL 1.16 needs transformers 4.x, so its oracle tests stay in the main run only;
#   - the main job as a CPU user installs it (`pip install -e .`, no libtpu): no TPU error.
# Usage: bash scripts/test_newest_versions.sh [--refresh]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DPO_JAX_NEWEST_VENV:-/tmp/dpo_jax_newest_venv}"
python3 -m venv --clear "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q torch==2.13.0  # the CPU wheel on disk, before anything that pulls torch
if [[ "${1:-}" == "--refresh" ]]; then
  $pip install -q --upgrade -e ".[test,gguf]"
  {
    echo "# The newest versions setup.cfg's ranges admitted on $(date -u +%F) (Python 3.11, CPU torch),"
    echo "# resolved by: bash scripts/test_newest_versions.sh --refresh"
    $pip freeze --exclude-editable
  } >constraints-newest.txt
else
  $pip install -q -c constraints-newest.txt -e ".[test,gguf]"
fi
echo "== newest-versions run: resolved versions"
$pip freeze --exclude-editable | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|grain|tensorflow-datasets|array.record|tokenizers|safetensors|gguf|transformers|peft|huggingface.hub|numpy|ml.collections|jinja2|torch)==' 

echo "== the main job as installed without the TPU compiler prints no TPU error"
log="$(mktemp)"
env -u JAX_PLATFORMS -u XLA_FLAGS "$venv/bin/python" scripts/train.py \
  --config=configs/default.py:tiny --workdir="$(mktemp -d)" >"$log" 2>&1 || { cat "$log"; exit 1; }
if grep -nE 'TPU_WORKER_HOSTNAMES|libtpu|INVALID_ARGUMENT' "$log"; then
  echo "error: the main job printed TPU-initialisation errors (above)" >&2
  exit 1
fi

echo "== tests that touch the dependencies, at their newest versions"
"$venv/bin/python" -m pytest -p no:cacheprovider -q \
  tests/test_hf_config.py \
  tests/test_convert_hf.py \
  tests/test_lora.py \
  tests/test_gemma3_gguf.py \
  tests/test_gguf_tokenizer.py \
  tests/test_tokenizer.py \
  tests/test_checkpoint.py \
  tests/test_checkpoint_integrity.py \
  tests/test_sharded_loading.py \
  tests/test_train.py \
  tests/data \
  --durations=15
