#!/usr/bin/env bash
# Quick start 2: set everything up, compile every kernel for every target whose compiler is present,
# then run the test suite (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -f scripts/compile_kernels.sh ]; then bash scripts/compile_kernels.sh; fi
MINIFD_REQUIRE_FIXTURE=1 .venv/bin/python -m pytest -q "$@"
