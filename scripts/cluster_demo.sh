#!/usr/bin/env bash
# The demo study on the local multi-node cluster with everything on the local S3 server (by
# hand, not in CI): cluster up (scripts/local_cluster.sh), the demo corpus built here and copied
# into the bucket, then `slm submit --follow -- slm run --recipe demo` with run_dir, Train/Tune
# storage and corpus on s3://, submitted twice (the second skips everything). Prints each
# submit's wall time. Leaves the cluster up for a look (`scripts/local_cluster.sh down`).
set -euo pipefail
cd "$(dirname "$0")/.."
BUCKET=${BUCKET:-slm}
RUN=${RUN:-s3://$BUCKET/demo}
scripts/local_cluster.sh up
eval "$(scripts/local_cluster.sh env)"
corpus=$(.venv/bin/slm data demo | sed -n 's/^demo corpus ready: //p')
.venv/bin/python - "$corpus" "s3://$BUCKET/demo-corpus" <<'EOF'
import sys
from slm.stage import copy_dir, exists
src, dst = sys.argv[1:]
for part in ("generic", "domains/jargon"):
    if not exists(f"{dst}/{part}"):
        copy_dir(f"{src}/{part}", f"{dst}/{part}")
EOF
submit() {
  local t0=$SECONDS
  .venv/bin/slm submit --address "$SLM_DASHBOARD" --follow -- \
    slm run --recipe demo --run_dir "$RUN" --cluster.storage "s3://$BUCKET/ray" \
      --corpus.generic "s3://$BUCKET/demo-corpus/generic" \
      --corpus.domains "{jargon: s3://$BUCKET/demo-corpus/domains/jargon}"
  echo "cluster demo: submit $1 finished in $((SECONDS - t0)) s"
}
submit 1
submit 2
.venv/bin/python -c "
from slm.audit import node_local_paths
bad = node_local_paths('$RUN')
print('node-local paths in the run:', bad or 'none')
raise SystemExit(1 if bad else 0)"
