#!/usr/bin/env bash
# Quick start 1: set everything up, then generate with the SmolLM2 fixture.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/minifd run --temperature 0 --max-new-tokens 32 "The capital of France is"
