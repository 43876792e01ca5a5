#!/usr/bin/env bash
# Quick start 2: set everything up, compile every kernel for the four targets (where nvcc and hipcc
# are installed; CI installs both and requires them), run the kernels' property suite on this
# machine's backend, then the test suite (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -n "${MINIFD_REQUIRE_COMPILERS:-}" ] || { command -v nvcc && command -v hipcc; } >/dev/null 2>&1; then
  bash scripts/compile_kernels.sh
else
  echo "test.sh: nvcc or hipcc is not installed: skipping the standalone kernel compile check" >&2
fi
.venv/bin/minifd check
MINIFD_REQUIRE_FIXTURE=1 .venv/bin/python -m pytest -q "$@"
