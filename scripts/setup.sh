#!/usr/bin/env bash
# Set up slm in ./.venv on a CPU machine (this is also CI's set-up path).
# The CPU build of torch is pinned here, not in pyproject.toml: an unpinned torch pulls a
# multi-GB CUDA build, while GPU users want exactly that (they install torch their own way).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned in both commands: with the pin only in the first, resolving ".[all]" was
# seen to replace the CPU build with a CUDA 2.14.1 build of several GB
.venv/bin/python -m pip install -q "torch==2.13.0"
# setuptools warns on every editable install that a folder named like the package (slm/) could
# shadow it; that is our layout on purpose (pyproject maps the folders under slm.*)
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e ".[all]" "torch==2.13.0"
# The demo corpus is built from Debian packages with `apt-get download` (no root needed), which
# needs the package lists; refresh them once when we are root and they are missing.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
  apt-get update -qq || echo "warning: apt-get update failed; the demo corpus needs Debian's package lists" >&2
fi
echo "slm is set up in .venv (activate with: source .venv/bin/activate)"
echo "next: .venv/bin/slm run    # the embedded default end to end (demo corpus, every family and method)"
echo "      .venv/bin/python -m pytest -q tests    # the tests"
