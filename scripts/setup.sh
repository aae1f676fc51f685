#!/usr/bin/env bash
# Set up slm in ./.venv on a CPU machine (this is also CI's set-up path).
# The CPU build of torch is pinned here, not in pyproject.toml: an unpinned torch pulls a
# multi-GB CUDA build, while GPU users want exactly that (they install torch their own way).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all]"
# The demo corpus is built from Debian packages with `apt-get download` (no root needed), which
# needs the package lists; refresh them once when we are root and they are missing.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
  apt-get update -qq || echo "warning: apt-get update failed; the demo corpus needs Debian's package lists" >&2
fi
echo "slm is set up in .venv (activate with: source .venv/bin/activate)"
