#!/usr/bin/env bash
# A real multi-node Ray cluster and an S3-compatible server on this machine (slm.cluster.local):
#   scripts/local_cluster.sh up [STATE_DIR]     head (0 CPUs, token auth) + node-a, node-b (1 CPU
#                                               each, private /tmp) + moto_server, bucket 'slm'
#   scripts/local_cluster.sh env [STATE_DIR]    the variables a client needs (eval "$(... env)")
#   scripts/local_cluster.sh down [STATE_DIR]   stop them (by their process groups, never by name)
# Then, e.g.:
#   eval "$(scripts/local_cluster.sh env)"
#   .venv/bin/slm submit --address "$SLM_DASHBOARD" -- slm run --recipe demo --run_dir s3://slm/demo
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m slm.cluster.local "$@"
