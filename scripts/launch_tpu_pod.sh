#!/usr/bin/env bash
# Starts scripts/train.py on every worker of a Cloud TPU VM slice (one process per worker).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a WORKDIR=gs://my-bucket/run1 \
#     scripts/launch_tpu_pod.sh --config=configs/llama3_8b_tpu.py
#
# Every argument goes to scripts/train.py on every worker. The workers find each other by
# themselves (`--distributed=tpu`: jax.distributed.initialize() with no arguments reads the TPU
# metadata). WORKDIR must be one place every worker sees: a gs:// bucket (the workers' service
# account's credentials; docs/pods.md), or a directory at the same path on every worker (a
# Filestore NFS share): orbax writes each checkpoint from all workers into it.
# SETUP=1 first copies this checkout to ~/dpo_jax on every worker and installs it.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM's name}"
: "${ZONE:?set ZONE to the TPU VM's zone}"
: "${WORKDIR:?set WORKDIR to a gs:// path or a directory shared by every worker}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="${PROJECT}"); fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

tpu_ssh() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
    --worker=all --command="$1"
}

if [[ "${SETUP:-0}" == "1" ]]; then
  gcloud compute tpus tpu-vm scp --recurse "${REPO}" "${TPU_NAME}:~/dpo_jax" \
    --zone="${ZONE}" "${PROJECT_FLAG[@]}" --worker=all
  tpu_ssh "cd ~/dpo_jax && pip install -q -c constraints.txt -e '.[gcs]' 'jax[tpu]'"
fi

ARGS="$(printf ' %q' "$@")"
# One process per worker; its output goes to ~/dpo_jax/train-<worker>.log on that worker.
tpu_ssh "cd ~/dpo_jax && python scripts/train.py --distributed=tpu \
  --workdir=$(printf '%q' "${WORKDIR}")${ARGS} 2>&1 | tee train-\$(hostname).log"
